"""Load-aware admission (issue 14/18): when adapters outnumber slots, a queue costs as few loads as grouping
allows, a cold adapter's request is still admitted within the stated bound however much resident traffic
arrives, and base requests are admitted while loads are pending.

Driven through the real Scheduler/SlotManager/BlockAllocator with the fake runner of test_slot_fairness
(one token per chunk that wants logits), so the step and load counts are the scheduler's own."""

from __future__ import annotations

import random

import pytest

from server.engine.block_manager import BlockAllocator
from server.engine.scheduler import Scheduler, SchedulerOutput
from server.engine.sequence import SamplingParams, SeqStatus, Sequence
from server.engine.slots import SlotManager
from tests.engine.test_slot_fairness import drain_bound, run_arrivals, step


def seq(adapter: str | None, pages: int = 1, prompt: int = 4, max_tokens: int = 6) -> Sequence:
    s = Sequence(request_id=f"r{random.random()}", prompt_ids=list(range(1, prompt + 1)),
                 params=SamplingParams(max_tokens=max_tokens), adapter_pages=pages if adapter else 0)
    s.adapter_key = adapter
    return s


def staged_step(sched: Scheduler, landing: list) -> tuple[SchedulerOutput, list]:
    """A step with loader-thread loads: those staged (or parked) by the previous step land before this one."""
    for x in landing:
        if isinstance(x, int):
            sched.slots.loaded(x)
        else:
            sched.slots.parked_landed(x)
    out = step(sched)
    return out, [slot for slot, _ in out.stages] + [q.adapter_key for q in out.parks]


def run_queue(group: bool, stage: bool, max_num_seqs: int = 2) -> tuple[Scheduler, list[Sequence]]:
    """12 requests queued at once, interleaved over 4 adapters (A B C D A B C D ...), 2 slots."""
    sched = Scheduler(BlockAllocator(256, 4), max_num_seqs=max_num_seqs, max_batch_tokens=64,
                      slots=SlotManager(2, num_pages=2), max_slot_wait=64, stage_loads=stage, group_loads=group)
    reqs = [seq(a) for _ in range(3) for a in "ABCD"]
    for q in reqs:
        sched.add(q)
    landing: list[int] = []
    steps = 0
    while sched.has_work or landing:
        _, landing = staged_step(sched, landing)
        sched.slots.check()
        steps += 1
        assert steps < 1000
    assert all(q.status is SeqStatus.FINISHED and len(q.output_ids) == 6 for q in reqs)
    return sched, reqs


@pytest.mark.parametrize("stage", [False, True], ids=["sync-loads", "staged-loads"])
def test_two_slots_four_adapters_one_load_per_adapter(stage):
    # arrival order with a sequence cap of 2 loads again on almost every request: the adapter a finished
    # request leaves idle is evicted for the next one in line, whose adapter differs
    fifo, _ = run_queue(group=False, stage=stage)
    assert fifo.slots.loads >= 8, fifo.slots.loads
    # grouped: each adapter is loaded once and serves its three requests (4 distinct adapters: the minimum)
    grouped, reqs = run_queue(group=True, stage=stage)
    assert grouped.slots.loads == 4, grouped.slots.loads
    # ... and the grouping cost nobody more than the aging bound: every request was admitted before its
    # adapter's group would have aged
    assert all(q.admit_step - q.arrival_step < grouped.max_slot_wait for q in reqs)


def test_the_biggest_group_is_loaded_first():
    sched = Scheduler(BlockAllocator(256, 4), max_num_seqs=8, max_batch_tokens=64,
                      slots=SlotManager(1, num_pages=1), max_slot_wait=64)
    lone, crowd = seq("lone"), [seq("crowd") for _ in range(3)]
    for q in (lone, *crowd):
        sched.add(q)
    out = step(sched)
    assert [q for _, q in out.loads] == [crowd[0]]  # three waiting requests outweigh the older lone one
    assert all(q.status is SeqStatus.RUNNING for q in crowd) and lone.status is SeqStatus.WAITING


