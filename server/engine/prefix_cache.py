"""Automatic prefix caching: full KV blocks are content-addressed, so a new sequence reuses the KV of
any earlier sequence that began with the same tokens *on the same adapter version*.

Key of block i of a sequence = sha256(key of block i-1, adapter version key, token ids of block i).
The chain makes a key stand for the whole prefix up to the block's end (and so for its positions).

What the adapter version key is, and why it is enough:
- base model: None. LoRA (any target): the registry's (name, version, registration id): a LoRA on
  q/k/v changes K/V directly, on any other layer it changes the hidden states that later layers' K/V
  are computed from, so its blocks are never shared with base or another adapter/version.
- prefix tuning: the same key. Its virtual K/V live in the adapter's own shared blocks (never cached
  here), but every own token attends to them and is RoPE-shifted by their count, so its blocks are
  keyed by the adapter version like LoRA's.
- prompt tuning / p-tuning: the same key. Virtual tokens are the first `num_virtual` positions of the
  sequence's own KV and read as token id 0 in the key; the adapter version fixes both their count and
  their embeddings, so equal (key chain, ids) still means equal KV.
The registration id changes on every PUT, delete + re-upload, or restart-time register, so a replaced
version can never hit its predecessor's blocks, even under the same name and version number.

Pure Python: the scheduler calls `match` when it admits a sequence and `commit` once the KV of whole
blocks has been computed; the allocator (block_manager.py) holds the refcounts and the LRU.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Hashable

from server.engine.block_manager import BlockAllocator
from server.engine.sequence import Sequence

_ROOT = bytes(32)


def block_key(parent: bytes | None, token_ids: list[int], adapter_key: Hashable) -> bytes:
    """Content key of one full block: fixed-width fields, so no two inputs share an encoding."""
    tag = repr(adapter_key).encode()
    h = hashlib.sha256(parent or _ROOT)
    h.update(len(tag).to_bytes(4, "little"))
    h.update(tag)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class PrefixCache:
    """Finds and records reusable full blocks for sequences; counts queried and hit tokens."""

    def __init__(self, allocator: BlockAllocator) -> None:
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.queried_tokens = 0  # every admission (re-admissions after preemption included)
        self.hit_tokens = 0

    def keys(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Keys of the sequence's first `num_blocks` full blocks (computed once, kept on the sequence)."""
        keys, bs = seq.block_keys, self.block_size
        while len(keys) < num_blocks:
            i = len(keys)
            keys.append(block_key(keys[-1] if keys else None, seq.token_ids(i * bs, bs), seq.adapter_key))
        return keys[:num_blocks]

    def match(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest cached prefix of `seq`, without taking references. The last
        token is never covered: at least one token is computed, so there are logits to sample."""
        cap = (seq.num_tokens - 1) // self.block_size
        return self.allocator.lookup(self.keys(seq, cap)) if cap > 0 else []

    def admitted(self, seq: Sequence, hit_blocks: int) -> None:
        """Count one admission; the first one of a request is kept on it for per-adapter metrics."""
        hit = hit_blocks * self.block_size
        self.queried_tokens += seq.num_tokens
        self.hit_tokens += hit
        if seq.num_cache_queried == 0:
            seq.num_cache_queried, seq.num_cache_hit = seq.num_tokens, hit
        seq.num_registered = hit_blocks

    def commit(self, seq: Sequence) -> None:
        """Register every block of `seq` whose tokens have all been computed (KV written) and are not yet
        registered. A key some other block already holds leaves this block private."""
        full = min(seq.num_computed // self.block_size, len(seq.block_table))
        if full <= seq.num_registered:
            return
        keys = self.keys(seq, full)
        for i in range(seq.num_registered, full):
            self.allocator.register(seq.block_table[i], keys[i])
        seq.num_registered = full
