"""Scheduler, block allocator and slot manager: pure Python, driven by a fake runner."""

from __future__ import annotations

import random

import pytest

from server.engine.block_manager import BlockAllocator
from server.engine.scheduler import Scheduler
from server.engine.sequence import SamplingParams, SeqStatus, Sequence
from server.engine.slots import SlotManager


def make_seq(n_prompt: int, max_tokens: int = 4, adapter: str | None = None) -> Sequence:
    s = Sequence(request_id=f"r{random.random()}", prompt_ids=list(range(1, n_prompt + 1)),
                 params=SamplingParams(max_tokens=max_tokens))
    s.adapter_key = adapter
    return s


def run_to_completion(sched: Scheduler, seqs: list[Sequence], max_steps: int = 10_000) -> list:
    """Fake runner: every chunk that wants logits yields token 7; a sequence stops at max_tokens."""
    outs = []
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_work:
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
        out = sched.schedule()
        outs.append(out)
        assert out.num_tokens <= sched.max_batch_tokens
        assert len(sched.running) <= sched.max_num_seqs
        for c in out.chunks:
            assert c.start == c.seq.num_computed
            assert len(c.seq.block_table) * sched.allocator.block_size >= c.start + c.num_tokens
            c.seq.num_computed += c.num_tokens
        for c in out.chunks:
            if c.want_logits:
                c.seq.output_ids.append(7)
                if len(c.seq.output_ids) >= c.seq.params.max_tokens:
                    sched.finish(c.seq, "length")
    return outs


def test_all_finish_and_blocks_return():
    alloc = BlockAllocator(64, 4)
    sched = Scheduler(alloc, max_num_seqs=8, max_batch_tokens=32)
    seqs = [make_seq(random.randint(1, 20), random.randint(1, 10)) for _ in range(40)]
    run_to_completion(sched, seqs)
    assert all(s.status is SeqStatus.FINISHED for s in seqs)
    assert all(len(s.output_ids) == s.params.max_tokens for s in seqs)
    assert alloc.num_free == 64 and alloc.num_used == 0


def test_prefill_is_chunked_under_the_token_budget():
    alloc = BlockAllocator(64, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_batch_tokens=8)
    s = make_seq(20, 2)
    outs = run_to_completion(sched, [s])
    first = [c.num_tokens for o in outs for c in o.chunks]
    assert first[:3] == [8, 8, 4]  # prompt of 20 in chunks of the budget, then decodes of 1
    assert first[3:] == [1]


def test_decode_and_prefill_share_a_step():
    alloc = BlockAllocator(64, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_batch_tokens=16)
    a = make_seq(4, 5)
    sched.add(a)
    out = sched.schedule()
    a.num_computed += 4
    a.output_ids.append(7)
    b = make_seq(6, 2)
    b.prompt_ids = list(range(101, 107))  # not a's prompt: nothing to reuse from the prefix cache
    sched.add(b)
    out = sched.schedule()
    assert [(c.seq is a, c.num_tokens) for c in out.chunks] == [(True, 1), (False, 6)]


def test_out_of_blocks_preempts_newest_and_everything_still_finishes():
    alloc = BlockAllocator(6, 4)  # 24 tokens of KV: far too few for all at once
    sched = Scheduler(alloc, max_num_seqs=4, max_batch_tokens=64)
    seqs = [make_seq(5, 12) for _ in range(4)]
    outs = run_to_completion(sched, seqs)
    assert sum(len(o.preempted) for o in outs) > 0
    assert all(len(s.output_ids) == 12 for s in seqs)
    assert alloc.num_free == 6


