"""PEFT adapters: config → typed spec, safe loading, and the atomic on-disk store.

Imports nothing from the rest of peftserve. `spec`, `errors` and `base_info` do not import torch;
the names from `loader`, `store` and `archive` are imported on first use so that importing the
spec types stays cheap.
"""

from importlib import import_module
from typing import Any

from adapters_store.base_info import BaseModelInfo
from adapters_store.errors import AdapterError
from adapters_store.spec import (
    AdapterSpec,
    LoraModuleSpec,
    LoraSpec,
    PrefixSpec,
    PromptSpec,
    load_config,
    parse_config,
    validate_name,
)

_LAZY = {
    "LoadedAdapter": "loader", "LoraModuleWeights": "loader", "load_adapter": "loader",
    "AdapterRecord": "store", "AdapterStore": "store", "extract_upload": "archive",
}

__all__ = [
    "AdapterError", "AdapterSpec", "BaseModelInfo", "LoraModuleSpec", "LoraSpec", "PrefixSpec", "PromptSpec",
    "load_config", "parse_config", "validate_name", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"adapters_store.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'adapters_store' has no attribute {name!r}")
