"""LoRA kernels: Triton on CUDA, torch twins elsewhere. Imports nothing from the rest of peftserve."""

from __future__ import annotations

import torch

from kernels.metadata import LoRAMeta
from kernels.reference import lora_expand_ref, lora_shrink_ref

__all__ = ["LoRAMeta", "lora_apply", "lora_shrink", "lora_expand", "lora_shrink_ref", "lora_expand_ref"]


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda


def lora_shrink(x, a, ranks, meta, out=None):  # noqa: ANN001 - same signature as the twin
    """Backend switch: Triton on CUDA, torch twin elsewhere."""
    if _use_triton(x):
        from kernels.lora_shrink import lora_shrink_triton

        return lora_shrink_triton(x, a, ranks, meta, out)
    return lora_shrink_ref(x, a, ranks, meta, out)


def lora_expand(h, b, ranks, scales, meta, y):  # noqa: ANN001
    """Backend switch: Triton on CUDA, torch twin elsewhere."""
    if _use_triton(h):
        from kernels.lora_expand import lora_expand_triton

        return lora_expand_triton(h, b, ranks, scales, meta, y)
    return lora_expand_ref(h, b, ranks, scales, meta, y)


def lora_apply(
    x: torch.Tensor,  # [T, K]
    y: torch.Tensor,  # [T, N] base output, updated in place
    a: torch.Tensor,  # [S, R_max, K]
    b: torch.Tensor,  # [S, N, R_max]
    ranks: torch.Tensor,  # [S]
    scales: torch.Tensor,  # [S]
    meta: LoRAMeta,
) -> torch.Tensor:
    """y += scale[slot] * (x @ A[slot].T) @ B[slot].T for every token with a slot; base tokens untouched."""
    if meta.num_segments == 0:
        return y
    h = lora_shrink(x, a, ranks, meta)
    return lora_expand(h, b, ranks, scales, meta, y)
