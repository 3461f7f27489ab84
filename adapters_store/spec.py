"""`adapter_config.json` → a typed, validated spec, checked against the base model once.

The keys every PEFT config shares are checked here; the rest is the adapter family's (`server/families/`),
found by `peft_type`. `base_model_name_or_path` is recorded, never used: nothing here reads the network
or runs code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from adapters_store.errors import AdapterError
from server.families import config_peft_type, family_for, peft_types
from server.families.base import AdapterSpec
from server.families.lora import LoraModuleSpec, LoraSpec
from server.families.prefix import PrefixSpec
from server.families.prompt import PromptSpec
from server.model.shapes import BaseModelInfo

__all__ = [
    "AdapterSpec", "LoraModuleSpec", "LoraSpec", "PrefixSpec", "PromptSpec", "load_config", "loads_config",
    "parse_config", "validate_name",
]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")  # ":" for ft:<base>:<suffix>:<job>


def validate_name(name: str) -> str:
    """Return `name` if it is a safe adapter name, else raise AdapterError."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise AdapterError(
            f"adapter name {name!r} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ - :, "
            "starting with a letter or digit, without '..'",
            field="name",
        )
    return name


def load_config(path: str | Path) -> dict[str, Any]:
    """Read `adapter_config.json`; a missing or malformed file raises AdapterError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AdapterError(f"{path.name} is missing", field="adapter_config.json") from None
    except OSError as e:
        raise AdapterError(f"cannot read {path.name}: {e}", field="adapter_config.json") from None
    return loads_config(raw)


def loads_config(raw: bytes | str) -> dict[str, Any]:
    """Parse the bytes of `adapter_config.json` into a dict."""
    try:
        cfg = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter_config.json is not valid JSON: {e}", field="adapter_config.json") from None
    if not isinstance(cfg, dict):
        raise AdapterError(
            f"adapter_config.json must hold a JSON object, got {type(cfg).__name__}", field="adapter_config.json"
        )
    return cfg


def parse_config(cfg: dict[str, Any], base: BaseModelInfo, *, max_rank: int) -> AdapterSpec:
    """Validate a PEFT config against `base` and resolve it into its family's spec; refusals raise AdapterError."""
    if not isinstance(cfg, dict):
        raise AdapterError("adapter config must be a JSON object", field="adapter_config.json")
    if cfg.get("auto_map"):
        raise AdapterError(
            f"auto_map {cfg['auto_map']!r} asks for remote code; adapters that need custom code are refused",
            field="auto_map", status=422,
        )
    peft_type = config_peft_type(cfg)
    family = family_for(peft_type)
    if family is None:
        raise AdapterError(
            f"peft_type {peft_type!r} is not supported; supported: {', '.join(peft_types())}",
            field="peft_type", status=422,
        )
    task_type = cfg.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise AdapterError(
            f"task_type {task_type!r} is not supported; allowed: CAUSAL_LM (or null)", field="task_type", status=422
        )
    modules_to_save = cfg.get("modules_to_save")
    if modules_to_save:
        raise AdapterError(
            f"modules_to_save {modules_to_save!r} is not supported: only adapter weights can be served, "
            "not full copies of base modules; allowed: null or []",
            field="modules_to_save", status=422,
        )
    return family.parse(cfg, base, max_rank=max_rank)
