"""KV block allocator: refcounted fixed-size blocks, with an LRU of cached blocks nobody uses. Pure Python.

Every block is in exactly one of three states:
- empty: on the free list, holds nothing worth keeping;
- used: referenced by at least one running sequence (or a prefix adapter's shared prefix);
- cached idle: unreferenced, but its KV is registered under a content key (see prefix_cache.py), so a
  later sequence may pick it up again. These sit in an LRU and are evicted (their key dropped) only
  when `allocate` runs out of empty blocks.

`num_free` counts what `allocate` can hand out: empty + cached idle blocks. So
`num_empty + num_cached_idle + num_used == num_blocks` always.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._empty: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._num_used = 0
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; least recently freed first
        self._key_of: dict[int, Hashable] = {}  # block -> content key (cached blocks, used or idle)
        self._block_of: dict[Hashable, int] = {}  # content key -> block
        self.evictions = 0  # cached blocks whose key was dropped to make room

    # ---- counts -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out now (empty + cached idle)."""
        return len(self._empty) + len(self._idle)

    @property
    def num_used(self) -> int:
        return self._num_used

    @property
    def num_empty(self) -> int:
        return len(self._empty)

    @property
    def num_cached_idle(self) -> int:
        return len(self._idle)

    @property
    def num_cached(self) -> int:
        """Blocks holding registered (reusable) KV, in use or idle."""
        return len(self._key_of)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    # ---- allocate / free ------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """n blocks with one reference each; empty blocks first, then the least recently used cached ones."""
        if n > self.num_free:
            raise MemoryError(f"need {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._empty:
                b = self._empty.popleft()
            else:
                b, _ = self._idle.popitem(last=False)
                del self._block_of[self._key_of.pop(b)]
                self.evictions += 1
            self._refs[b] = 1
            out.append(b)
        self._num_used += n
        return out

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block. An unreferenced block goes to the LRU if it is cached, else
        to the empty list. Free a sequence's table tail first (reversed) so its tail is evicted first."""
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} freed twice or never allocated")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._num_used -= 1
                if b in self._key_of:
                    self._idle[b] = None
                else:
                    self._empty.append(b)

    # ---- content-addressed reuse ------------------------------------------------------------------
    def lookup(self, keys: Iterable[Hashable]) -> list[int]:
        """Blocks of the longest run of `keys`, from the first, that are cached. Takes no reference."""
        out = []
        for k in keys:
            b = self._block_of.get(k)
            if b is None:
                break
            out.append(b)
        return out

    def touch(self, blocks: Iterable[int]) -> None:
        """Take one reference on each cached block (from lookup); an idle one leaves the LRU."""
        for b in blocks:
            if b not in self._key_of:
                raise ValueError(f"block {b} is not cached")
            if self._refs[b] == 0:
                del self._idle[b]
                self._num_used += 1
            self._refs[b] += 1

    def register(self, block: int, key: Hashable) -> bool:
        """Record that a used block holds the KV for `key`. False (nothing recorded) if another block
        already holds that key, or this block already has one."""
        if self._refs[block] <= 0:
            raise ValueError(f"block {block} is not in use; only computed KV of a live block can be cached")
        if key in self._block_of or block in self._key_of:
            return False
        self._block_of[key] = block
        self._key_of[block] = key
        return True

    def is_cached(self, key: Hashable) -> bool:
        return key in self._block_of
