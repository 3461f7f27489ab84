"""Scheduling when adapter memory is short: residency in pages, prefetch ahead of need, starved requests
drained room by pages within the stated bound, and a cold burst computing a shared prompt once.

Driven through the real Scheduler/SlotManager/BlockAllocator with a fake runner (one token per chunk that
wants logits), so the step counts are the scheduler's own."""

from __future__ import annotations

import math
import random

import pytest

from server.engine.block_manager import BlockAllocator
from server.engine.scheduler import Scheduler
from server.engine.sequence import SamplingParams, SeqStatus, Sequence
from server.engine.slots import SlotManager
from tests.engine.test_slot_fairness import drain_bound, run_arrivals, step


def seq(adapter: str | None, pages: int = 0, prompt: list[int] | int = 4, max_tokens: int = 6) -> Sequence:
    ids = list(range(1, prompt + 1)) if isinstance(prompt, int) else list(prompt)
    s = Sequence(request_id=f"r{random.random()}", prompt_ids=ids, params=SamplingParams(max_tokens=max_tokens),
                 adapter_pages=pages)
    s.adapter_key = adapter
    return s


def test_slot_manager_pages_per_rank_and_lru_eviction_by_pages():
    sm = SlotManager(8, num_pages=8)
    a = sm.acquire("r8", 1)
    b = sm.acquire("r16", 2)
    c = sm.acquire("r32", 4)
    assert (sm.pages_used, sm.pages_free, sm.num_resident) == (7, 1, 3)
    assert sm.pages_of(c[0]) == [3, 4, 5, 6]  # one consecutive run
    assert sm.acquire("r64", 8) is None  # everything in use: no room, nothing evicted
    assert sm.evictions == 0 and sm.num_resident == 3
    sm.release(a[0])
    sm.release(b[0])
    assert not sm.can_acquire("r24", 3, protect={"r16"})  # 1 free + r8's 1: short of 3 without r16
    got = sm.acquire("r24", 3)  # evicts r8 then r16 (least recently used first) for their pages
    assert got is not None and sm.evictions == 2 and sm.slot_of("r8") is None and sm.slot_of("r16") is None
    assert len(sm.pages_of(got[0])) == 3 and sorted(sm.take_cleared()) == sorted({a[0], b[0]} - {got[0]})
    sm.check()


def test_prefetch_loads_the_next_adapter_before_its_request_is_admitted():
    sched = Scheduler(BlockAllocator(64, 4), max_num_seqs=1, max_batch_tokens=16,
                      slots=SlotManager(4, num_pages=4), prefetch=2)
    first, second = seq("x", 2, max_tokens=3), seq("y", 2, max_tokens=3)
    sched.add(first)
    sched.add(second)
    out = step(sched)
    assert [q for _, q in out.loads] == [first, second] and out.prefetched == 1  # y loaded while x runs
    assert second.status is SeqStatus.WAITING and sched.slots.slot_of("y") is not None
    loads = []
    while sched.has_work:
        out = step(sched)
        loads += out.loads
        if second.status is SeqStatus.RUNNING:
            assert not out.loads or all(q is not second for _, q in out.loads)  # admitted without a load
    assert loads == [] and sched.slots.loads == 2


def test_prefetch_never_evicts_an_adapter_the_queue_needs():
    sm = SlotManager(4, num_pages=2)
    sched = Scheduler(BlockAllocator(64, 4), max_num_seqs=1, max_batch_tokens=16, slots=sm, prefetch=4)
    run, wait_x, wait_z = seq("x", 1, max_tokens=4), seq("x", 1), seq("z", 2)
    for q in (run, wait_x, wait_z):
        sched.add(q)
    out = step(sched)
    assert out.prefetched == 0  # z needs 2 pages; the only other page holder is x, which the queue needs
    assert sm.slot_of("x") is not None and sm.evictions == 0