def test_arrival_order_while_every_waiting_adapter_fits_free_room():
    """Grouping only decides who goes first when loads compete for room: with a free slot and pages for every
    waiting adapter, the older lone request goes first (the sequence cap admits two)."""
    sched = Scheduler(BlockAllocator(256, 4), max_num_seqs=2, max_batch_tokens=64,
                      slots=SlotManager(2, num_pages=2), max_slot_wait=64)
    lone, crowd = seq("lone", pages=1), [seq("crowd", pages=1) for _ in range(3)]
    for q in (lone, *crowd):
        sched.add(q)
    step(sched)
    assert lone.status is SeqStatus.RUNNING and crowd[0].status is SeqStatus.RUNNING
    assert crowd[1].status is SeqStatus.WAITING


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("stage", [False, True], ids=["sync-loads", "staged-loads"])
def test_cold_request_admitted_within_the_bound_under_endless_resident_traffic(seed, stage):
    """Two slots kept busy by a random stream of requests on two resident adapters (1-3 new ones a step,
    random lengths), a sequence cap that the stream fills, base requests now and then; one request on a cold
    adapter. It is admitted within max_slot_wait + D of the first step it was held back."""
    rng = random.Random(seed)
    max_model_len = 16
    sched = Scheduler(BlockAllocator(2048, 4), max_num_seqs=6, max_batch_tokens=64,
                      slots=SlotManager(2, num_pages=2), max_slot_wait=8, stage_loads=stage)
    cold = seq("cold", prompt=4, max_tokens=4)
    landing: list[int] = []
    held = -1
    for t in range(600):
        for _ in range(rng.randint(1, 3)):
            sched.add(seq(rng.choice(["hot-a", "hot-b"]), prompt=rng.randint(1, 8), max_tokens=rng.randint(1, 8)))
        if rng.random() < 0.2:
            sched.add(seq(None, prompt=rng.randint(1, 8), max_tokens=rng.randint(1, 8)))
        if t == 5:
            sched.add(cold)
        if cold.status is SeqStatus.WAITING and held < 0:
            held = sched._held_since(cold)
        _, landing = staged_step(sched, landing)
        sched.slots.check()
        if cold.admit_step >= 0:
            break
    assert cold.admit_step >= 0, "the cold request was never admitted"
    assert held > cold.arrival_step  # the resident stream did overtake it (the policy held it back)
    bound = drain_bound(sched, max_model_len)
    assert cold.admit_step - held <= bound, (cold.admit_step - held, bound)


def test_without_aging_the_cold_request_starves():
    """What the bound rests on: with an aging bound longer than the run, resident traffic that fills the
    sequence cap keeps the cold adapter's request waiting forever."""
    rng = random.Random(0)
    sched = Scheduler(BlockAllocator(2048, 4), max_num_seqs=6, max_batch_tokens=64,
                      slots=SlotManager(2, num_pages=2), max_slot_wait=10**6)
    cold = seq("cold")
    for t in range(300):
        for _ in range(rng.randint(1, 3)):
            sched.add(seq(rng.choice(["hot-a", "hot-b"]), prompt=rng.randint(1, 8), max_tokens=rng.randint(1, 8)))
        if t == 5:
            sched.add(cold)
        step(sched)
    assert cold.status is SeqStatus.WAITING


def test_base_requests_are_admitted_while_loads_are_pending():
    """Staged loads that take many steps to land hold only their own adapter's requests: a base request
    arriving every step is admitted on the step after it arrives throughout."""
    sched = Scheduler(BlockAllocator(512, 4), max_num_seqs=32, max_batch_tokens=128,
                      slots=SlotManager(2, num_pages=2), max_slot_wait=4, stage_loads=True)
    waiting = [seq(a) for a in ("x", "y", "z", "x", "y", "z")]
    for q in waiting:
        sched.add(q)
    base: list[Sequence] = []
    staged: list[int] = []
    for t in range(40):
        base.append(seq(None, max_tokens=2))
        sched.add(base[-1])
        out = step(sched)
        staged += [slot for slot, _ in out.stages]
        if t == 30:  # the loader thread finally lands both loads
            assert len(staged) == 2  # two adapters were loading (two slots) the whole time
            for slot in staged:
                sched.slots.loaded(slot)
    assert all(q.admit_step < 0 for q in waiting if q.adapter_key == "z")
    assert all(b.admit_step - b.arrival_step == 1 for b in base), [b.admit_step - b.arrival_step for b in base]
    assert all(q.admit_step == 32 for q in waiting if q.adapter_key in ("x", "y"))  # together, once landed


