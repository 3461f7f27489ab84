"""The adapter-family interface: everything the server knows about one kind of PEFT adapter.

A family is one class (one module under `server/families/`, plus any kernels it calls) that owns:

1. **Config** — `parse(cfg, base, max_rank)`: validate an `adapter_config.json` dict against the base
   model's shapes and return the family's frozen spec (a subclass of `AdapterSpec`). The keys common to
   every family (peft_type, task_type, auto_map, modules_to_save) are checked once, before, by
   `adapters_store.spec.parse_config`.
2. **Weights** — `load(spec, tensors, base)`: check the safetensors dict against the spec and the base,
   and return the family's CPU form (a subclass of `Adapter`, fp32 tensors, only the fields it needs).
3. **Resident form** — `device_form(ctx)`: one object per server (built by the runner on first use)
   that holds every slot of this family on the device: `load(slot, adapter, kv_slots)`, `clear(slot)`.
4. **Step contribution** — two places, both on the device form:
   - `chunk(slot, start, n)` → `ChunkPart`: what a sequence's chunk carries (KV prefix slots, a RoPE
     position offset, input-embedding overrides) — prefix-like families;
   - the `StepHooks` methods (`server/model/hooks.py`), called by the decoder for the rows of the step
     whose adapter slot this family holds: `project_input` (scale a projection's input, e.g. IA3 on
     down_proj), `project_output` (add to / scale a projection's output: LoRA, IA3, DoRA magnitude),
     `block_output` (an extra op around the attention or MLP block: bottleneck adapters). Override only
     what the family needs; the decoder calls only overridden hooks.
   The KV positions a family needs are declared on its `Adapter`: `virtual_tokens` (per-sequence
   positions ahead of the prompt, e.g. prompt tuning) and `prefix_tokens` (a read-only KV prefix shared
   by every sequence on the adapter, e.g. prefix tuning). The scheduler reserves blocks for them; the
   device form receives the flat cache slots in `load` and fills them.

To add a family: write `server/families/<name>.py` with a spec, an `Adapter` subclass, a device form
and an `AdapterFamily` subclass naming its `peft_types`; add its name to `Family` and its instance to
`BUILTIN` in `server/families/__init__.py` (or call `register(...)` at run time, as the toy family in
`tests/e2e/test_family_interface.py` does). Nothing else in the stack names a family.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from adapters_store.errors import AdapterError
from server.model.hooks import ChunkPart, DeviceContext, StepHooks
from server.model.shapes import BaseModelInfo

if TYPE_CHECKING:
    import torch

__all__ = ["Adapter", "AdapterFamily", "AdapterSpec", "ChunkPart", "DeviceContext", "DeviceForm", "Family", "StepHooks"]


class Family(enum.StrEnum):
    """The built-in families, each named once (the value is what listings show as the adapter's type)."""

    LORA = "lora"
    DORA = "dora"
    PREFIX = "prefix"
    PROMPT = "prompt"
    IA3 = "ia3"
    BOTTLENECK = "bottleneck"


@dataclass(frozen=True)
class AdapterSpec:
    """A family's validated config. Subclasses add their own fields."""

    peft_type: str
    base_model_name_or_path: str | None

    @property
    def rank(self) -> int | None:
        """Largest rank a slot must hold (None: the family has no rank)."""
        return None

    @property
    def module_names(self) -> list[str]:
        """Short names of the base modules the adapter changes, in the base's module order."""
        return []


@dataclass(frozen=True, eq=False)
class Adapter:
    """A validated adapter in CPU memory (fp32 tensors). Subclasses hold what their family needs."""

    family: AdapterFamily
    spec: AdapterSpec

    @property
    def kind(self) -> str:
        return self.family.name

    @property
    def virtual_tokens(self) -> int:
        """KV positions each sequence holds ahead of its prompt (embeddings supplied by the family)."""
        return 0

    @property
    def prefix_tokens(self) -> int:
        """Read-only KV positions shared by every sequence on this adapter (written at load)."""
        return 0

    @property
    def page_rank(self) -> int:
        """Rank rows this adapter takes in the device's LoRA page pool (`server/model/adapter_pages.py`);
        0: none (its family keeps per-slot tables)."""
        return 0


class DeviceForm(StepHooks):
    """Every device slot of one family. Slots are loaded and cleared on the engine's worker thread."""

    @abstractmethod
    def load(self, slot: int, adapter: Adapter, kv_slots: list[int]) -> None:
        """Install `adapter` in `slot`; `kv_slots` are the flat KV slots reserved for its prefix_tokens."""

    @abstractmethod
    def clear(self, slot: int) -> None:
        """Make `slot` contribute nothing (it may then hold another family's adapter)."""

    def chunk(self, slot: int, start: int, n: int) -> ChunkPart | None:
        """What a chunk of KV positions [start, start+n) of a sequence on `slot` carries; None: nothing."""
        return None


class AdapterFamily(ABC):
    """One PEFT family. Stateless: the instance is shared by every adapter of the family."""

    name: ClassVar[str]  # shown as the adapter's type in listings
    peft_types: ClassVar[tuple[str, ...]]  # adapter_config.json `peft_type` values this family parses
    weights_name: ClassVar[str] = "adapter_model.safetensors"  # the one safetensors file of its tensors
    optional_files: ClassVar[tuple[str, ...]] = ()  # other files that may come with it (see check_files)

    @abstractmethod
    def parse(self, cfg: dict[str, Any], base: BaseModelInfo, *, max_rank: int) -> AdapterSpec:
        """Validate the family's own config keys against `base`; AdapterError naming the key if refused."""

    def check_files(self, files: dict[str, bytes]) -> None:  # noqa: B027 (optional: most families have none)
        """Check the `optional_files` that came with an adapter (name -> bytes); AdapterError if refused."""

    @abstractmethod
    def load(self, spec: AdapterSpec, tensors: dict[str, torch.Tensor], base: BaseModelInfo) -> Adapter:
        """Check every tensor's name and shape against `spec` and `base`; AdapterError if one is wrong."""

    @abstractmethod
    def device_form(self, ctx: DeviceContext) -> DeviceForm:
        """The family's resident form for a server (called once, on the first load of the family)."""

    def __repr__(self) -> str:
        return f"<family {self.name}>"


# ---------------------------------------------------------------------------------------------- config helpers
# Shared by the families' `parse`: each error names the key and the offending value.


def int_field(cfg: dict[str, Any], key: str, *, default: Any = None, minimum: int = 1) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AdapterError(f"{key} {value!r} is invalid: must be an integer >= {minimum}", field=key)
    return value


def number_field(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdapterError(f"{key} {value!r} is invalid: must be a finite number", field=key)
    return float(value)


def bool_field(cfg: dict[str, Any], key: str, default: bool = False) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise AdapterError(f"{key} {value!r} is invalid: must be true or false", field=key)
    return value


def match_base(cfg: dict[str, Any], key: str, expected: int, why: str, *, optional: bool = False) -> int:
    """An integer key that must equal the base model's value."""
    value = cfg.get(key)
    if value is None and optional:
        return expected
    value = int_field(cfg, key)
    if value != expected:
        raise AdapterError(
            f"{key} {value} does not match the base model, which needs {key}={expected} ({why})",
            field=key, status=422,
        )
    return value


def check_single_submodule(cfg: dict[str, Any]) -> None:
    subs = cfg.get("num_transformer_submodules")
    if subs not in (None, 1):
        raise AdapterError(
            f"num_transformer_submodules {subs!r} is not supported: decoder-only models use 1",
            field="num_transformer_submodules", status=422,
        )


def base_name_of(cfg: dict[str, Any]) -> str | None:
    """`base_model_name_or_path`, recorded and never used (nothing here reads the network)."""
    name = cfg.get("base_model_name_or_path")
    return name if isinstance(name, str) else None
