"""Rotary position embeddings, computed per step from each token's position (no length-capped table).

Formulas follow `transformers.modeling_rope_utils` so our logits match HF's to fp32 rounding.
"""

from __future__ import annotations

import math

import torch

from server.model.spec import ModelSpec


def rope_inv_freq(spec: ModelSpec, max_model_len: int, rope: dict | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32 for the spec's rope type (or `rope`, one layer's own).

    "dynamic" NTK scaling only changes anything past max_position_embeddings, where HF makes it depend
    on the longest sequence in the batch; a serving batch has no such thing, so we refuse that range.
    """
    p = spec.rope if rope is None else rope
    dim = spec.head_dim
    inv = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = p["rope_type"]
    if kind == "linear":
        return inv / float(p["factor"])
    if kind == "dynamic":
        if max_model_len > spec.max_position_embeddings:
            raise ValueError(
                f"dynamic rope scaling past max_position_embeddings ({spec.max_position_embeddings}) "
                f"depends on the batch in transformers; use max_model_len <= {spec.max_position_embeddings}"
            )
        return inv
    if kind == "llama3":
        factor = float(p["factor"])
        low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_len = float(p["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, 1, head_dim] for token positions [T], computed in fp32 then cast as HF does."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated (rotate_half convention, as HF Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
