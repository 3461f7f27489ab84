"""Device adapter residency: which adapter version sits in which slot and on which pages, who uses it, LRU
among idle ones.

Pure Python. Residency is a memory budget: LoRA-like adapters (`Adapter.page_rank`) hold pages of one
device pool (`server/model/adapter_pages.py`), as many as their own rank needs (ceil(r / page_rank)); the
slot is only their row in the per-slot tables (rank, scale, page table), and `num_slots` is the optional
`--max-adapters` cap. Adapters of other families take a slot and no pages. A slot in use by a running
sequence is never reassigned, and its pages never move.

Parking (issue 18: a slot cap tighter than memory). When every slot is busy but pages are free, the next
adapter a waiting request needs can be *parked*: its weights are written into free pages by the loader thread
with no slot (`park`, counted as a load). When a slot frees, `take_parked` gives it the slot; what is left is
activation (its page-table row, ranks and scales): no slot waits idle for weights. A parked adapter whose
write has landed is reclaimable like an idle one (after idle ones); one being written is not.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Hashable


class SlotManager:
    def __init__(self, num_slots: int, num_pages: int | None = None) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        if num_pages is not None and num_pages < 0:
            raise ValueError(f"num_pages={num_pages} must be >= 0")
        self.num_slots = num_slots
        self.num_pages = num_pages  # None: pages never limit residency (a pool of unbounded size)
        self._key: list[Hashable | None] = [None] * num_slots
        self._refs = [0] * num_slots
        self._pages: list[list[int]] = [[] for _ in range(num_slots)]
        self._slot_of: dict[Hashable, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # resident, unused slots; oldest first
        self._free_pages: set[int] = set(range(num_pages or 0))
        self._cleared: list[int] = []  # slots emptied by an eviction, to be cleared on the device
        self._loading: set[int] = set()  # slots whose weights a loader thread is writing (not evictable, not usable)
        self._parked: OrderedDict[Hashable, list[int]] = OrderedDict()  # weights in pages, no slot; oldest first
        self._parking: set[Hashable] = set()  # parked adapters a loader thread is still writing
        self._dropped: list[Hashable] = []  # parked adapters reclaimed before a slot took them (engine forgets them)
        self.loads = 0
        self.evictions = 0
        self.prefetches = 0
        self.activations = 0  # parked adapters that took a slot (no weights written then)

    def slot_of(self, key: Hashable) -> int | None:
        return self._slot_of.get(key)

    def refs(self, slot: int) -> int:
        return self._refs[slot]

    def key_at(self, slot: int) -> Hashable | None:
        return self._key[slot]

    def pages_of(self, slot: int) -> list[int]:
        """The pool pages of the adapter in `slot` (its rank rows, in order)."""
        return list(self._pages[slot])

    @property
    def num_in_use(self) -> int:
        return sum(1 for r in self._refs if r > 0)

    @property
    def num_resident(self) -> int:
        return len(self._slot_of)

    @property
    def pages_free(self) -> int:
        return len(self._free_pages)

    @property
    def pages_used(self) -> int:
        return sum(len(p) for p in self._pages) + sum(len(p) for p in self._parked.values())

    @property
    def slot_available(self) -> bool:
        """A slot is free or held by an idle adapter."""
        return None in self._key or bool(self._idle)

    @property
    def free_slots(self) -> int:
        """Slots holding no adapter (taking one evicts nothing)."""
        return sum(1 for k in self._key if k is None)

    def idle_pages(self, exclude: Collection[Hashable] = ()) -> int:
        """Pages held by idle adapters and landed parked ones (reclaimable), but those in `exclude`."""
        return (sum(len(self._pages[s]) for s in self._idle if self._key[s] not in exclude)
                + sum(len(p) for k, p in self._parked.items() if k not in self._parking and k not in exclude))

    def take_cleared(self) -> list[int]:
        """Slots emptied by evictions since the last call (the engine clears them before the next step)."""
        out, self._cleared = self._cleared, []
        return out

    def _fits(self, pages: int, protect: Collection[Hashable]) -> tuple[list[int], list[Hashable]] | None:
        """The idle slots (oldest first), then landed parked adapters, to evict so that a slot and `pages` pages
        are free, or None."""
        need_slot = None not in self._key
        have = len(self._free_pages) if self.num_pages is not None else pages
        chosen: list[int] = []
        for s in self._idle:
            if not need_slot and have >= pages:
                break
            if self._key[s] in protect:
                continue
            chosen.append(s)
            have += len(self._pages[s])
            need_slot = False
        dropped: list[Hashable] = []
        for k, ps in self._parked.items():
            if need_slot or have >= pages:
                break
            if k in protect or k in self._parking:
                continue
            dropped.append(k)
            have += len(ps)
        if need_slot or have < pages:
            return None
        return chosen, dropped

    def can_acquire(self, key: Hashable, pages: int = 0, protect: Collection[Hashable] = ()) -> bool:
        if key in self._parked:  # its pages are written: only a slot is needed
            return key not in self._parking and self._fits(0, protect) is not None
        return key in self._slot_of or self._fits(pages, protect) is not None

    def is_loading(self, key: Hashable) -> bool:
        slot = self._slot_of.get(key)
        return (slot is not None and slot in self._loading) or key in self._parking

    # ---- parking: weights ahead of a slot (module docstring) ----------------------------------------
    def is_parked(self, key: Hashable) -> bool:
        return key in self._parked

    def parked_pages(self, key: Hashable) -> list[int]:
        return list(self._parked[key])

    def park(self, key: Hashable, pages: int) -> list[int] | None:
        """Take `pages` free pages for `key`'s weights, with no slot (a loader thread writes them: `is_loading`
        until `parked_landed`). Only free pages: parking never evicts. Returns the pages, or None."""
        if (pages < 1 or self.num_pages is None or key in self._slot_of or key in self._parked
                or len(self._free_pages) < pages):
            return None
        got = self._take_pages(pages)
        self._parked[key] = got
        self._parking.add(key)
        self.loads += 1
        return got

    def parked_landed(self, key: Hashable) -> None:
        self._parking.discard(key)

    def drop_parked(self, key: Hashable) -> bool:
        """Free a parked adapter's pages (failed write, deleted version, or reclaimed). False if not parked."""
        ps = self._parked.pop(key, None)
        if ps is None:
            return False
        self._parking.discard(key)
        self._free_pages.update(ps)
        return True

    def take_dropped(self) -> list[Hashable]:
        """Parked adapters reclaimed for others' pages since the last call (their staged state is stale)."""
        out, self._dropped = self._dropped, []
        return out

    def take_parked(self, key: Hashable, protect: Collection[Hashable] = ()) -> tuple[int, Hashable | None] | None:
        """Give a landed parked adapter a slot (free, else the least recently used idle one's) and a reference.
        Returns (slot, evicted_key), or None when no slot is free or idle. The caller activates it there."""
        if key not in self._parked or key in self._parking:
            return None
        fit = self._fits(0, protect)
        if fit is None:
            return None
        slot, evicted = self._seat(key, fit[0], refs=1)
        self._pages[slot] = self._parked.pop(key)
        self.activations += 1
        return slot, evicted

    def loaded(self, slot: int) -> None:
        """A staged load finished: the adapter is usable, idle (most recently used) until referenced."""
        self._loading.discard(slot)
        if self._refs[slot] == 0 and self._key[slot] is not None:
            self._idle[slot] = None

    def load_failed(self, slot: int) -> Hashable | None:
        """A staged load failed: free its slot and pages. Returns the adapter key."""
        self._loading.discard(slot)
        key = self._key[slot]
        if key is not None:
            del self._slot_of[key]
            self._key[slot] = None
            self._free_pages.update(self._pages[slot])
            self._pages[slot] = []
            self._idle.pop(slot, None)
        return key

    def acquire(self, key: Hashable, pages: int = 0, protect: Collection[Hashable] = (), *, stage: bool = False
                ) -> tuple[int, Hashable | None, bool] | None:
        """Take a reference on `key`'s slot, loading it onto `pages` free pages if not resident (evicting idle
        adapters, least recently used first, never one in `protect`). Returns (slot, evicted_key,
        needs_load), or None if even evicting every idle adapter would not make room. evicted_key is the
        adapter that had the returned slot (others evicted for their pages are in `take_cleared`).

        `stage`: a load goes to a loader thread; no reference is taken, and the slot is neither evictable nor
        usable (`is_loading`) until `loaded(slot)`."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self._refs[slot] += 1
            self._idle.pop(slot, None)
            return slot, None, False
        fit = self._fits(pages, protect)
        if fit is None:
            return None
        victims, reclaimed = fit
        for k in reclaimed:  # landed parked adapters give back their pages (after every idle one)
            self._reclaim_parked(k)
            self.evictions += 1
        slot, evicted = self._seat(key, victims, refs=0 if stage else 1)
        if stage:
            self._loading.add(slot)
        self._pages[slot] = self._take_pages(pages)
        self.loads += 1
        return slot, evicted, True

    def _seat(self, key: Hashable, victims: list[int], refs: int) -> tuple[int, Hashable | None]:
        """Evict `victims` and give `key` a free slot, else the least recently used victim's (reused at once:
        not cleared). Returns (slot, the adapter evicted from that slot or None); the caller sets its pages."""
        free = [i for i, k in enumerate(self._key) if k is None]
        evicted_by_slot = {v: self._evict(v) for v in victims}
        slot = free[0] if free else victims[0]
        evicted = evicted_by_slot.get(slot)
        if evicted is not None:
            self._cleared.remove(slot)  # its new adapter replaces it: nothing to clear
        self._key[slot] = key
        self._slot_of[key] = slot
        self._refs[slot] = refs
        return slot, evicted

    def _reclaim_parked(self, key: Hashable) -> None:
        """Free a landed parked adapter's pages; the engine forgets its staged state (`take_dropped`)."""
        self.drop_parked(key)
        self._dropped.append(key)

    def _evict(self, slot: int) -> Hashable:
        key = self._key[slot]
        del self._slot_of[key]
        self._key[slot] = None
        self._idle.pop(slot, None)
        self._free_pages.update(self._pages[slot])
        self._pages[slot] = []
        self._cleared.append(slot)
        self.evictions += 1
        return key

    def _take_pages(self, n: int) -> list[int]:
        """n free pages: the first run of n consecutive ones (kernels on CPU then read one block), else the
        lowest n."""
        if n == 0 or self.num_pages is None:
            return []
        free = sorted(self._free_pages)
        run = 1
        for i in range(len(free)):
            run = run + 1 if i and free[i] == free[i - 1] + 1 else 1
            if run == n:
                got = free[i - n + 1:i + 1]
                break
        else:
            got = free[:n]
        self._free_pages.difference_update(got)
        return got

    def release(self, slot: int) -> None:
        if self._refs[slot] <= 0:
            raise ValueError(f"slot {slot} released more often than acquired")
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            self._idle[slot] = None

    def discard(self, key: Hashable) -> int | None:
        """Forget an idle adapter (deleted or replaced): its slot and pages are free. Returns the slot, or None."""
        slot = self._slot_of.get(key)
        if slot is None and key in self._parked and key not in self._parking:
            self._reclaim_parked(key)
            return None
        if slot is None or self._refs[slot] > 0 or slot in self._loading:
            return None
        del self._slot_of[key]
        self._key[slot] = None
        self._idle.pop(slot, None)
        self._free_pages.update(self._pages[slot])
        self._pages[slot] = []
        return slot

    def check(self) -> None:
        """Invariants (tests): free + used pages = the pool, no page held twice, refs and idle agree."""
        held = [p for ps in self._pages for p in ps] + [p for ps in self._parked.values() for p in ps]
        assert not set(self._parked) & set(self._slot_of), "an adapter both parked and in a slot"
        assert self._parking <= set(self._parked)
        assert len(held) == len(set(held)), "a page is held by two slots"
        assert not set(held) & self._free_pages, "a held page is also free"
        if self.num_pages is not None:
            assert len(held) + len(self._free_pages) == self.num_pages, "free + used pages != pool"
        for s in range(self.num_slots):
            if self._key[s] is None:
                assert self._refs[s] == 0 and s not in self._idle and not self._pages[s]
            else:
                assert self._slot_of[self._key[s]] == s
                assert (s in self._idle) == (self._refs[s] == 0 and s not in self._loading)
