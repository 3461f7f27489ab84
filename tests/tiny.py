"""Tiny random checkpoints for the whole test suite: built in code, deterministic per seed, no download."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from server.model.default_model import build_byte_tokenizer, save_llama_family

TINY_CONFIG: dict[str, Any] = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
# Gemma's configs default to head_dim 256 and windows of 4096: keep the tiny shapes tiny
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": dict(head_dim=16),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16),
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16),
}


def make_tiny_checkpoint(tmp_dir: str, arch: str = "llama", *, seed: int = 0, name: str | None = None,
                         init_std: float = 0.1, **overrides: Any) -> str:
    """Save a tiny random `arch` (see ARCHS) checkpoint + byte tokenizer; return its dir.

    `overrides` go into the HF config (e.g. tie_word_embeddings=True, rope_scaling={...},
    sliding_window=6). init_std is larger than HF's 0.02 so logits are far from uniform and
    differences show. The default directory name encodes all arguments, so one tmp_dir can hold many
    and an identical request reuses the existing one.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if name is None:
        key = json.dumps([arch, seed, init_std, overrides], sort_keys=True, default=str)
        name = f"tiny-{arch}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    path = os.path.join(tmp_dir, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        cfg = {**TINY_CONFIG, **ARCH_DEFAULTS.get(arch, {}), **overrides}
        save_llama_family(path, arch, cfg, seed=seed, init_std=init_std)
    return path


def tiny_tokenizer() -> Any:
    """The byte-level tokenizer every tiny checkpoint ships with."""
    return build_byte_tokenizer()
