"""AsyncEngine: the asyncio front and the one worker thread that owns the device.

Requests enter through `generate()` (an async iterator of deltas). The worker loop drains new
requests and aborts between steps, asks the scheduler for a batch, runs it, samples, and sends
each request its new tokens. Finished sequences leave the batch at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from server.engine.block_manager import BlockAllocator
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.registry import AdapterHandle
from server.engine.sampler import SampleResult, make_generator, sample
from server.engine.scheduler import Scheduler
from server.engine.sequence import SamplingParams, Sequence
from server.engine.slots import SlotManager

log = logging.getLogger("peftserve.engine")
BURST_WINDOW_S = 0.003


class EngineDeadError(RuntimeError):
    """The worker loop stopped after a fatal error; no request can be served."""


class StepError(RuntimeError):
    """A forward step failed; the requests in that step are failed, the engine goes on."""


class CapacityError(RuntimeError):
    """A request larger than the whole KV cache: it could never run."""


MAX_FAILED_STEPS = 8  # consecutive failed steps after which the engine declares itself dead
_FATAL_MARKERS = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS",
                  "unspecified launch failure", "CUDA driver", "NCCL error")


def is_fatal_device_error(e: BaseException) -> bool:
    """Errors after which the CUDA context is unusable: every later step would fail the same way."""
    msg = str(e)
    return any(m in msg for m in _FATAL_MARKERS)


@dataclass
class Delta:
    """New output for one request since the previous delta."""

    token_ids: list[int]
    text: str
    logprobs: list[SampleResult] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None


@dataclass
class RequestStats:
    """What an observer (metrics, request log) learns about a request when it ends."""

    request_id: str
    adapter: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    arrival: float  # time.monotonic()
    first_token_at: float | None
    finished_at: float
    num_preemptions: int


class EngineObserver:
    """Hooks the engine calls from its worker thread; override what you need. Must be cheap."""

    def on_step(self, engine: AsyncEngine, num_tokens: int, num_seqs: int, seconds: float) -> None: ...
    def on_token(self, adapter: str | None, first: bool, seconds_since_last: float) -> None: ...
    def on_adapter_load(self, adapter: str, slot: int, seconds: float) -> None: ...
    def on_request_done(self, stats: RequestStats) -> None: ...


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    generator: Any
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def adapter_name(self) -> str | None:
        return self.seq.adapter.name if self.seq.adapter is not None else None


class AsyncEngine:
    def __init__(self, runner: Any, *, max_num_seqs: int, max_batch_tokens: int, max_model_len: int,
                 max_adapters: int, torch_threads: int | None = None) -> None:
        self.runner = runner
        self.torch_threads = torch_threads  # CPU threads of the worker (see server.threads)
        self.tokenizer = runner.tokenizer
        self.max_model_len = max_model_len
        self.allocator = BlockAllocator(runner.num_blocks, runner.block_size)
        self.slots = SlotManager(max_adapters)
        self.scheduler = Scheduler(self.allocator, max_num_seqs=max_num_seqs,
                                   max_batch_tokens=max_batch_tokens, slots=self.slots)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._requests: dict[str, _Request] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.in_flight = 0
        self.failed_steps = 0  # consecutive
        self.dead: BaseException | None = None
        self.steps = 0
        self.last_step_at = time.monotonic()
        self.observers: list[EngineObserver] = []
        self._prefix_slots: dict[int, list[int]] = {}  # device slot -> flat KV slots of its prefix
        self._prompt_embeds: dict[int, Any] = {}  # device slot -> [P, hidden] virtual-token embeddings
        self.fault_injector: Callable[[list], None] | None = None  # tests: raise inside a step

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="peftserve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._fail_all(EngineDeadError("engine stopped (server shutting down)"))

    @property
    def alive(self) -> bool:
        return self.dead is None and self._thread is not None and self._thread.is_alive()

    @property
    def num_requests(self) -> int:
        """Requests accepted and not yet finished (event-loop view, includes ones not yet scheduled)."""
        return self.in_flight

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return max(0, self.in_flight - len(self.scheduler.running))

    # ---- the asyncio side ---------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: AdapterHandle | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream deltas for one sequence. Closing the iterator (client gone) aborts the sequence."""
        if self.dead is not None:
            raise EngineDeadError(f"engine stopped: {self.dead!r}")
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        seq = Sequence(request_id=request_id, prompt_ids=list(prompt_ids), params=params)
        if adapter is not None:
            seq.adapter = adapter
            seq.adapter_key = adapter.key
            if adapter.kind == "prompt":
                seq.num_virtual = adapter.loaded.num_virtual_tokens
            elif adapter.kind == "prefix":
                seq.num_prefix = adapter.loaded.num_virtual_tokens
        detok = IncrementalDetokenizer(self.tokenizer, params.stop, params.min_tokens)
        req = _Request(seq, detok, asyncio.Queue(), loop, make_generator(params.seed))
        self._inbox.put(("add", req))
        self._wake.set()
        if self.dead is not None or (self._thread is not None and not self._thread.is_alive()):
            # the loop died (or stopped) after the check above; nothing will ever read the inbox
            raise EngineDeadError(f"engine stopped: {self.dead!r}")
        finished = False
        self.in_flight += 1
        try:
            while True:
                delta: Delta = await req.out.get()
                if delta.error is not None:
                    finished = True
                    raise delta.error
                yield delta
                if delta.finished:
                    finished = True
                    return
        finally:
            self.in_flight -= 1
            if not finished:
                self._inbox.put(("abort", req))
                self._wake.set()

    # ---- the worker ---------------------------------------------------------------------------
    def _run(self) -> None:
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)
        try:
            while True:
                self._drain_inbox()
                if not self.scheduler.has_work:
                    if self._stopping:
                        return
                    if self._wake.wait(0.05):
                        # Idle -> busy: give a burst of requests sent together a moment to arrive, so they
                        # share the first prefill step instead of the later ones waiting a whole step.
                        time.sleep(BURST_WINDOW_S)
                    self._wake.clear()
                    self.last_step_at = time.monotonic()
                    continue
                self._step()
        except BaseException as e:  # noqa: BLE001 - a dead loop must fail every waiter, not hang them
            log.exception("engine loop died")
            self.dead = e
            self._fail_all(EngineDeadError(f"engine stopped: {e!r}"))

    def _fail_all(self, error: BaseException) -> None:
        """Answer every request the engine holds or has queued with `error` (the loop is gone)."""
        while True:
            try:
                op, req = self._inbox.get_nowait()
            except queue.Empty:
                break
            if op == "add":
                self._requests[req.seq.request_id] = req
        for req in list(self._requests.values()):
            self._emit(req, Delta([], "", error=error))
        self._requests.clear()

    def _drain_inbox(self) -> None:
        while True:
            try:
                op, req = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                self._requests[req.seq.request_id] = req
                self.scheduler.add(req.seq)
            elif op == "abort" and req.seq.request_id in self._requests:
                self._retire(req, "abort")
            elif op == "call":
                req()

    def call_in_worker(self, fn: Callable[[], None]) -> None:
        """Run fn on the worker thread between steps (slot bookkeeping must not race a step)."""
        self._inbox.put(("call", fn))
        self._wake.set()

    def _step(self) -> None:
        from server.model.runner import SeqChunk  # model stays optional for scheduler tests

        out = self.scheduler.schedule()
        for seq in out.rejected:
            req = self._requests.get(seq.request_id)
            if req is not None:
                self._retire(req, "error")
                need = self.allocator.blocks_for(seq.num_tokens) + self.allocator.blocks_for(seq.num_prefix)
                self._emit(req, Delta([], "", error=CapacityError(
                    f"request needs {need} KV blocks; the cache has {self.allocator.num_blocks}")))
        self.steps += 1
        self.last_step_at = time.monotonic()
        if not out.chunks:
            return
        chunks = sorted(out.chunks, key=lambda c: c.seq.slot)
        t0 = time.monotonic()
        try:
            for slot, seq in out.loads:
                t_load = time.monotonic()
                self._load_slot(slot, seq.adapter)
                for ob in self.observers:
                    ob.on_adapter_load(seq.adapter.name, slot, time.monotonic() - t_load)
            if self.fault_injector is not None:
                self.fault_injector(chunks)
            logits = self.runner.execute([self._model_chunk(c, SeqChunk) for c in chunks])
        except Exception as e:  # noqa: BLE001 - fail this step's requests, keep serving the rest
            log.exception("forward step failed; failing its %d requests", len(chunks))
            for c in chunks:
                req = self._requests.get(c.seq.request_id)
                if req is not None:
                    self._retire(req, "error")
                    self._emit(req, Delta([], "", error=StepError(f"forward step failed: {e}")))
            if out.loads:  # a half-loaded slot must not be trusted by a later request
                for _slot, seq in out.loads:
                    self.slots.discard(seq.adapter_key)
            self.failed_steps += 1
            if is_fatal_device_error(e) or self.failed_steps >= MAX_FAILED_STEPS:
                # the device is gone (or every step fails): stop, so /ready says 503, instead of failing forever
                raise EngineDeadError(f"{'fatal device error' if is_fatal_device_error(e) else 'repeated failures'}:"
                                      f" {e}") from e
            return
        self.failed_steps = 0

        sampled = [c for c in chunks if c.want_logits]
        for c in chunks:
            c.seq.num_computed += c.num_tokens
        if not sampled:
            return
        reqs = [self._requests[c.seq.request_id] for c in sampled]
        eos = self.runner.eos_token_ids
        suppress = []
        for r in reqs:
            p = r.seq.params
            suppress.append(list(eos | set(p.stop_token_ids)) if len(r.seq.output_ids) < p.min_tokens else None)
        results = sample(logits, [r.seq.params for r in reqs], [r.generator for r in reqs], suppress)
        batch: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Delta]]] = {}
        for req, res in zip(reqs, results, strict=True):
            batch.setdefault(req.loop, []).append((req, self._advance(req, res)))
        for loop, items in batch.items():  # one wake-up of each requester loop per step, not per token
            self._deliver(loop, items)
        for ob in self.observers:
            ob.on_step(self, out.num_tokens, len(chunks), time.monotonic() - t0)

    def _load_slot(self, slot: int, adapter: AdapterHandle) -> None:
        """Put an adapter's weights in a device slot (LoRA A/B, prefix K/V blocks, prompt embeddings)."""
        loaded = adapter.loaded
        if adapter.kind == "lora":
            self.runner.load_lora(slot, {k: (w.a, w.b, w.scaling) for k, w in loaded.lora.items()})
        elif adapter.kind == "prefix":
            bs = self.allocator.block_size
            p = loaded.num_virtual_tokens
            flat = [b * bs + o for b in self.scheduler.prefix_blocks(slot) for o in range(bs)][:p]
            self.runner.write_prefix_kv(flat, loaded.prefix_keys, loaded.prefix_values)
            self._prefix_slots[slot] = flat
        elif adapter.kind == "prompt":
            self._prompt_embeds[slot] = loaded.prompt_embeds.to(self.runner.device, self.runner.dtype)
        else:
            raise ValueError(f"unknown adapter kind {adapter.kind!r}")

    def _model_chunk(self, c: Any, chunk_cls: Any) -> Any:
        """The runner's view of a scheduled chunk, with the adapter's slot, prefix or virtual tokens."""
        seq = c.seq
        kw: dict[str, Any] = {}
        kind = seq.adapter.kind if seq.adapter is not None else None
        if kind == "lora":
            kw["lora_slot"] = seq.slot
        elif kind == "prefix":
            kw["prefix_slots"] = self._prefix_slots[seq.slot]
            kw["pos_offset"] = seq.num_prefix
        elif kind == "prompt" and c.start < seq.num_virtual:
            k = min(seq.num_virtual - c.start, c.num_tokens)
            kw["input_embeds"] = self._prompt_embeds[seq.slot][c.start:c.start + k]
        return chunk_cls(seq_id=seq.seq_id, token_ids=seq.token_ids(c.start, c.num_tokens), start_pos=c.start,
                         block_table=seq.block_table, want_logits=c.want_logits, **kw)

    def _retire(self, req: _Request, reason: str) -> None:
        """Take a request out of the engine: free its blocks and slot, tell the observers."""
        seq = req.seq
        self.scheduler.finish(seq, reason)
        self._requests.pop(seq.request_id, None)
        if self.observers:
            stats = RequestStats(seq.request_id, req.adapter_name, len(seq.prompt_ids), len(seq.output_ids),
                                 reason, seq.arrival, req.first_token_at, time.monotonic(), seq.num_preemptions)
            for ob in self.observers:
                ob.on_request_done(stats)

    def _advance(self, req: _Request, res: SampleResult) -> Delta:
        seq, p = req.seq, req.seq.params
        seq.output_ids.append(res.token_id)
        now = time.monotonic()
        first = req.first_token_at is None
        if first:
            req.first_token_at = now
        for ob in self.observers:
            ob.on_token(req.adapter_name, first, now - (seq.arrival if first else req.last_token_at))
        req.last_token_at = now
        reason = None
        if not p.ignore_eos and res.token_id in self.runner.eos_token_ids:
            reason = "stop"
        elif res.token_id in p.stop_token_ids:
            reason = "stop"
        stop_hit = req.detok.add(seq.output_ids)
        if stop_hit:
            reason = "stop"
        elif reason is None and len(seq.output_ids) >= p.max_tokens:
            reason = "length"
        elif reason is None and seq.context_len >= self.max_model_len:
            reason = "length"
        finished = reason is not None
        text = req.detok.take(final=finished)
        delta = Delta(
            token_ids=[res.token_id],
            text=text,
            logprobs=[res] if p.logprobs is not None else [],
            finished=finished,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
        )
        if finished:
            self._retire(req, reason)
        return delta

    def _emit(self, req: _Request, delta: Delta) -> None:
        self._deliver(req.loop, [(req, delta)])

    def _deliver(self, loop: asyncio.AbstractEventLoop, items: list[tuple[_Request, Delta]]) -> None:
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the requesters' event loop is closed: nobody will read, stop the sequences
            for req, _ in items:
                if req.seq.request_id in self._requests:
                    self._retire(req, "abort")


def _put_all(items: list[tuple[_Request, Delta]]) -> None:
    for req, delta in items:
        req.out.put_nowait(delta)