@pytest.mark.parametrize("seed", range(3))
def test_grouping_fuzz_64_adapters_8_slots_loads_no_more_than_arrival_order(seed):
    """64 adapters (Zipf-like popularity) over 8 slots, 300 requests arriving over time with a sequence cap
    that lets a queue form: every request completes, pages add up, and grouping loads no more than arrival
    order on the same sequence."""
    def run(group: bool) -> tuple[int, int]:
        rng = random.Random(seed)
        sm = SlotManager(8, num_pages=16)
        sched = Scheduler(BlockAllocator(1024, 4), max_num_seqs=12, max_batch_tokens=64, slots=sm,
                          max_slot_wait=16, group_loads=group)
        weights = [1 / (i + 1) for i in range(64)]
        pending = [seq(f"a{rng.choices(range(64), weights)[0]}" if rng.random() < 0.9 else None,
                       pages=rng.choice([1, 2]), prompt=rng.randint(1, 12), max_tokens=rng.randint(1, 12))
                   for _ in range(300)]
        everyone = run_arrivals(sched, pending, rng, 3)
        assert sm.num_in_use == 0
        return sm.loads, max(s.admit_step - s.arrival_step for s in everyone)

    grouped, fifo = run(True), run(False)
    assert grouped[0] < fifo[0], (grouped, fifo)


# ---- parking: weights ahead of a slot ----------------------------------------------------------------------
def test_slot_manager_parks_on_free_pages_only_and_reclaims_landed_parked_pages():
    sm = SlotManager(1, num_pages=4)
    a = sm.acquire("a", 1)
    assert sm.park("a", 1) is None  # resident adapters are not parked
    assert sm.park("b", 2) == [1, 2] and sm.loads == 2 and sm.is_loading("b")
    assert sm.park("c", 2) is None  # one free page left: parking never evicts
    assert not sm.can_acquire("b") and sm.take_parked("b") is None  # still being written
    sm.parked_landed("b")
    assert not sm.can_acquire("b")  # written, but the only slot is busy
    sm.release(a[0])
    assert sm.can_acquire("b")
    slot, evicted = sm.take_parked("b")
    assert (slot, evicted) == (a[0], "a") and sm.pages_of(slot) == [1, 2] and sm.loads == 2  # no second load
    assert sm.refs(slot) == 1 and not sm.is_parked("b")
    sm.check()
    assert sm.park("d", 2) == [0, 3]  # scattered free pages are fine
    sm.check()
    sm2 = SlotManager(2, num_pages=3)
    sm2.acquire("x", 1)
    sm2.acquire("y", 1)
    assert sm2.park("p", 1) == [2]
    assert sm2.acquire("z", 1) is None  # both slots busy
    sm2.parked_landed("p")
    sm2.release(0)
    got = sm2.acquire("z", 2)  # needs x's page and the landed parked page: p is reclaimed after idle x
    assert got is not None and not sm2.is_parked("p") and sm2.take_dropped() == ["p"]
    sm2.check()


def test_a_parked_adapter_is_activated_the_step_its_slot_frees():
    """One slot, busy; the next request's adapter is parked meanwhile, so the step the slot frees admits it
    with an activation (no load wait). Without parking it is staged then, and admitted a step later."""
    def run(park: bool) -> tuple[Sequence, Sequence, list, Scheduler]:
        sched = Scheduler(BlockAllocator(256, 4), max_num_seqs=8, max_batch_tokens=64,
                          slots=SlotManager(1, num_pages=4), stage_loads=True, park=park)
        first, second = seq("a", max_tokens=5), seq("b", max_tokens=2)
        sched.add(first)
        sched.add(second)
        landing: list = []
        activations = []
        while sched.has_work or landing:
            out, landing = staged_step(sched, landing)
            activations += out.activations
            sched.slots.check()
        return first, second, activations, sched

    first, second, activations, sched = run(park=True)
    done = first.admit_step + 5 - 1  # the step its last token came out (prompt and first token in one step)
    assert second.admit_step == done + 1 and activations == [(0, second)]
    assert sched.slots.loads == 2
    first, second, activations, sched = run(park=False)
    assert second.admit_step == done + 2 and activations == []
