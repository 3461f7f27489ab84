"""Continuous batching scheduler. Pure Python: no torch, testable with a fake runner.

Each step: running sequences first (one decode token each, or their next prompt chunk), then
waiting sequences join while the token budget, the sequence cap, KV blocks and adapter slots allow.
When KV blocks run out the newest running sequence is preempted (blocks freed, recomputed later),
never dropped. With prefix caching on, a joining sequence starts from the longest run of cached full
blocks of its tokens (prefix_cache.py), and full blocks are registered as soon as their KV is computed.

Adapter slots and fairness. Residency is pages of a memory budget plus a slot (slots.py). A waiting request
whose adapter has no room (a slot and its pages, free or held by idle adapters) is skipped, so later
requests (base, or on resident adapters) are not held behind it. Skipping alone can starve it: a stream of
requests on resident adapters keeps every slot referenced. So once a request has waited `max_slot_wait`
steps for a slot it is *starved*: the scheduler picks a busy slot to drain (the one with the fewest
references; more of them if their pages are needed) and admits no new sequence onto those slots, and no
load or idle-adapter pickup by anyone else, until the starved request has its room. Each distinct
starved adapter drains its own slots (up to all slots; beyond that, in arrival order). Base requests are
never held. The running sequences on a drained slot only shrink, oldest first, so a starved request
waits at most `max_slot_wait` + D steps, where D = max_model_len + ceil(max_num_seqs·max_model_len /
max_batch_tokens) bounds the steps those sequences need to finish (each step either advances every
running sequence or spends the whole token budget) — barring KV preemption, which only frees slots.

Load-aware admission (`group_loads`, on by default). When adapters outnumber the room for them, the order in
which waiting requests are considered decides how many loads a queue costs. Each step considers, in order: (1)
*aged* requests (below), in arrival order; (2) base requests and requests whose adapter is resident, in
arrival order (they cost no load); (3) the rest grouped by adapter, the adapter with the most waiting requests
first (ties: a parked adapter, then its oldest request first). The first request of a group that gets room
loads the adapter (or stages it on the loader thread); the rest of the group is admitted with it (or, when the
staged load lands, together as resident requests), so one load serves a batch; a later group is loaded only
while room remains. Base requests never wait for a load: nothing in (1) or (3) holds them, only the sequence
cap.

The bound. A request is *held back* from the first step a younger request is admitted (or given a load)
ahead of it, or it finds no room for its adapter (`overtaken_since`, `slot_blocked_since`). Once held back
`max_slot_wait` steps it is aged: it goes first, in arrival order, each aged request skipped for room
keeps one sequence place that younger requests may not take, and if its adapter has no room it is starved
and drains slots as above. So a request waits at most `max_slot_wait` + D steps from the first step the
adapter policy held it back, whatever the mix of adapters and base requests (D as above; with at most
`--max-adapters` adapters starved at once, barring KV preemption), plus the steps the requests that arrived
before it need (arrival-order queueing, which no policy removes). `tests/engine/test_load_grouping.py`
checks it with a seeded fuzz of resident traffic against a cold adapter.

Prefetch: after admission, the adapters of the next `prefetch` waiting requests (in the admission order, so
the biggest group's adapter first) are loaded into free pages (or pages of idle adapters no waiting request
needs), so the step that admits them loads nothing.
When no slot is free or idle but pages are, a staged (paged) adapter is *parked* instead (`SlotManager.park`):
its weights are written now, and the step a slot frees activates it there and admits its requests at once.
Cold bursts: a request whose first uncached block a running sequence computes this step (the same system
prompt arriving many times at once) waits for it and takes it from the cache (`deferred`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from server.engine.block_manager import BlockAllocator
from server.engine.prefix_cache import PrefixCache
from server.engine.sequence import SeqStatus, Sequence
from server.engine.slots import SlotManager


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed this step (== seq.num_computed)
    num_tokens: int
    want_logits: bool  # the chunk reaches the end of the sequence: sample a token


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    loads: list[tuple[int, Sequence]] = field(default_factory=list)  # (slot, seq): load seq.adapter there
    # (slot, seq): load seq.adapter there on a loader thread, while steps run (`SlotManager.is_loading`)
    stages: list[tuple[int, Sequence]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    cleared: list[int] = field(default_factory=list)  # slots emptied by evictions: clear them before the loads
    # seqs whose adapter is parked (SlotManager.park): a loader thread writes its pages, with no slot yet
    parks: list[Sequence] = field(default_factory=list)
    # (slot, seq): a parked adapter took `slot`; activate it there before the step runs (no weights to write)
    activations: list[tuple[int, Sequence]] = field(default_factory=list)
    prefetched: int = 0  # of `loads`, those for waiting requests not admitted yet (taken ahead of need)
    rejected: list[Sequence] = field(default_factory=list)  # could never fit the KV cache; finished

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        *,
        max_num_seqs: int,
        max_batch_tokens: int,
        slots: SlotManager | None = None,
        prefix_caching: bool = True,
        max_slot_wait: int = 32,
        prefetch: int = 2,
        stage_loads: bool = False,
        group_loads: bool = True,
        park: bool = True,
    ) -> None:
        if max_batch_tokens < max_num_seqs:
            raise ValueError(f"max_batch_tokens={max_batch_tokens} must be >= max_num_seqs={max_num_seqs}")
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.slots = slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # KV blocks holding a prefix-tuning adapter's shared prefix, by device slot. They are taken
        # when the adapter is loaded and given back as soon as no running sequence uses it.
        self.slot_blocks: dict[int, list[int]] = {}
        self.prefix_cache = PrefixCache(allocator) if prefix_caching else None
        if max_slot_wait < 0:
            raise ValueError(f"max_slot_wait={max_slot_wait} must be >= 0")
        self.max_slot_wait = max_slot_wait
        self.step = 0  # schedule() calls so far
        self.draining: dict[int, Sequence] = {}  # slot -> the starved sequence it is being drained for
        if prefetch < 0:
            raise ValueError(f"prefetch={prefetch} must be >= 0")
        self.prefetch = prefetch  # adapters of waiting requests loaded ahead of need per step, at most
        # paged adapters (pages > 0, no shared KV prefix) load on a loader thread: their requests wait, the
        # step goes on (base requests and resident adapters are never held by a load)
        self.stage_loads = stage_loads
        # load-aware admission (module docstring): resident adapters' requests first, then one load per adapter
        # with the most waiting requests; off: arrival order (tests show what the grouping saves)
        self.group_loads = group_loads
        self.park = park  # staged loads may write a waiting adapter's pages before a slot frees (slots.py)
        self.deferred = 0  # admissions deferred so that a block another sequence is computing is computed once

    # ---- membership -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        if seq.arrival_step < 0:
            seq.arrival_step = self.step
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (done, aborted or failed): its blocks and slot reference go back at once."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def _release(self, seq: Sequence) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.commit(seq)
        if seq.block_table:
            self.allocator.free(reversed(seq.block_table))  # tail first: evicted before the shared head
            seq.block_table = []
        seq.num_registered = 0
        seq.num_computed = 0
        if seq.slot >= 0 and self.slots is not None:
            self.slots.release(seq.slot)
            if seq.slot in self.slot_blocks and self.slots.refs(seq.slot) == 0:
                self.allocator.free(self.slot_blocks.pop(seq.slot))
                self.slots.discard(seq.adapter_key)
        seq.slot = -1

    def prefix_blocks(self, slot: int) -> list[int]:
        return self.slot_blocks.get(slot, [])

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _ensure_blocks(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.allocator.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if not self.allocator.can_allocate(need):
            return False
        seq.block_table.extend(self.allocator.allocate(need))
        return True

    # ---- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.step += 1
        budget = self.max_batch_tokens
        if self.prefix_cache is not None:  # KV computed by the last step becomes reusable
            for seq in self.running:
                self.prefix_cache.commit(seq)

        # 1. Running sequences, oldest first; preempt the newest when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self._ensure_blocks(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n, seq.num_computed + n == seq.num_tokens))
            budget -= n
            i += 1

        # 2. Waiting sequences join, in `_admission_order` (arrival order without slots or grouping).
        if out.preempted:
            return out
        self._update_drains()
        pending = self._pending_blocks() if self.prefix_cache is not None else {}
        order = self._admission_order()
        taken: set[int] = set()  # ids of the sequences admitted (they leave `waiting`)
        passed = -1  # the youngest position in `waiting` admitted or given a load: older ones were overtaken
        pos = {id(q): i for i, q in enumerate(self.waiting)}
        owed = 0  # aged adapter requests skipped for room: each keeps a sequence place from younger requests
        for seq in order:
            aged = self._aged(seq)
            if budget <= 0 or len(self.running) + (0 if aged else owed) >= self.max_num_seqs:
                break
            if seq.adapter_key is not None and self.slots is not None and self.slots.is_loading(seq.adapter_key):
                owed += aged  # its adapter is being loaded: next step(s)
                continue
            if seq.adapter_key is not None and self.slots is not None and not self._may_take_slot(seq):
                if seq.slot_blocked_since < 0:
                    seq.slot_blocked_since = self.step
                owed += aged
                continue
            if (self._stageable(seq) and self.slots.slot_of(seq.adapter_key) is None
                    and not self.slots.is_parked(seq.adapter_key)):
                got = self.slots.acquire(seq.adapter_key, seq.adapter_pages, stage=True)
                assert got is not None  # _may_take_slot checked it
                out.stages.append((got[0], seq))
                passed = max(passed, pos[id(seq)])
                owed += aged
                continue
            total_blocks = self.allocator.blocks_for(seq.num_tokens)
            prefix_blocks = 0
            if seq.num_prefix and self.slots is not None and self.slots.slot_of(seq.adapter_key) is None:
                prefix_blocks = self.allocator.blocks_for(seq.num_prefix)
            if total_blocks + self.allocator.blocks_for(seq.num_prefix) > self.allocator.num_blocks:
                self.finish(seq, "error")  # would wait forever: even an empty cache cannot hold it
                out.rejected.append(seq)
                continue
            # a prompt being scored needs the logits of every prompt position: it takes no cached KV
            scoring = seq.params.prompt_logprobs is not None
            hits = self.prefix_cache.match(seq) if self.prefix_cache is not None and not scoring else []
            if pending and not scoring and self._computing_next(seq, hits, pending):
                self.deferred += 1  # a running sequence computes its next block now: take it from the cache next
                continue
            idle_hits = sum(1 for b in hits if self.allocator.refs(b) == 0)  # leave the allocatable pool
            if not self.allocator.can_allocate(total_blocks - len(hits) + idle_hits + prefix_blocks):
                break
            self._reuse(seq, hits)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._ensure_blocks(seq, seq.num_computed + n):  # cannot happen after the check above
                self._release(seq)
                break
            taken.add(id(seq))
            passed = max(passed, pos[id(seq)])
            if seq.admit_step < 0:
                seq.admit_step = self.step
            seq.slot_blocked_since = -1
            if seq.adapter_key is not None and self.slots is not None and self.slots.is_parked(seq.adapter_key):
                took = self.slots.take_parked(seq.adapter_key)
                assert took is not None  # _may_take_slot checked it
                seq.slot = took[0]
                self.draining = {s: q for s, q in self.draining.items() if q is not seq}
                out.activations.append((took[0], seq))
            elif seq.adapter_key is not None and self.slots is not None:
                got = self.slots.acquire(seq.adapter_key, seq.adapter_pages)
                assert got is not None  # _may_take_slot checked it
                slot, _evicted, needs_load = got
                seq.slot = slot
                self.draining = {s: q for s, q in self.draining.items() if q is not seq}
                if needs_load:
                    if prefix_blocks:
                        self.slot_blocks[slot] = self.allocator.allocate(prefix_blocks)
                    out.loads.append((slot, seq))
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n, seq.num_computed + n == seq.num_tokens))
            budget -= n
            if pending is not None and self.prefix_cache is not None:
                self._add_pending(seq, pending)
        if taken:
            self.waiting = deque(q for q in self.waiting if id(q) not in taken)
        for q in self.waiting:  # those a younger request overtook start their aging clock
            if pos.get(id(q), len(pos)) >= passed:
                break
            if q.overtaken_since < 0:
                q.overtaken_since = self.step
        if self.slots is not None:
            self._prefetch(out)
            out.cleared = self.slots.take_cleared()
        return out

    # ---- cold bursts: a block is computed once ----------------------------------------------------
    def _pending_blocks(self) -> dict[bytes, Sequence]:
        """Keys of the full blocks running sequences are about to compute (registered once computed)."""
        pending: dict[bytes, Sequence] = {}
        for seq in self.running:
            self._add_pending(seq, pending)
        return pending

    def _add_pending(self, seq: Sequence, pending: dict[bytes, Sequence]) -> None:
        assert self.prefix_cache is not None
        if seq.params.prompt_logprobs is not None:
            return
        bs = self.allocator.block_size
        first, last = seq.num_computed // bs, (seq.num_tokens - 1) // bs
        if last > first:
            for key in self.prefix_cache.keys(seq, last)[first:]:
                pending.setdefault(key, seq)

    def _computing_next(self, seq: Sequence, hits: list[int], pending: dict[bytes, Sequence]) -> bool:
        """Whether the first block of `seq` that the cache lacks is being computed by a running sequence this
        step: then `seq` waits a step and takes it from the cache instead of computing it again. The owner
        computes at least one of its blocks each step it runs (it is ahead of `seq` in the running list),
        so a deferred sequence waits at most ceil(prompt / max_batch_tokens) + 1 steps per shared prefix."""
        assert self.prefix_cache is not None
        cap = (seq.num_tokens - 1) // self.allocator.block_size
        if len(hits) >= cap:
            return False
        owner = pending.get(self.prefix_cache.keys(seq, len(hits) + 1)[-1])
        return owner is not None and owner is not seq and owner.status is SeqStatus.RUNNING

    def _stageable(self, seq: Sequence) -> bool:
        return (self.stage_loads and self.slots is not None and seq.adapter_key is not None
                and seq.adapter_pages > 0 and not seq.num_prefix)

    # ---- load-aware admission (see the module docstring) --------------------------------------------
    def _held_since(self, seq: Sequence) -> int:
        """The first step `seq` was held back by the adapter policy: overtaken by a younger request, or
        without room for its adapter (-1: never)."""
        marks = [m for m in (seq.slot_blocked_since, seq.overtaken_since) if m >= 0]
        return min(marks) if marks else -1

    def _aged(self, seq: Sequence) -> bool:
        """Held back `max_slot_wait` steps or more: from now on admitted in arrival order, ahead of every
        younger request, and owed room (a drain) if its adapter has none."""
        since = self._held_since(seq)
        return since >= 0 and self.step - since >= self.max_slot_wait

    def _admission_order(self) -> list[Sequence]:
        """The order waiting requests are considered in this step: aged ones in arrival order; then, in arrival
        order, base requests and those whose adapter is resident (or being loaded: skipped); then the rest
        grouped by adapter, the adapter with the most waiting requests first (ties: the oldest request
        first), so that one load serves every request of the group. When every waiting adapter fits free slots
        and pages (no load evicts or waits for another), arrival order. Without slots or grouping: arrival order."""
        if self.slots is None or not self.group_loads:
            return list(self.waiting)
        aged: list[Sequence] = []
        ready: list[Sequence] = []
        cold: dict = {}
        for q in self.waiting:
            if self._aged(q):
                aged.append(q)
            elif q.adapter_key is None or self.slots.slot_of(q.adapter_key) is not None:
                ready.append(q)
            else:  # parked adapters too: a parked group of one must not take a slot before a bigger group
                cold.setdefault(q.adapter_key, []).append(q)
        if cold and not aged and self._all_fit_free(cold):
            return list(self.waiting)  # nobody's load takes room from another: arrival order
        # the biggest group first; among equals a parked one (no weights left to write), then the oldest
        groups = sorted(cold.values(), key=lambda g: (-len(g), not self.slots.is_parked(g[0].adapter_key)))
        return aged + ready + [q for g in groups for q in g]

    def _all_fit_free(self, cold: dict) -> bool:
        """Whether the waiting adapters in `cold` ({key: requests}) all fit the free slots and free pages at once."""
        assert self.slots is not None
        if any(self.slots.is_parked(k) for k in cold) or len(cold) > self.slots.free_slots:
            return False
        return self.slots.num_pages is None or sum(g[0].adapter_pages for g in cold.values()) <= self.slots.pages_free

    # ---- prefetch: load the next adapters ahead of need ------------------------------------------
    def _prefetch(self, out: SchedulerOutput) -> None:
        """Make the adapters of the next waiting requests resident now (free pages, or idle adapters no
        waiting request needs), so they are not loaded on the step that admits them. Never while a starved
        request is owed room (that would take it), never evicting an adapter a waiting request needs."""
        assert self.slots is not None
        if self.prefetch == 0 or self.draining or not self.waiting:
            return
        wanted = {q.adapter_key for q in self.waiting if q.adapter_key is not None}
        done = 0
        for seq in self._admission_order():
            if done >= self.prefetch:
                break
            key = seq.adapter_key
            if key is None or seq.num_prefix or self.slots.slot_of(key) is not None or self.slots.is_parked(key):
                continue
            stage = self._stageable(seq)
            got = self.slots.acquire(key, seq.adapter_pages, protect=wanted, stage=stage)
            if got is None and stage and self.park and self.slots.park(key, seq.adapter_pages) is not None:
                out.parks.append(seq)  # every slot busy, pages free: write its weights now, take a slot later
                out.prefetched += 1
                self.slots.prefetches += 1
                done += 1
                continue
            if got is None:
                break  # no room without evicting what the queue needs
            slot = got[0]
            if stage:
                out.stages.append((slot, seq))
            else:
                self.slots.release(slot)  # resident and idle (most recently used) until its request is admitted
                out.loads.append((slot, seq))
            out.prefetched += 1
            self.slots.prefetches += 1
            done += 1

    # ---- slot fairness (see the module docstring) -----------------------------------------------
    def _may_take_slot(self, seq: Sequence) -> bool:
        """Whether `seq` may take a slot reference now: one is acquirable and not held for a starved request.

        While a starved request is owed room (`draining` is not empty), nobody else loads an adapter or takes
        an idle one: the free and idle pages and slots only grow until the starved request has them."""
        assert self.slots is not None
        key = seq.adapter_key
        owners = {q.adapter_key for q in self.draining.values()}
        if self.draining and key not in owners:
            slot = self.slots.slot_of(key)
            return slot is not None and slot not in self.draining and self.slots.refs(slot) > 0
        return self.slots.can_acquire(key, seq.adapter_pages)

    def _update_drains(self) -> None:
        """Drop drains whose request left; give each newly starved adapter busy slots to drain, enough that
        their pages with the free and idle ones hold it."""
        if self.slots is None:
            return
        sm = self.slots
        waiting = set(map(id, self.waiting))
        self.draining = {s: q for s, q in self.draining.items() if id(q) in waiting}
        claimed: dict = {}
        for s, q in self.draining.items():
            claimed.setdefault(q.adapter_key, []).append(s)
        for seq in self.waiting:
            key = seq.adapter_key
            if key is None or seq.slot_blocked_since < 0 or not self._aged(seq) or sm.slot_of(key) is not None:
                continue
            mine = claimed.setdefault(key, [])
            pages = sm.pages_free + sm.idle_pages() + sum(len(sm.pages_of(s)) for s in mine)
            has_slot = sm.slot_available or bool(mine)
            while not (has_slot and (sm.num_pages is None or pages >= seq.adapter_pages)):
                busy = [s for s in range(sm.num_slots) if s not in self.draining and sm.refs(s) > 0]
                if not busy:
                    break  # every busy slot is already draining: this adapter waits its turn
                slot = min(busy, key=lambda s: (sm.refs(s), s))
                self.draining[slot] = seq
                mine.append(slot)
                pages += len(sm.pages_of(slot))
                has_slot = True
            if not mine:
                claimed.pop(key)

    def _reuse(self, seq: Sequence, hits: list[int]) -> None:
        """Start a joining sequence on its cached blocks: referenced, counted as computed."""
        if self.prefix_cache is None:
            return
        self.allocator.touch(hits)
        seq.block_table = list(hits)
        seq.num_computed = len(hits) * self.allocator.block_size
        self.prefix_cache.admitted(seq, len(hits))
