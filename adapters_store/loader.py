"""Load a PEFT adapter directory into its family's CPU form (fp32 tensors), every check done first.

The family (found by the config's `peft_type`) checks the tensors' names and shapes against the base.
"""

from __future__ import annotations

from pathlib import Path

from adapters_store.errors import AdapterError
from adapters_store.safetensors_check import load_checked, refuse_pickles
from adapters_store.spec import load_config, parse_config
from server.families import Adapter, family_for
from server.model.shapes import BaseModelInfo

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def load_adapter(path: str | Path, base: BaseModelInfo, *, max_rank: int) -> Adapter:
    """Validate the adapter directory at `path` against `base` and load its weights; AdapterError if refused."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter directory {str(path)!r} does not exist", field="path", status=404)
    refuse_pickles(p.name for p in path.iterdir())
    spec = parse_config(load_config(path / CONFIG_NAME), base, max_rank=max_rank)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"{WEIGHTS_NAME} is missing from the adapter", field=WEIGHTS_NAME)
    tensors = load_checked(weights, name=WEIGHTS_NAME)
    family = family_for(spec.peft_type)
    assert family is not None  # parse_config found it
    return family.load(spec, tensors, base)