def test_adapter_slots_lru_and_never_reassigned_while_in_use():
    alloc = BlockAllocator(256, 4)
    slots = SlotManager(2)
    sched = Scheduler(alloc, max_num_seqs=8, max_batch_tokens=64, slots=slots)
    seqs = [make_seq(3, 6, adapter=f"a{i % 6}") for i in range(18)]
    sched_outs = []
    for s in seqs:
        sched.add(s)
    while sched.has_work:
        out = sched.schedule()
        sched_outs.append(out)
        in_use = {s.slot: s.adapter_key for s in sched.running if s.slot >= 0}
        # a slot never holds two adapters among running sequences
        for s in sched.running:
            assert slots.key_at(s.slot) == s.adapter_key == in_use[s.slot]
        for c in out.chunks:
            c.seq.num_computed += c.num_tokens
            if c.want_logits:
                c.seq.output_ids.append(1)
                if len(c.seq.output_ids) >= c.seq.params.max_tokens:
                    sched.finish(c.seq, "length")
    assert all(s.status is SeqStatus.FINISHED for s in seqs)
    assert slots.num_in_use == 0 and slots.evictions > 0
    assert sum(len(o.loads) for o in sched_outs) == slots.loads


def test_slot_manager_acquire_release():
    sm = SlotManager(2)
    assert sm.acquire("a") == (0, None, True)
    assert sm.acquire("b") == (1, None, True)
    assert sm.acquire("c") is None  # both busy: wait, don't evict
    sm.release(0)
    assert sm.acquire("a") == (0, None, False)  # still resident: no load
    sm.release(0)
    sm.release(1)
    assert sm.acquire("c") == (0, "a", True)  # LRU idle slot: a was released before b
    with pytest.raises(ValueError, match="released more often"):
        sm.release(1)


def test_allocator_errors():
    alloc = BlockAllocator(2, 4)
    blocks = alloc.allocate(2)
    with pytest.raises(MemoryError, match="need 1 KV blocks, 0 free"):
        alloc.allocate(1)
    alloc.free(blocks)
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free([blocks[0]])


@pytest.mark.parametrize("seed", range(6))
def test_random_mix_with_prefixes_preemption_and_aborts_keeps_invariants(seed):
    """Prefix adapters (shared KV blocks), prompt adapters (virtual tokens), LoRA and base, a KV pool small
    enough to force preemption, few slots, random aborts: every scheduled chunk is covered by its block
    table, no block is owned twice, and at the end every block and slot is free."""
    rng = random.Random(seed)
    alloc = BlockAllocator(40, 4)
    slots = SlotManager(3)
    # exclusive ownership is checked with prefix caching off; tests/engine/test_prefix_cache.py fuzzes it on
    sched = Scheduler(alloc, max_num_seqs=6, max_batch_tokens=24, slots=slots, prefix_caching=False)
    live: list[Sequence] = []
    for _ in range(60):
        s = make_seq(rng.randint(1, 20), rng.randint(1, 12))
        kind = rng.choice(["base", "lora", "prefix", "prompt"])
        if kind != "base":
            s.adapter_key = (kind, rng.randrange(4))
            if kind == "prefix":
                s.num_prefix = 5
            elif kind == "prompt":
                s.num_virtual = 3
        live.append(s)
        sched.add(s)
    steps = 0
    while sched.has_work:
        steps += 1
        assert steps < 5000
        out = sched.schedule()
        owned = [b for s in sched.running for b in s.block_table] + [b for bl in sched.slot_blocks.values() for b in bl]
        assert len(owned) == len(set(owned)) == alloc.num_used
        for slot, blocks in sched.slot_blocks.items():
            assert slots.refs(slot) > 0 and len(blocks) == alloc.blocks_for(5)
        for c in out.chunks:
            assert c.seq.status is SeqStatus.RUNNING
            assert len(c.seq.block_table) * alloc.block_size >= c.start + c.num_tokens
            assert c.start == c.seq.num_computed
            if c.seq.num_prefix:
                assert c.seq.slot in sched.slot_blocks
            c.seq.num_computed += c.num_tokens
        for c in out.chunks:
            if c.want_logits:
                c.seq.output_ids.append(1)
                if len(c.seq.output_ids) >= c.seq.params.max_tokens:
                    sched.finish(c.seq, "length")
        if rng.random() < 0.1:  # a client goes away
            victims = [s for s in live if s.status is not SeqStatus.FINISHED]
            if victims:
                sched.finish(rng.choice(victims), "abort")
    assert alloc.num_used == 0 and slots.num_in_use == 0 and not sched.slot_blocks
