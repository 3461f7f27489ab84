"""Torch twins of the LoRA kernels: the written specification, segment by segment.

Each twin has its kernel's signature and says in plain torch what the kernel computes; the kernel tests
hold both the Triton kernels and the CPU backend (`kernels/cpu_backend.py`) to these, and these to a
float64 per-token loop. Not tuned: the dispatch in `kernels/__init__.py` runs the CPU backend on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.metadata import LoRAMeta


def lora_shrink_ref(
    x: torch.Tensor,  # [T, K]
    a: torch.Tensor,  # [S, R_max, K] stacked A of every slot
    ranks: torch.Tensor,  # [S] int32, read on the host once per meta (LoRAMeta.seg_ranks)
    meta: LoRAMeta,
    out: torch.Tensor | None = None,  # [T, R_max]
) -> torch.Tensor:
    """Semantics: for each token t with slot s >= 0: out[t, :r_s] = x[t] @ a[s, :r_s].T.

    Rows of base tokens and columns >= r_s are left untouched (zeros if out is fresh).
    """
    if out is None:
        out = torch.zeros(x.shape[0], a.shape[1], dtype=x.dtype, device=x.device)
    for i, (s, r) in enumerate(zip(meta.slots, meta.seg_ranks(ranks), strict=True)):
        if r == 0 or meta.lens[i] == 0:
            continue
        rows = meta.rows(i)
        out[rows, :r] = F.linear(x[rows], a[s, :r])  # x @ A.T
    return out


def lora_expand_ref(
    h: torch.Tensor,  # [T, R_max] output of lora_shrink
    b: torch.Tensor,  # [S, N, R_max] stacked B of every slot
    ranks: torch.Tensor,  # [S] int32
    scales: torch.Tensor,  # [S] float32
    meta: LoRAMeta,
    y: torch.Tensor,  # [T, N] (may be a column slice of a wider tensor; stride(1) == 1)
) -> torch.Tensor:
    """Semantics: for each token t with slot s >= 0: y[t] += scales[s] * (h[t, :r_s] @ b[s, :, :r_s].T)."""
    sl = scales.tolist()
    for i, (s, r) in enumerate(zip(meta.slots, meta.seg_ranks(ranks), strict=True)):
        if r == 0 or meta.lens[i] == 0:
            continue
        rows = meta.rows(i)
        delta = F.linear(h[rows, :r], b[s, :, :r]) * sl[s]  # h @ B.T
        if isinstance(rows, slice):
            y[rows] += delta.to(y.dtype)
        else:
            y.index_add_(0, rows, delta.to(y.dtype))
    return y


def lora_apply_ref(
    x: torch.Tensor,  # [T, K]
    y: torch.Tensor,  # [T, N] base output, updated in place (may be a column slice)
    a: torch.Tensor,  # [S, R_max, K]
    b: torch.Tensor,  # [S, N, R_max]
    ranks: torch.Tensor,  # [S] int32
    scales: torch.Tensor,  # [S] float32
    meta: LoRAMeta,
) -> torch.Tensor:
    """Semantics: y[t] += scales[s] * (x[t] @ a[s, :r_s].T) @ b[s, :, :r_s].T for each token t with slot s >= 0."""
    return lora_expand_ref(lora_shrink_ref(x, a, ranks, meta), b, ranks, scales, meta, y)
