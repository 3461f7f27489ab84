"""PEFT adapters: config → typed spec, safe loading, and the atomic on-disk store.

Depends on the base model's shapes (`server.model.shapes`) and on the adapter families
(`server.families`), which parse each family's config and check its weights; nothing else of peftserve.
Only `errors` and `base_info` are imported eagerly (no torch); the rest on first use.
"""

from importlib import import_module
from typing import Any

from adapters_store.base_info import BaseModelInfo
from adapters_store.errors import AdapterError

_LAZY = {
    "AdapterSpec": "spec", "LoraModuleSpec": "spec", "LoraSpec": "spec", "PrefixSpec": "spec", "PromptSpec": "spec",
    "load_config": "spec", "parse_config": "spec", "validate_name": "spec", "load_adapter": "loader",
    "AdapterRecord": "store", "AdapterStore": "store", "extract_upload": "archive",
}

__all__ = ["AdapterError", "BaseModelInfo", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"adapters_store.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'adapters_store' has no attribute {name!r}")
