"""Adapter families: one module per PEFT family behind one interface (see `server/families/base.py`).

The registry maps adapter_config.json's `peft_type` to its family. The built-ins are registered here;
`register` adds one at run time (a plugin, or a test's toy family).
"""

from __future__ import annotations

from server.families.base import (
    Adapter,
    AdapterFamily,
    AdapterSpec,
    DeviceContext,
    DeviceForm,
    Family,
)
from server.families.bottleneck import Bottleneck, is_adapterhub_config
from server.families.dora import DoRA
from server.families.ia3 import IA3
from server.families.lora import LoRA
from server.families.prefix import PrefixTuning
from server.families.prompt import PromptTuning

LORA, DORA, PREFIX, PROMPT, IA3_, BOTTLENECK = LoRA(), DoRA(), PrefixTuning(), PromptTuning(), IA3(), Bottleneck()
BUILTIN: tuple[AdapterFamily, ...] = (LORA, DORA, PREFIX, PROMPT, IA3_, BOTTLENECK)
_by_peft_type: dict[str, AdapterFamily] = {}


def register(family: AdapterFamily) -> None:
    """Serve adapters of `family` (its `peft_types` must not belong to another family)."""
    for t in family.peft_types:
        other = _by_peft_type.get(t)
        if other is not None and other is not family:
            raise ValueError(f"peft_type {t!r} already belongs to {other!r}")
    for t in family.peft_types:
        _by_peft_type[t] = family


def unregister(family: AdapterFamily) -> None:
    for t in family.peft_types:
        if _by_peft_type.get(t) is family:
            del _by_peft_type[t]


def config_peft_type(cfg: dict) -> object:
    """The family key of an adapter_config.json: its `peft_type`, or BOTTLENECK for AdapterHub's format."""
    if "peft_type" not in cfg and is_adapterhub_config(cfg):
        return BOTTLENECK.peft_types[0]
    return cfg.get("peft_type")


def family_for(peft_type: object) -> AdapterFamily | None:
    """The family that parses adapters of `peft_type`, or None."""
    return _by_peft_type.get(peft_type) if isinstance(peft_type, str) else None


def peft_types() -> tuple[str, ...]:
    """Every supported `peft_type`, in registration order."""
    return tuple(_by_peft_type)


for _f in BUILTIN:
    register(_f)

__all__ = [
    "Adapter", "AdapterFamily", "AdapterSpec", "BOTTLENECK", "BUILTIN", "DORA", "DeviceContext", "DeviceForm", "Family",
    "IA3_", "LORA", "PREFIX", "PROMPT", "config_peft_type", "family_for", "peft_types", "register", "unregister",
]
