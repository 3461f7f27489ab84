"""Torch twins of the LoRA kernels: the written specification, segment by segment.

Each twin has its kernel's signature and says in plain torch what the kernel computes; the kernel tests
hold both the Triton kernels and the CPU backend (`kernels/cpu_backend.py`) to these, and these to a
float64 per-token loop. Not tuned: the dispatch in `kernels/__init__.py` runs the CPU backend on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.metadata import LoRAMeta
from kernels.pages import resolve_pages


def flat_a(a: torch.Tensor) -> torch.Tensor:
    """Pool A [P, PR, K] as rows [P * PR, K] (a view when contiguous)."""
    return a.reshape(-1, a.shape[2])


def flat_bt(b: torch.Tensor) -> torch.Tensor:
    """Pool B viewed [P, N, PR] as Bᵀ rows [P * PR, N] (a view when stored [P, PR, N], as the pools are)."""
    return b.transpose(1, 2).reshape(-1, b.shape[1])


def lora_shrink_ref(
    x: torch.Tensor,  # [T, K]
    a: torch.Tensor,  # [P, PR, K] pool of A pages ([S, R_max, K] stacked A when pages is None)
    ranks: torch.Tensor,  # [S] int32, read on the host once per meta (LoRAMeta.seg_ranks)
    meta: LoRAMeta,
    out: torch.Tensor | None = None,  # [T, R_max], R_max = MP * PR
    pages: torch.Tensor | None = None,  # [S, MP] int32 page table (kernels/pages.py); None: identity
) -> torch.Tensor:
    """Semantics: for each token t with slot s >= 0: out[t, :r_s] = x[t] @ A_s.T, where A_s [r_s, K] is the
    slot's rank rows read through the page table (row j: a[pages[s, j // PR], j % PR]).

    Rows of base tokens and columns >= r_s are left untouched (zeros if out is fresh).
    """
    pages, page_rank, r_max = resolve_pages(a, pages)
    if out is None:
        out = torch.zeros(x.shape[0], r_max, dtype=x.dtype, device=x.device)
    af = flat_a(a)
    for i, (r, src) in enumerate(zip(meta.seg_ranks(ranks), meta.page_rows(pages, page_rank, ranks), strict=True)):
        if r == 0 or meta.lens[i] == 0:
            continue
        rows = meta.rows(i)
        out[rows, :r] = F.linear(x[rows], af[src])  # x @ A.T
    return out


def lora_expand_ref(
    h: torch.Tensor,  # [T, R_max] output of lora_shrink
    b: torch.Tensor,  # [P, N, PR] pool of B pages, any strides ([S, N, R_max] stacked B when pages is None)
    ranks: torch.Tensor,  # [S] int32
    scales: torch.Tensor,  # [S] float32
    meta: LoRAMeta,
    y: torch.Tensor,  # [T, N] (may be a column slice of a wider tensor; stride(1) == 1)
    pages: torch.Tensor | None = None,  # [S, MP] int32 page table; None: identity
) -> torch.Tensor:
    """Semantics: for each token t with slot s >= 0: y[t] += scales[s] * (h[t, :r_s] @ B_s.T), where B_s
    [N, r_s] is the slot's rank columns read through the page table (column j: b[pages[s, j // PR], :, j % PR])."""
    sl = scales.tolist()
    pages, page_rank, _ = resolve_pages(b.transpose(1, 2), pages)
    bt = flat_bt(b)
    for i, (s, r, src) in enumerate(zip(meta.slots, meta.seg_ranks(ranks), meta.page_rows(pages, page_rank, ranks),
                                        strict=True)):
        if r == 0 or meta.lens[i] == 0:
            continue
        rows = meta.rows(i)
        delta = F.linear(h[rows, :r], bt[src].T) * sl[s]  # h @ B.T
        if isinstance(rows, slice):
            y[rows] += delta.to(y.dtype)
        else:
            y.index_add_(0, rows, delta.to(y.dtype))
    return y


def lora_apply_ref(
    x: torch.Tensor,  # [T, K]
    y: torch.Tensor,  # [T, N] base output, updated in place (may be a column slice)
    a: torch.Tensor,  # [P, PR, K] ([S, R_max, K] when pages is None)
    b: torch.Tensor,  # [P, N, PR] ([S, N, R_max] when pages is None)
    ranks: torch.Tensor,  # [S] int32
    scales: torch.Tensor,  # [S] float32
    meta: LoRAMeta,
    pages: torch.Tensor | None = None,  # [S, MP] int32 page table; None: identity
) -> torch.Tensor:
    """Semantics: y[t] += scales[s] * (x[t] @ A_s.T) @ B_s.T for each token t with slot s >= 0 (A_s, B_s: the
    slot's rank rows/columns through the page table)."""
    return lora_expand_ref(lora_shrink_ref(x, a, ranks, meta, pages=pages), b, ranks, scales, meta, y, pages=pages)
