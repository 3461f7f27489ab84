"""Torch twins of the LoRA kernels: the written specification, and the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.metadata import LoRAMeta


def _rows(meta: LoRAMeta, i: int) -> slice | torch.Tensor:
    start, n = meta.starts[i], meta.lens[i]
    if meta.contiguous:
        first = int(meta.token_indices[start]) if n else 0
        return slice(first, first + n)
    return meta.token_indices[start:start + n]


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
        rows = _rows(meta, i)
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
        rows = _rows(meta, i)
        delta = F.linear(h[rows, :r], b[s, :, :r]) * sl[s]  # h @ B.T (linear: no copy of the strided B slice)
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
    """Shrink then expand, segment by segment, with no intermediate [T, R_max] buffer.

    Same result as lora_expand_ref(lora_shrink_ref(x, ...), ...). On a CPU the cost of a decode step's
    LoRA is mostly per-op overhead (the matmuls are tiny), so each segment is two ops: one linear for
    the shrink and one addmm for expand, scale and accumulate together.
    """
    sl = scales.tolist()
    threads = torch.get_num_threads()
    # These matmuls are tiny: waking an OpenMP team for each costs ~100 us from a non-main thread (the
    # engine's), 20x the work itself. One thread does them faster.
    if threads > 1 and x.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for i, (s, r) in enumerate(zip(meta.slots, meta.seg_ranks(ranks), strict=True)):
            if r == 0 or meta.lens[i] == 0:
                continue
            rows = _rows(meta, i)
            h = F.linear(x[rows], a[s, :r])  # [n, r]
            if isinstance(rows, slice):
                y[rows].addmm_(h, b[s, :, :r].T, alpha=sl[s])
            else:
                y.index_add_(0, rows, F.linear(h, b[s, :, :r]).to(y.dtype), alpha=sl[s])
    finally:
        if threads > 1 and x.device.type == "cpu":
            torch.set_num_threads(threads)
    return y