def test_starved_request_gets_room_by_pages_within_the_bound():
    """Two hot adapters of 2 pages each keep a 4-page pool busy; a cold one needs 3 pages, so one drained
    slot is not enough: both are drained, and it is admitted within the stated bound. Base requests are
    admitted the step after they arrive throughout."""
    alloc = BlockAllocator(512, 4)
    max_model_len = 10
    sched = Scheduler(alloc, max_num_seqs=32, max_batch_tokens=64, slots=SlotManager(8, num_pages=4),
                      max_slot_wait=8)
    cold, base = seq("cold", 3), []
    for t in range(400):
        sched.add(seq("hot-a", 2))
        sched.add(seq("hot-b", 2))
        if t % 5 == 0:
            base.append(seq(None))
            sched.add(base[-1])
        if t == 3:
            sched.add(cold)
        step(sched)
        sched.slots.check()
        if cold.status is not SeqStatus.WAITING and t > 3:
            break
    assert cold.admit_step >= 0
    assert cold.admit_step - cold.arrival_step <= drain_bound(sched, max_model_len)
    assert all(b.admit_step - b.arrival_step <= 1 for b in base if b.admit_step >= 0)


def test_starvation_without_the_rule_is_real():
    """The same traffic with the rule off (a wait longer than the run) never admits the cold request."""
    sched = Scheduler(BlockAllocator(512, 4), max_num_seqs=32, max_batch_tokens=64,
                      slots=SlotManager(8, num_pages=4), max_slot_wait=10_000)
    cold = seq("cold", 3)
    for t in range(200):
        sched.add(seq("hot-a", 2))
        sched.add(seq("hot-b", 2))
        if t == 3:
            sched.add(cold)
        step(sched)
    assert cold.status is SeqStatus.WAITING


@pytest.mark.parametrize("seed", range(3))
def test_64_adapters_mixed_ranks_over_a_short_pool_200_requests_within_the_bound(seed):
    """64 adapters of 1, 2 or 8 pages (ranks 8, 16, 64) over a 16-page pool, 200 requests in random adapter
    order: every request completes, pages add up every step, and no wait exceeds the bound per adapter ahead."""
    rng = random.Random(seed)
    alloc = BlockAllocator(1024, 4)
    max_model_len = 40
    pages = {f"a{i}": rng.choice([1, 2, 2, 8]) for i in range(64)}
    sm = SlotManager(64, num_pages=16)
    sched = Scheduler(alloc, max_num_seqs=16, max_batch_tokens=64, slots=sm, max_slot_wait=16)
    pending = []
    for _ in range(200):
        name = f"a{rng.randrange(64)}" if rng.random() < 0.9 else None
        pending.append(seq(name, pages.get(name, 0), prompt=rng.randint(1, 20), max_tokens=rng.randint(1, 20)))
    everyone = run_arrivals(sched, pending, rng, 4)
    worst = max(s.admit_step - s.arrival_step for s in everyone if s.adapter_key is not None)
    assert worst <= drain_bound(sched, max_model_len) * math.ceil(64 / 2), worst
    assert sm.evictions > 0 and sm.num_in_use == 0 and sm.pages_free + sm.idle_pages() == 16


@pytest.mark.parametrize("dedup", [True, False])
def test_cold_burst_computes_a_shared_system_prompt_once(dedup):
    """Eight requests with one 32-token system prompt arrive together: the first computes it, the others
    wait one step and take it from the cache (without the deferral each computes it)."""
    system = list(range(100, 132))
    sched = Scheduler(BlockAllocator(256, 4), max_num_seqs=16, max_batch_tokens=512, slots=SlotManager(4))
    if not dedup:
        sched._computing_next = lambda *a: False  # the rule off, to show what it saves
    burst = [seq("assistant", 0, prompt=system + [i, i + 1, i + 2, i + 3], max_tokens=2) for i in range(8)]
    for q in burst:
        sched.add(q)
    computed = 0
    while sched.has_work:
        out = step(sched)
        computed += sum(c.num_tokens for c in out.chunks if c.start < len(c.seq.prompt_ids))
    if dedup:
        assert computed == 36 + 7 * 4  # the prompt once, then each request's own 4 tokens
        assert sched.deferred == 7 and max(q.admit_step for q in burst) == burst[0].admit_step + 1
    else:
        assert computed == 8 * 36
