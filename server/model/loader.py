"""Load a local HF checkpoint: AutoConfig, weights through safetensors only, AutoTokenizer.

Pickled weights (.bin / .pt) are refused: unpickling runs code from the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open

from server.model.spec import ModelSpec, spec_from_config

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, device: str, checkpoint_dtype: str | None) -> torch.dtype:
    """float32/float16/bfloat16, or "auto": on CUDA bfloat16 (float16 for a float16 checkpoint), float32
    elsewhere (CPU half is slow and less exact)."""
    if dtype == "auto":
        if torch.device(device).type == "cuda":
            return torch.float16 if checkpoint_dtype == "float16" else torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_spec(model_dir: str) -> tuple[ModelSpec, Any]:
    """Read config.json through AutoConfig and check it; returns (spec, hf_config)."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"no config.json in model directory {model_dir!r}")
    cfg = AutoConfig.from_pretrained(model_dir)
    return spec_from_config(cfg), cfg


def _safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return sorted({os.path.join(model_dir, name) for name in weight_map.values()})
    files = sorted(os.path.join(model_dir, n) for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not files:
        pickled = [n for n in os.listdir(model_dir) if n.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found pickled weights {pickled}; convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir!r}{hint}")
    return files


def iter_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) for every tensor of the checkpoint, one file at a time."""
    for path in _safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def load_state_dict(model_dir: str, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All checkpoint tensors cast to dtype on device, keyed by HF name (a `model.` prefix is ensured)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in iter_weights(model_dir):
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if not name.startswith(("model.", "lm_head.")):
            name = "model." + name
        out[name] = t.to(device=device, dtype=dtype)
    return out


def load_tokenizer(model_dir: str) -> Any:
    """The checkpoint's own tokenizer (and chat template) through AutoTokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def eos_token_ids(model_dir: str, hf_config: Any, tokenizer: Any) -> set[int]:
    """Every id that ends generation: generation_config.json, config.json and the tokenizer together."""
    ids: set[int] = set()

    def add(v: Any) -> None:
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v if x is not None)

    gen = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen):
        with open(gen) as f:
            add(json.load(f).get("eos_token_id"))
    add(getattr(hf_config, "eos_token_id", None))
    add(getattr(tokenizer, "eos_token_id", None))
    return ids
