"""LoRA kernels: Triton on CUDA, torch twins elsewhere. Imports nothing from the rest of peftserve."""

from __future__ import annotations

from typing import Any

import torch

# Import the Triton launchers before defining the same-named switches below: importing the submodule
# kernels.lora_shrink binds it as this package's attribute `lora_shrink`, and a lazy import at call
# time would replace the switch function with the module (breaking lora_apply and later
# `from kernels import lora_shrink`). Importing triton needs no GPU; TRITON_INTERPRET must be set
# before this import for the CPU interpreter (tests/kernels/conftest.py, Makefile).
from kernels.lora_expand import lora_expand_triton
from kernels.lora_shrink import lora_shrink_triton
from kernels.metadata import LoRAMeta
from kernels.reference import StackCache, lora_apply_ref, lora_expand_ref, lora_shrink_ref

__all__ = [
    "LoRAMeta",
    "lora_apply",
    "lora_shrink",
    "lora_expand",
    "lora_shrink_ref",
    "lora_apply_ref",
    "StackCache",
    "lora_expand_ref",
    "lora_shrink_triton",
    "lora_expand_triton",
]


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda


def lora_shrink(
    x: torch.Tensor,  # [T, K]
    a: torch.Tensor,  # [S, R_max, K]
    ranks: torch.Tensor,  # [S]
    meta: LoRAMeta,
    out: torch.Tensor | None = None,  # [T, R_max]
) -> torch.Tensor:
    """Backend switch: Triton on CUDA, torch twin elsewhere."""
    if _use_triton(x):
        return lora_shrink_triton(x, a, ranks, meta, out)
    return lora_shrink_ref(x, a, ranks, meta, out)


def lora_expand(
    h: torch.Tensor,  # [T, R_max]
    b: torch.Tensor,  # [S, N, R_max]
    ranks: torch.Tensor,  # [S]
    scales: torch.Tensor,  # [S] float32
    meta: LoRAMeta,
    y: torch.Tensor,  # [T, N], updated in place
) -> torch.Tensor:
    """Backend switch: Triton on CUDA, torch twin elsewhere."""
    if _use_triton(h):
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
    cache: tuple[StackCache, Any] | None = None,  # CPU only: (stacked-weight cache, module key)
) -> torch.Tensor:
    """y += scale[slot] * (x @ A[slot].T) @ B[slot].T for every token with a slot; base tokens untouched."""
    if meta.num_segments == 0:
        return y
    if not _use_triton(x):
        return lora_apply_ref(x, y, a, b, ranks, scales, meta, cache)
    h = lora_shrink(x, a, ranks, meta)
    return lora_expand(h, b, ranks, scales, meta, y)
