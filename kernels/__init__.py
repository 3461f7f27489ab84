"""LoRA ops and their backends. Imports nothing from the rest of peftserve.

- `reference.py`: the torch twins, the written specification (per segment, not tuned).
- `triton_shrink.py`, `triton_expand.py` (+ `triton_common.py`): the Triton kernels, run on CUDA.
- `cpu_backend.py`: `lora_apply` tuned for the CPU (stacked runs, one OpenMP thread, `StackCache`).
- `metadata.py`: `LoRAMeta`, one step's segments, shared by every module.
- `pages.py`: page-table addressing: every backend reads a slot's A/B rank rows through `pages` [S, MP].
The functions below pick the backend by the tensors' device. Importing triton needs no GPU;
TRITON_INTERPRET must be set before this import for the CPU interpreter (tests/kernels/conftest.py).
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.capturable import FixedLoRAMeta, lora_apply_fixed
from kernels.cpu_backend import StackCache, lora_apply_cpu
from kernels.metadata import LoRAMeta
from kernels.reference import lora_apply_ref, lora_expand_ref, lora_shrink_ref
from kernels.triton_expand import lora_expand_triton
from kernels.triton_shrink import lora_shrink_triton

__all__ = [
    "FixedLoRAMeta",
    "LoRAMeta",
    "StackCache",
    "lora_apply",
    "lora_apply_cpu",
    "lora_apply_ref",
    "lora_expand",
    "lora_expand_ref",
    "lora_expand_triton",
    "lora_shrink",
    "lora_shrink_ref",
    "lora_shrink_triton",
]


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda


def lora_shrink(
    x: torch.Tensor,  # [T, K]
    a: torch.Tensor,  # [P, PR, K] pool ([S, R_max, K] when pages is None)
    ranks: torch.Tensor,  # [S]
    meta: LoRAMeta,
    out: torch.Tensor | None = None,  # [T, R_max]
    pages: torch.Tensor | None = None,  # [S, MP] int32 page table (kernels/pages.py)
) -> torch.Tensor:
    """Backend switch: Triton on CUDA, the twin elsewhere."""
    if _use_triton(x):
        return lora_shrink_triton(x, a, ranks, meta, out, pages=pages)
    return lora_shrink_ref(x, a, ranks, meta, out, pages=pages)


def lora_expand(
    h: torch.Tensor,  # [T, R_max]
    b: torch.Tensor,  # [P, N, PR] pool ([S, N, R_max] when pages is None)
    ranks: torch.Tensor,  # [S]
    scales: torch.Tensor,  # [S] float32
    meta: LoRAMeta,
    y: torch.Tensor,  # [T, N], updated in place
    pages: torch.Tensor | None = None,  # [S, MP] int32 page table
) -> torch.Tensor:
    """Backend switch: Triton on CUDA, the twin elsewhere."""
    if _use_triton(h):
        return lora_expand_triton(h, b, ranks, scales, meta, y, pages=pages)
    return lora_expand_ref(h, b, ranks, scales, meta, y, pages=pages)


def lora_apply(
    x: torch.Tensor,  # [T, K]
    y: torch.Tensor,  # [T, N] base output, updated in place
    a: torch.Tensor,  # [P, PR, K] pool ([S, R_max, K] when pages is None)
    b: torch.Tensor,  # [P, N, PR] pool ([S, N, R_max] when pages is None)
    ranks: torch.Tensor,  # [S]
    scales: torch.Tensor,  # [S]
    meta: LoRAMeta,
    cache: tuple[StackCache, Any] | None = None,  # CPU only: (stacked-weight cache, module key)
    pages: torch.Tensor | None = None,  # [S, MP] int32 page table (kernels/pages.py); None: identity
) -> torch.Tensor:
    """y += scale[slot] * (x @ A[slot].T) @ B[slot].T for every token with a slot; base tokens untouched.

    A `FixedLoRAMeta` (a capture-ready decode step) always runs the fixed-shape Triton launches
    (`kernels/capturable.py`; `ranks` must then be on x's device); on the CPU that is Triton's interpreter.

    Triton shrink + expand on CUDA; the CPU backend elsewhere.
    """
    if isinstance(meta, FixedLoRAMeta):
        return lora_apply_fixed(x, y, a, b, ranks, scales, meta, pages=pages)
    if meta.num_segments == 0:
        return y
    if not _use_triton(x):
        return lora_apply_cpu(x, y, a, b, ranks, scales, meta, cache, pages=pages)
    h = lora_shrink_triton(x, a, ranks, meta, pages=pages)
    return lora_expand_triton(h, b, ranks, scales, meta, y, pages=pages)
