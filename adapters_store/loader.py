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
# Every file an upload may carry: peft's two, AdapterHub's weights, and what save_adapter writes beside them
# (the base's own LM head, Qwen2's interface). Which of them an adapter needs is its family's call.
WEIGHTS_NAMES = (WEIGHTS_NAME, "adapter.safetensors")
KNOWN_FILES = (CONFIG_NAME, *WEIGHTS_NAMES, "head_config.json", "model_head.safetensors", "adapter_interface.json")


def load_adapter(path: str | Path, base: BaseModelInfo, *, max_rank: int) -> Adapter:
    """Validate the adapter directory at `path` against `base` and load its weights; AdapterError if refused."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter directory {str(path)!r} does not exist", field="path", status=404)
    refuse_pickles(p.name for p in path.iterdir())
    spec = parse_config(load_config(path / CONFIG_NAME), base, max_rank=max_rank)
    family = family_for(spec.peft_type)
    assert family is not None  # parse_config found it
    wname = family.weights_name
    own = (CONFIG_NAME, wname, *family.optional_files)
    present = [n for n in KNOWN_FILES if (path / n).is_file()]
    foreign = [n for n in present if n not in own]
    if foreign:
        raise AdapterError(f"file {foreign[0]!r} does not belong to a {family.name} adapter; it holds "
                           f"{', '.join(own[:2])}" + (f" (and optionally {', '.join(own[2:])})" if own[2:] else ""),
                           field=foreign[0], status=422)
    weights = path / wname
    if not weights.is_file():
        raise AdapterError(f"{wname} is missing from the adapter", field=wname)
    family.check_files({n: (path / n).read_bytes() for n in family.optional_files if (path / n).is_file()})
    tensors = load_checked(weights, name=wname)
    return family.load(spec, tensors, base)
