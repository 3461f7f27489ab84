"""Prefix caching in the allocator and scheduler: pure Python, driven by a fake runner whose "KV" records
exactly what real K/V depend on (adapter version, position and every token up to it)."""

from __future__ import annotations

import random

import pytest

from server.engine.block_manager import BlockAllocator
from server.engine.prefix_cache import block_key
from server.engine.scheduler import Scheduler
from server.engine.sequence import SamplingParams, SeqStatus, Sequence
from server.engine.slots import SlotManager


def seq(prompt: list[int], max_tokens: int = 4, key=None, *, virtual: int = 0, prefix: int = 0,
        pages: int = 0) -> Sequence:
    s = Sequence(request_id=f"r{random.random()}", prompt_ids=list(prompt),
                 params=SamplingParams(max_tokens=max_tokens), num_virtual=virtual, num_prefix=prefix,
                 adapter_pages=pages)
    s.adapter_key = key
    return s


class FakeKV:
    """The KV cache as a dict: flat slot -> (adapter key, position, all token ids up to and including it).

    Real K/V at a position depend on exactly that (for a fixed base model), so a sequence reading a slot
    whose record differs from its own would be served someone else's KV."""

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.slots: dict[int, tuple] = {}

    def record(self, s: Sequence, pos: int) -> tuple:
        return (s.adapter_key, pos, tuple(s.token_ids(0, pos + 1)))

    def write(self, s: Sequence, start: int, n: int, alloc: BlockAllocator) -> None:
        for p in range(start, start + n):
            b = s.block_table[p // self.bs]
            assert alloc.refs(b) == 1, f"writing position {p} into block {b} shared by {alloc.refs(b)} sequences"
            self.slots[b * self.bs + p % self.bs] = self.record(s, p)

    def check_context(self, s: Sequence, upto: int) -> None:
        for p in range(upto):
            got = self.slots.get(s.block_table[p // self.bs] * self.bs + p % self.bs)
            assert got == self.record(s, p), f"position {p} of {s.request_id} reads KV of {got!r:.80}"


def step(sched: Scheduler, kv: FakeKV | None = None, token: int = 7) -> list:
    out = sched.schedule()
    for slot, _ in out.stages:  # loader-thread loads land before the next step
        sched.slots.loaded(slot)
    for q in out.parks:  # and so do parked ones (weights written ahead of a slot)
        sched.slots.parked_landed(q.adapter_key)
    for c in out.chunks:  # one forward: every chunk reads KV computed by earlier steps only
        assert c.start == c.seq.num_computed and c.num_tokens >= 1
        assert len(c.seq.block_table) * sched.allocator.block_size >= c.start + c.num_tokens
        if kv is not None:
            kv.check_context(c.seq, c.start)
    for c in out.chunks:
        if kv is not None:
            kv.write(c.seq, c.start, c.num_tokens, sched.allocator)
        c.seq.num_computed += c.num_tokens
    for c in out.chunks:
        if c.want_logits:
            c.seq.output_ids.append(token)
            if len(c.seq.output_ids) >= c.seq.params.max_tokens:
                sched.finish(c.seq, "length")
    return out.chunks


def drain(sched: Scheduler, kv: FakeKV | None = None) -> None:
    for _ in range(10_000):
        if not sched.has_work:
            return
        step(sched, kv)
    raise AssertionError("scheduler made no progress")


def test_allocator_lru_counts_and_eviction_order():
    a = BlockAllocator(4, 2)
    b = a.allocate(3)
    assert a.register(b[0], "k0") and a.register(b[1], "k1")
    assert not a.register(b[2], "k0")  # another block holds k0: this one stays private
    a.free(reversed(b))  # tail first
    assert (a.num_empty, a.num_cached_idle, a.num_used, a.num_free) == (2, 2, 0, 4)
    assert a.lookup(["k0", "k1", "k2"]) == b[:2]
    a.touch([b[0]])
    assert a.refs(b[0]) == 1 and a.num_used == 1 and a.num_cached_idle == 1
    got = a.allocate(3)  # 2 empty blocks, then the LRU evicts k1 (k0 is in use)
    assert b[1] in got and a.evictions == 1 and a.lookup(["k0", "k1"]) == [b[0]]
    assert a.num_empty + a.num_cached_idle + a.num_used == a.num_blocks
    with pytest.raises(ValueError, match="not in use"):
        a.free(got)
        a.register(got[0], "k9")
    with pytest.raises(ValueError, match="freed twice"):
        a.free([got[0]])


def test_block_key_chains_tokens_and_adapter_version():
    k = block_key(None, [1, 2], None)
    assert k == block_key(None, [1, 2], None)
    assert k != block_key(None, [1, 2], ("a", 1, 5))
    assert block_key(None, [1, 2], ("a", 1, 5)) != block_key(None, [1, 2], ("a", 1, 6))  # same name+version, new id
    assert block_key(k, [3, 4], None) != block_key(None, [3, 4], None)  # position/prefix is part of the key
    assert block_key(None, [1, 2], None) != block_key(None, [2, 1], None)


def test_second_sequence_prefills_only_its_uncached_suffix():
    alloc = BlockAllocator(32, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_batch_tokens=64)
    kv = FakeKV(4)
    system = list(range(10, 22))  # 3 full blocks
    a = seq(system + [1, 2], max_tokens=2)
    sched.add(a)
    drain(sched, kv)
    assert alloc.num_used == 0 and alloc.num_cached >= 3
    b = seq(system + [3, 4, 5], max_tokens=2)
    sched.add(b)
    first = step(sched, kv)
    assert [(c.start, c.num_tokens) for c in first] == [(12, 3)]  # 12 cached tokens, 3 computed
    assert sched.prefix_cache.hit_tokens == 12 and b.num_cache_hit == 12 and b.num_cache_queried == 15
    drain(sched, kv)
    assert alloc.num_used == 0


def test_fully_cached_prompt_still_computes_its_last_token():
    alloc = BlockAllocator(32, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_batch_tokens=64)
    kv = FakeKV(4)
    p = list(range(30, 38))  # exactly 2 blocks
    sched.add(seq(p, max_tokens=3))
    drain(sched, kv)
    again = seq(p, max_tokens=3)
    sched.add(again)
    first = step(sched, kv)
    assert [(c.start, c.num_tokens, c.want_logits) for c in first] == [(4, 4, True)]  # block 2 is recomputed
    drain(sched, kv)


def test_only_computed_kv_is_reused():
    """A block is reusable once every position in it has been computed: not while its prompt is still being
    prefilled in chunks, and not when its last position is a sampled token that was never fed back."""
    alloc = BlockAllocator(64, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_batch_tokens=10)
    kv = FakeKV(4)
    p = list(range(1, 25))
    a = seq(p, max_tokens=2)
    sched.add(a)
    step(sched, kv)
    step(sched, kv)  # a: 20 of 24 prompt tokens computed, in chunks of the budget
    b = seq(p + [90] * 8, max_tokens=2)
    sched.add(b)
    chunks = step(sched, kv)  # a's last 4 prompt tokens and b in one step
    assert [(c.seq is b, c.start, c.num_tokens) for c in chunks] == [(False, 20, 4), (True, 20, 6)]
    drain(sched, kv)
    c = seq([50, 51, 52], max_tokens=1)  # 4 tokens once sampled; the 4th was never computed
    sched.add(c)
    drain(sched, kv)
    d = seq([50, 51, 52, 7, 60], max_tokens=1)
    sched.add(d)
    assert [(ch.start, ch.num_tokens) for ch in step(sched, kv)] == [(0, 5)]
    drain(sched, kv)


@pytest.mark.parametrize("other", [("lora-b", 1, 2), ("lora-a", 2, 3), ("lora-a", 1, 9), None])
def test_no_sharing_across_adapters_versions_or_base(other):
    """Same tokens on another adapter, another version, a re-registration of the same name+version, or the
    base model: nothing is reused."""
    alloc = BlockAllocator(64, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_batch_tokens=64, slots=SlotManager(4))
    kv = FakeKV(4)
    p = list(range(1, 21))
    sched.add(seq(p, max_tokens=2, key=("lora-a", 1, 1)))
    drain(sched, kv)
    b = seq(p, max_tokens=2, key=other)
    sched.add(b)
    assert [(c.start, c.num_tokens) for c in step(sched, kv)] == [(0, 20)]
    assert b.num_cache_hit == 0
    drain(sched, kv)
    c = seq(p, max_tokens=2, key=other)  # and the same adapter again does hit its own blocks
    sched.add(c)
    assert [(ch.start, ch.num_tokens) for ch in step(sched, kv)] == [(16, 4)]


def test_prompt_tuning_virtual_tokens_key_with_the_adapter():
    """Virtual tokens read as id 0 in the key; a base prompt that really starts with zeros must not hit them."""
    alloc = BlockAllocator(64, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_batch_tokens=64, slots=SlotManager(4))
    kv = FakeKV(4)
    sched.add(seq([5, 6, 7, 8, 9], max_tokens=2, key=("pt", 1, 1), virtual=4))
    drain(sched, kv)
    base = seq([0, 0, 0, 0, 5, 6, 7, 8, 9], max_tokens=2)
    sched.add(base)
    assert [(c.start, c.num_tokens) for c in step(sched, kv)] == [(0, 9)]
    drain(sched, kv)


def test_caching_off_reuses_nothing():
    alloc = BlockAllocator(32, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_batch_tokens=64, prefix_caching=False)
    p = list(range(1, 14))
    for _ in range(2):
        sched.add(seq(p, max_tokens=2))
        assert [(c.start, c.num_tokens) for c in step(sched)] == [(0, 13)]
        drain(sched)
    assert alloc.num_cached == 0 and alloc.num_free == 32


def test_lru_keeps_cached_blocks_until_the_allocator_needs_them():
    alloc = BlockAllocator(8, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_batch_tokens=64)
    p = list(range(1, 13))
    sched.add(seq(p, max_tokens=1))
    drain(sched)
    cached = alloc.num_cached
    assert cached == 3 and alloc.num_free == 8 and alloc.evictions == 0
    sched.add(seq(list(range(50, 70)), max_tokens=1))  # 5 blocks: the 5 empty ones, no eviction
    drain(sched)
    assert alloc.evictions == 0 and alloc.lookup(sched.prefix_cache.keys(seq(p), 3)) != []
    sched.add(seq(list(range(100, 128)), max_tokens=1))  # 7 blocks: evicts the oldest cached ones
    drain(sched)
    assert alloc.evictions > 0 and alloc.num_empty + alloc.num_cached_idle == 8


@pytest.mark.parametrize("stage", [False, True], ids=["sync-loads", "staged-loads"])
@pytest.mark.parametrize("seed", range(8))
def test_fuzz_caching_preemption_aborts_and_adapter_churn(seed, stage):
    """Base, LoRA, prefix-tuning and prompt-tuning sequences over a few shared prompt heads, adapters replaced
    by new versions as they run, a KV pool small enough to preempt and evict, random aborts. Every step:
    every block's refcount equals its holders, empty + cached idle + used = all blocks, no position is
    written into a shared block, and every position a chunk attends over holds that sequence's own KV
    (same adapter version, position and tokens) — i.e. no cache hit ever served another adapter's KV."""
    rng = random.Random(seed)
    bs = 4
    alloc = BlockAllocator(16, bs)
    slots = SlotManager(4, num_pages=6)  # adapter pages: lora-a 1, lora-b 3, lora-c 2, lora-d 4 (14 > 6)
    pages = {"lora-a": 1, "lora-b": 3, "lora-c": 2, "lora-d": 4}
    sched = Scheduler(alloc, max_num_seqs=6, max_batch_tokens=24, slots=slots, stage_loads=stage)
    kv = FakeKV(bs)
    heads = [[rng.randrange(1, 50) for _ in range(rng.randint(4, 14))] for _ in range(3)]
    version = {name: 1 for name in ("lora-a", "lora-b", "lora-c", "lora-d", "prefix", "prompt")}
    landing: list[int] = []  # staged loads land one step later (the loader thread ran during that step)
    parking: list = []  # so do parked ones
    uid = iter(range(1000, 10**6))
    current = {name: (name, 1, next(uid)) for name in version}
    live: list[Sequence] = []
    preempted = 0

    def new_seq() -> Sequence:
        prompt = rng.choice(heads) + [rng.randrange(1, 50) for _ in range(rng.randint(0, 6))]
        kind = rng.choice(["base", "lora-a", "lora-b", "lora-c", "lora-d", "prefix", "prompt"])
        key = None if kind == "base" else current[kind]
        return seq(prompt, rng.randint(1, 10), key, virtual=3 if kind == "prompt" else 0,
                   prefix=5 if kind == "prefix" else 0, pages=pages.get(kind, 0))

    for _ in range(120):
        if rng.random() < 0.6:
            s = new_seq()
            live.append(s)
            sched.add(s)
        if rng.random() < 0.05:  # PUT: a new version (new registration id) of one adapter
            name = rng.choice(list(version))
            version[name] += 1
            current[name] = (name, version[name], next(uid))
        for slot in landing:
            slots.loaded(slot)
        for key in parking:
            slots.parked_landed(key)
        out = sched.schedule()
        landing = [slot for slot, _ in out.stages]
        parking = [q.adapter_key for q in out.parks]
        for slot, q in out.stages:  # a staged slot is held for its adapter and used by nobody until it lands
            assert slots.is_loading(q.adapter_key) and slots.refs(slot) == 0
        preempted += len(out.preempted)
        _check_pages(sched, out)
        for c in out.chunks:
            assert c.seq.status is SeqStatus.RUNNING and c.start == c.seq.num_computed
            assert len(c.seq.block_table) * bs >= c.start + c.num_tokens
            kv.check_context(c.seq, c.start)
        for c in out.chunks:
            kv.write(c.seq, c.start, c.num_tokens, alloc)
            c.seq.num_computed += c.num_tokens
        for c in out.chunks:
            if c.want_logits:
                c.seq.output_ids.append(rng.randrange(1, 50))
                if len(c.seq.output_ids) >= c.seq.params.max_tokens:
                    sched.finish(c.seq, "length")
        if rng.random() < 0.1:  # a client goes away (waiting or running)
            victims = [s for s in live if s.status is not SeqStatus.FINISHED]
            if victims:
                sched.finish(rng.choice(victims), "abort")
        _check_refcounts(sched)
        if not sched.has_work and len(live) > 60:
            break
    for slot in landing:
        slots.loaded(slot)
    for key in parking:
        slots.parked_landed(key)
    drain(sched, kv)
    _check_refcounts(sched)
    slots.check()
    assert slots.pages_free + slots.idle_pages() == slots.num_pages  # nothing in use: every page is reclaimable
    assert slots.evictions > 0  # pages were short
    # synchronous loads: adapters were loaded ahead of need (staged, admission itself starts loads early)
    assert stage or slots.prefetches > 0
    assert alloc.num_used == 0 and slots.num_in_use == 0 and not sched.slot_blocks
    assert alloc.num_free == alloc.num_blocks
    assert sched.prefix_cache.hit_tokens > 0  # caching was exercised, not just harmless
    assert preempted > 0 and alloc.evictions > 0  # the pool was short: preemption and LRU eviction both ran


def _check_pages(sched: Scheduler, out) -> None:
    """Adapter pages: free + used = the pool, no page held twice, every running adapter sequence sits in the
    slot of its own adapter version holding the pages its rank needs, and a slot emptied for its pages is
    used by no running sequence."""
    sm = sched.slots
    sm.check()
    refs = {}
    for s in sched.running:
        if s.adapter_key is not None:
            assert sm.key_at(s.slot) == s.adapter_key and len(sm.pages_of(s.slot)) == s.adapter_pages
            refs[s.slot] = refs.get(s.slot, 0) + 1
    assert all(sm.refs(slot) == n for slot, n in refs.items())
    assert sm.num_in_use == len(refs)
    loaded = {slot for slot, _ in out.loads}
    for slot in out.cleared:
        assert slot in loaded or sm.key_at(slot) is None or slot not in refs


def _check_refcounts(sched: Scheduler) -> None:
    alloc = sched.allocator
    holders = [0] * alloc.num_blocks
    for s in sched.running:
        for b in s.block_table:
            holders[b] += 1
    for s in sched.waiting:
        assert not s.block_table and s.num_computed == 0
    for blocks in sched.slot_blocks.values():
        for b in blocks:
            holders[b] += 1
    assert holders == [alloc.refs(b) for b in range(alloc.num_blocks)]
    assert alloc.num_used == sum(1 for h in holders if h)
    assert alloc.num_empty + alloc.num_cached_idle + alloc.num_used == alloc.num_blocks
