"""Device adapter slots: which adapter version sits in which slot, who uses it, LRU among idle ones.

Pure Python. A slot in use by a running sequence is never reassigned.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class SlotManager:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        self.num_slots = num_slots
        self._key: list[Hashable | None] = [None] * num_slots
        self._refs = [0] * num_slots
        self._slot_of: dict[Hashable, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # resident, unused slots; oldest first
        self.loads = 0
        self.evictions = 0

    def slot_of(self, key: Hashable) -> int | None:
        return self._slot_of.get(key)

    def refs(self, slot: int) -> int:
        return self._refs[slot]

    def key_at(self, slot: int) -> Hashable | None:
        return self._key[slot]

    @property
    def num_in_use(self) -> int:
        return sum(1 for r in self._refs if r > 0)

    @property
    def num_resident(self) -> int:
        return len(self._slot_of)

    def can_acquire(self, key: Hashable) -> bool:
        return key in self._slot_of or None in self._key or bool(self._idle)

    def acquire(self, key: Hashable) -> tuple[int, Hashable | None, bool] | None:
        """Take a reference on `key`'s slot. Returns (slot, evicted_key, needs_load), or None if all busy."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self._refs[slot] += 1
            self._idle.pop(slot, None)
            return slot, None, False
        evicted = None
        if None in self._key:
            slot = self._key.index(None)
        elif self._idle:
            slot, _ = self._idle.popitem(last=False)
            evicted = self._key[slot]
            del self._slot_of[evicted]
            self.evictions += 1
        else:
            return None
        self._key[slot] = key
        self._slot_of[key] = slot
        self._refs[slot] = 1
        self.loads += 1
        return slot, evicted, True

    def release(self, slot: int) -> None:
        if self._refs[slot] <= 0:
            raise ValueError(f"slot {slot} released more often than acquired")
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            self._idle[slot] = None

    def discard(self, key: Hashable) -> int | None:
        """Forget an idle adapter (deleted or replaced). Returns the freed slot, or None."""
        slot = self._slot_of.get(key)
        if slot is None or self._refs[slot] > 0:
            return None
        del self._slot_of[key]
        self._key[slot] = None
        self._idle.pop(slot, None)
        return slot
