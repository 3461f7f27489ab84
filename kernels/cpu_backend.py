"""The CPU backend of the LoRA ops: `lora_apply` tuned for a few CPU cores (what the dispatch runs on CPU).

Same results as the twins in `kernels/reference.py` (the kernel tests check it against them). What makes
it fast on a CPU, where a decode step's LoRA cost is mostly per-op overhead:
- each segment is two ops (a linear for the shrink, one addmm for expand + scale + accumulate);
- adjacent segments of equal length and rank run as one bmm pair over stacked weights, cached in a
  `StackCache` (a decode batch keeps the same adapters step after step; a run is stacked on the second step
  that asks for it, and new stacks evict the least recently used of earlier steps across all modules);
- the tiny per-segment matmuls run on one OpenMP thread (waking a team costs more than the work).
Layout contract: A is a pool [P, PR, K] and B a pool viewed [P, N, PR], read through a page table
(`kernels/pages.py`). B is stored [P, PR, N] (`server/families/lora.py` does so), so a slot's Bᵀ rows on
consecutive pages are one contiguous [r, N] block for addmm, as are its A rows; scattered pages are gathered.
"""

from __future__ import annotations

from collections import OrderedDict
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
    key = ("slot", slot, r)
    hit = store.lookup(module, key)
    if hit is not None:
        return hit[0], hit[1]
    got = (af[src], bt[src])
    nbytes = r * (af.shape[1] + bt.shape[1]) * af.element_size()
    store.store(module, key, got, nbytes)  # within the byte budget (evicting earlier steps'); else gathered again
    return got


class StackCache:
    """Stacked weights of the bmm path, by module and run of slots, bounded in bytes and evicted least
    recently used across all modules.

    A run is keyed by its exact slots, so a decode batch whose composition changes (a request finishes,
    another joins) needs new stacks: they evict the stacks no step has used since (oldest first). What the
    current step already uses is never evicted (`epoch`: one per step), so when one step's runs exceed the
    budget the rest are computed segment by segment instead of thrashing.
    """

    MAX_SEEN = 4096

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        # (module, key) -> (tensors, bytes, epoch of last use); iteration order = least recently used first
        self._d: OrderedDict[tuple[Any, Any], tuple[tuple[torch.Tensor, ...], int, int]] = OrderedDict()
        self.epoch = 0  # the step being computed (`begin`); entries used in it are not evicted
        self._epoch_of: Any = None
        self.evictions = 0
        # runs asked for once and not stacked yet: a run is stacked on its second step (a batch that keeps
        # its composition), never for a one-off (a composition that changes every step would copy every step)
        self.seen: OrderedDict[tuple[Any, Any], None] = OrderedDict()

    def begin(self, step: Any) -> None:
        """Mark the start of a step (`step`: any object that lives for one step, e.g. its LoRAMeta)."""
        if step is not self._epoch_of:
            self._epoch_of = step
            self.epoch += 1

    def lookup(self, module: Any, key: Any) -> tuple[torch.Tensor, ...] | None:
        e = self._d.get((module, key))
        if e is None:
            return None
        self._d[(module, key)] = (e[0], e[1], self.epoch)
        self._d.move_to_end((module, key))
        return e[0]

    def store(self, module: Any, key: Any, tensors: tuple[torch.Tensor, ...], nbytes: int) -> bool:
        """Keep `tensors`, evicting least recently used runs of earlier steps to make room; returns whether
        kept (not when the budget is full of runs the current step uses)."""
        self.seen.pop((module, key), None)
        old = self._d.pop((module, key), None)
        if old is not None:
            self.used -= old[1]
        if not self.make_room(nbytes):
            return False
        self._d[(module, key)] = (tensors, nbytes, self.epoch)
        self.used += nbytes
        return True

    def make_room(self, nbytes: int) -> bool:
        """Evict runs of earlier steps (least recently used first) until `nbytes` more fit; False (nothing
        evicted) when they cannot: the budget is held by what this step uses."""
        if self.used + nbytes <= self.max_bytes:
            return True
        stale = sum(n for _, n, ep in self._d.values() if ep != self.epoch)
        if self.used - stale + nbytes > self.max_bytes:
            return False
        while self.used + nbytes > self.max_bytes:
            k, (_, n, ep) = next(iter(self._d.items()))
            if ep == self.epoch:  # LRU order: everything left is in use by this step
                return False
            del self._d[k]
            self.used -= n
            self.evictions += 1
        return True

    def second_sight(self, module: Any, key: Any) -> bool:
        """Whether run `key` of `module` was asked for by an earlier step; else note it (`store` forgets it)."""
        k = (module, key)
        if k in self.seen:
            return True
        self.seen[k] = None
        if len(self.seen) > self.MAX_SEEN:
            self.seen.popitem(last=False)
        return False

    def clear(self) -> None:
        self._d.clear()
        self.seen.clear()
        self.used = 0

    @property
    def gathered(self) -> dict[Any, tuple[torch.Tensor, ...]]:
        """Single slots on scattered pages gathered once, kept with the runs: (module, slot, rank) -> (A, Bᵀ)."""
        return {(m, k[1], k[2]): e[0] for (m, k), e in self._d.items() if isinstance(k, tuple) and k[:1] == ("slot",)}

    def __len__(self) -> int:
        """Stacked runs kept (gathered single slots not counted)."""
        return sum(1 for _, k in self._d if not (isinstance(k, tuple) and k[:1] == ("slot",)))


def _apply_stacked(
    x: torch.Tensor, y: torch.Tensor, af: torch.Tensor, bt: torch.Tensor, seg_r: tuple[int, ...],
    src: tuple[slice | torch.Tensor, ...], scales: torch.Tensor, meta: LoRAMeta, cache: tuple[StackCache, Any],
) -> set[int]:
    """Runs of adjacent segments with the same length and rank (decode: one token per sequence, requests
    spread evenly over adapters) as bmm + baddbmm over the run's weights stacked [D, r, K] / [D, r, N].

    Stacking copies weights, so the stacks are cached per module by (slots, rank): a decode batch keeps
    the same adapters step after step. A run is stacked on the second step that asks for it (a one-off
    composition runs per segment, copying nothing) with one index_select per pool. No work on padding: a
    run only holds segments of one rank. Returns the segments done here.
    """
    store, module = cache
    store.begin(meta)
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
            # else over the budget with this step's own runs: per segment (no copy) instead
            if st is None and store.second_sight(module, key) and store.make_room(nbytes):
                idx = _run_rows(meta, src, i, j)
                st = (af.index_select(0, idx).view(d, r, -1),  # [D, r, K]: one gather, not D slices + stack
                      bt.index_select(0, idx).view(d, r, -1),  # [D, r, N]
                      scales[list(slots)].to(x.dtype).view(-1, 1, 1))
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


def _run_rows(meta: LoRAMeta, src: tuple[slice | torch.Tensor, ...], i: int, j: int) -> torch.Tensor:
    """Rows of the flat pools holding segments i..j-1's rank rows, in order (int64; memoised in the step's
    meta: every module of the step shares the page table, so this is built once per step and run)."""
    key = ("run_rows", id(src), i, j)
    hit = meta.memo.get(key)
    if hit is not None and hit[0] is src:
        return hit[1]
    parts = [torch.arange(s.start, s.stop) if isinstance(s, slice) else s for s in src[i:j]]
    idx = torch.cat(parts)
    meta.memo[key] = (src, idx)
    return idx
