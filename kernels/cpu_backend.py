"""The CPU backend of the LoRA ops: `lora_apply` tuned for a few CPU cores (what the dispatch runs on CPU).

Same results as the twins in `kernels/reference.py` (the kernel tests check it against them). What makes
it fast on a CPU, where a decode step's LoRA cost is mostly per-op overhead:
- each segment is two ops (a linear for the shrink, one addmm for expand + scale + accumulate);
- adjacent segments of equal length and rank run as one bmm pair over stacked weights, cached in a
  `StackCache` per module (a decode batch keeps the same adapters step after step);
- the tiny per-segment matmuls run on one OpenMP thread (waking a team costs more than the work).
Layout contract: A is a pool [P, PR, K] and B a pool viewed [P, N, PR], read through a page table
(`kernels/pages.py`). B is stored [P, PR, N] (`server/families/lora.py` does so), so a slot's Bᵀ rows on
consecutive pages are one contiguous [r, N] block for addmm, as are its A rows; scattered pages are gathered.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kernels.metadata import LoRAMeta
from kernels.pages import resolve_pages
from kernels.reference import flat_a, flat_bt


def lora_apply_cpu(
    x: torch.Tensor,  # [T, K]
    y: torch.Tensor,  # [T, N] base output, updated in place (may be a column slice)
    a: torch.Tensor,  # [P, PR, K] pool ([S, R_max, K] when pages is None)
    b: torch.Tensor,  # [P, N, PR] pool, best stored [P, PR, N] ([S, N, R_max] when pages is None)
    ranks: torch.Tensor,  # [S] int32
    scales: torch.Tensor,  # [S] float32
    meta: LoRAMeta,
    cache: tuple[StackCache, Any] | None = None,  # (cache, module key); emptied whenever a slot changes
    pages: torch.Tensor | None = None,  # [S, MP] int32 host page table; None: identity
) -> torch.Tensor:
    """What kernels.reference.lora_apply_ref computes, fast on a CPU, with no intermediate [T, R_max] buffer.

    Each segment is two ops: one linear for the shrink and one addmm for expand, scale and accumulate
    together. With a `cache`, adjacent segments of equal length and rank run as one bmm pair over
    stacked weights (see _apply_stacked).
    """
    sl = scales.tolist()
    seg_r = meta.seg_ranks(ranks)
    pages, page_rank, _ = resolve_pages(a, pages)
    src = meta.page_rows(pages, page_rank, ranks)
    af, bt = flat_a(a), flat_bt(b)
    done: set[int] = set()
    if cache is not None and meta.contiguous and meta.num_segments > 1:
        done = _apply_stacked(x, y, af, bt, seg_r, src, scales, meta, cache)
    threads = torch.get_num_threads()
    # These matmuls are tiny: waking an OpenMP team for each costs ~100 us from a non-main thread (the
    # engine's), 20x the work itself. One thread does them faster.
    if threads > 1 and x.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for i, (s, r) in enumerate(zip(meta.slots, seg_r, strict=True)):
            if r == 0 or meta.lens[i] == 0 or i in done:
                continue
            rows = meta.rows(i)
            a_s, bt_s = _slot_weights(af, bt, src[i], s, r, cache)
            h = F.linear(x[rows], a_s)  # [n, r]
            if isinstance(rows, slice):
                y[rows].addmm_(h, bt_s, alpha=sl[s])
            else:
                y.index_add_(0, rows, (h @ bt_s).to(y.dtype), alpha=sl[s])
    finally:
        if threads > 1 and x.device.type == "cpu":
            torch.set_num_threads(threads)
    return y


def _slot_weights(af: torch.Tensor, bt: torch.Tensor, src: slice | torch.Tensor, slot: int, r: int,
                  cache: tuple[StackCache, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A slot's A [r, K] and Bᵀ [r, N]: views when its pages are consecutive; gathered from scattered pages
    (and kept in the stack cache, so a decode batch gathers once, not every step)."""
    if isinstance(src, slice):
        return af[src], bt[src]
    if cache is None:
        return af[src], bt[src]
    store, module = cache
    key = (module, slot, r)
    hit = store.gathered.get(key)
    if hit is not None:
        return hit
    got = (af[src], bt[src])
    nbytes = r * (af.shape[1] + bt.shape[1]) * af.element_size()
    if store.fits(nbytes):  # within the cache's byte budget; else gathered again next step
        store.gathered[key] = got
        store.used += nbytes
    return got


class StackCache:
    """Stacked weights of the bmm path, by module and run of slots, bounded in bytes. A module
    keeps its newest few runs; a run that does not fit the budget is computed segment by segment instead
    (no eviction churn across modules)."""

    PER_MODULE = 4

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._d: dict[Any, dict[Any, tuple[tuple[torch.Tensor, ...], int]]] = {}
        # single slots on scattered pages: (module, slot, rank) -> (A rows, Bᵀ rows) gathered once
        self.gathered: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    def lookup(self, module: Any, key: Any) -> tuple[torch.Tensor, ...] | None:
        e = self._d.get(module, {}).get(key)
        return e[0] if e is not None else None

    def store(self, module: Any, key: Any, tensors: tuple[torch.Tensor, ...], nbytes: int) -> bool:
        """Keep `tensors` unless they do not fit the budget (nothing is evicted then); returns whether kept."""
        runs = self._d.setdefault(module, {})
        evict = next(iter(runs)) if len(runs) >= self.PER_MODULE else None  # this module's oldest run
        freed = runs[evict][1] if evict is not None else 0
        if self.used - freed + nbytes > self.max_bytes:
            return False
        if evict is not None:
            self.used -= runs.pop(evict)[1]
        runs[key] = (tensors, nbytes)
        self.used += nbytes
        return True

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.max_bytes

    def clear(self) -> None:
        self._d.clear()
        self.gathered.clear()
        self.used = 0

    def __len__(self) -> int:
        return sum(len(r) for r in self._d.values())


def _apply_stacked(
    x: torch.Tensor, y: torch.Tensor, af: torch.Tensor, bt: torch.Tensor, seg_r: tuple[int, ...],
    src: tuple[slice | torch.Tensor, ...], scales: torch.Tensor, meta: LoRAMeta, cache: tuple[StackCache, Any],
) -> set[int]:
    """Runs of adjacent segments with the same length and rank (decode: one token per sequence, requests
    spread evenly over adapters) as bmm + baddbmm over the run's weights stacked [D, r, K] / [D, r, N].

    Stacking copies weights, so the stacks are cached per module by (slots, rank): a decode batch keeps
    the same adapters step after step. No work on padding: a run only holds segments of one rank. Returns
    the segments done here.
    """
    store, module = cache
    done: set[int] = set()
    if len(meta.first_rows) != meta.num_segments:  # a hand-built meta without row starts: per segment
        return done
    rows0 = [r if n else -1 for r, n in zip(meta.first_rows, meta.lens, strict=True)]
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
            nbytes = d * r * (af.shape[1] + bt.shape[1]) * af.element_size()
            if st is None and store.fits(nbytes):
                idx = list(slots)
                st = (torch.stack([af[src[k]] for k in range(i, j)]),  # [D, r, K]
                      torch.stack([bt[src[k]] for k in range(i, j)]),  # [D, r, N]
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
