"""Torch twins of the LoRA kernels: the written specification, and the CPU path."""

from __future__ import annotations

from typing import Any

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
    cache: tuple[StackCache, Any] | None = None,  # (cache, module key); emptied whenever a slot changes
) -> torch.Tensor:
    """Shrink then expand, segment by segment, with no intermediate [T, R_max] buffer.

    Same result as lora_expand_ref(lora_shrink_ref(x, ...), ...). On a CPU the cost of a decode step's
    LoRA is mostly per-op overhead (the matmuls are tiny), so each segment is two ops: one linear for
    the shrink and one addmm for expand, scale and accumulate together. With a `cache`, adjacent
    segments of equal length and rank run as one bmm pair over stacked weights (see _apply_stacked).
    """
    sl = scales.tolist()
    seg_r = meta.seg_ranks(ranks)
    done: set[int] = set()
    if cache is not None and meta.contiguous and meta.num_segments > 1:
        done = _apply_stacked(x, y, a, b, seg_r, scales, meta, cache)
    threads = torch.get_num_threads()
    # These matmuls are tiny: waking an OpenMP team for each costs ~100 us from a non-main thread (the
    # engine's), 20x the work itself. One thread does them faster.
    if threads > 1 and x.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for i, (s, r) in enumerate(zip(meta.slots, seg_r, strict=True)):
            if r == 0 or meta.lens[i] == 0 or i in done:
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


class StackCache:
    """Stacked weights of the CPU twin's bmm path, by module and run of slots, bounded in bytes. A module
    keeps its newest few runs; a run that does not fit the budget is computed segment by segment instead
    (no eviction churn across modules)."""

    PER_MODULE = 4

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._d: dict[Any, dict[Any, tuple[tuple[torch.Tensor, ...], int]]] = {}

    def lookup(self, module: Any, key: Any) -> tuple[torch.Tensor, ...] | None:
        e = self._d.get(module, {}).get(key)
        return e[0] if e is not None else None

    def store(self, module: Any, key: Any, tensors: tuple[torch.Tensor, ...], nbytes: int) -> bool:
        """Keep `tensors` unless the budget is spent; returns whether they were kept."""
        runs = self._d.setdefault(module, {})
        if len(runs) >= self.PER_MODULE:  # the oldest run of this module goes
            oldest = next(iter(runs))
            self.used -= runs.pop(oldest)[1]
        if self.used + nbytes > self.max_bytes:
            return False
        runs[key] = (tensors, nbytes)
        self.used += nbytes
        return True

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.max_bytes

    def clear(self) -> None:
        self._d.clear()
        self.used = 0

    def __len__(self) -> int:
        return sum(len(r) for r in self._d.values())


def _apply_stacked(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, seg_r: tuple[int, ...],
    scales: torch.Tensor, meta: LoRAMeta, cache: tuple[StackCache, Any],
) -> set[int]:
    """Runs of adjacent segments with the same length and rank (decode: one token per sequence, requests
    spread evenly over adapters) as bmm + baddbmm over the run's weights stacked [D, r, K] / [D, r, N].

    Stacking copies weights, so the stacks are cached per module by (slots, rank): a decode batch keeps
    the same adapters step after step. No work on padding: a run only holds segments of one rank. Returns
    the segments done here.
    """
    store, module = cache
    done: set[int] = set()
    rows0 = meta._cache.get("row_starts")
    if rows0 is None:  # first row of each segment (contiguous meta), read once per step
        rows0 = meta._cache["row_starts"] = [int(meta.token_indices[st]) if n else -1
                                             for st, n in zip(meta.starts, meta.lens, strict=True)]
    i, n_seg = 0, meta.num_segments
    while i < n_seg:
        j = i + 1
        while (j < n_seg and seg_r[j] == seg_r[i] and meta.lens[j] == meta.lens[i]
               and rows0[j] == rows0[j - 1] + meta.lens[j - 1]):  # adjacent rows, no base row between
            j += 1
        r, n, d = seg_r[i], meta.lens[i], j - i
        if d > 1 and r > 0 and n > 0:
            slots = meta.slots[i:j]
            key = (slots, r)
            st = store.lookup(module, key)
            nbytes = d * r * (a.shape[2] + b.shape[1]) * a.element_size()
            if st is None and store.fits(nbytes):
                idx = list(slots)
                st = (a[idx, :r].contiguous(),  # [D, r, K]
                      b[idx, :, :r].transpose(1, 2).contiguous(),  # [D, r, N]
                      scales[idx].to(x.dtype).view(-1, 1, 1))
                store.store(module, key, st, nbytes)
            if st is not None:
                a_st, bt_st, sc = st
                first = rows0[i]
                xs = x[first:first + d * n].view(d, n, -1)
                h = torch.bmm(xs, a_st.transpose(1, 2)).mul_(sc)  # [D, n, r], scaled
                y[first:first + d * n].view(d, n, -1).baddbmm_(h, bt_st)
                done.update(range(i, j))
        i = j
    return done
