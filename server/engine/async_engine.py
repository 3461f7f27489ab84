"""AsyncEngine: the asyncio front and the one worker thread that owns the device.

Requests enter through `generate()` (an async iterator of deltas). The worker loop drains its inbox
(new requests, aborts, calls) between steps; a step is schedule → run → postprocess, each a method
below, with the failure policy, delivery and observers in methods of their own. Finished sequences
leave the batch at once. The engine never names an adapter family: an adapter's KV needs come from
`Adapter.prefix_tokens` / `virtual_tokens` and its device form is the runner's business.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from server.engine.block_manager import BlockAllocator
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.guided import grammar_masks
from server.engine.prompt_logprobs import PromptLogprob, PromptScorer
from server.engine.registry import AdapterHandle
from server.engine.sampler import SampleResult, make_generator, sample
from server.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from server.engine.sequence import SamplingParams, SeqStatus, Sequence
from server.engine.slots import SlotManager
from server.model.batch import SeqChunk
from server.model.runner import ModelInfo
from server.threads import single_threaded

log = logging.getLogger("peftserve.engine")
BURST_WINDOW_S = 0.003


class EngineDeadError(RuntimeError):
    """The worker loop stopped after a fatal error; no request can be served."""


class StepError(RuntimeError):
    """A forward step failed; the requests in that step are failed, the engine goes on."""


class CapacityError(RuntimeError):
    """A request larger than the whole KV cache: it could never run."""


MAX_FAILED_STEPS = 8  # consecutive failed steps after which the engine declares itself dead
# torch raises CUDA runtime errors as AcceleratorError; cuBLAS/NCCL failures and errors raised from
# inside a custom kernel launch still arrive as plain RuntimeErrors, known only by their message.
_FATAL_TYPES: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch, "AcceleratorError", None),) if t is not None)
_FATAL_MARKERS = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS",
                  "unspecified launch failure", "CUDA driver", "NCCL error")


def is_fatal_device_error(e: BaseException) -> bool:
    """Errors after which the CUDA context is unusable: every later step would fail the same way."""
    if isinstance(e, _FATAL_TYPES):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _FATAL_MARKERS)


class Runner(Protocol):
    """What the engine needs of the model side (`server.model.runner.ModelRunner`, or a test's fake)."""

    info: ModelInfo
    tokenizer: Any

    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor: ...
    def load_adapter(self, slot: int, adapter: Any, kv_slots: list[int] | None = None,
                     pages: list[int] | None = None) -> None: ...
    def clear_slot(self, slot: int) -> None: ...


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
    prompt_logprobs: list[PromptLogprob | None] | None = None  # on the first delta of a prompt-scoring request
    cached_tokens: int = 0  # on the final delta: prompt tokens the prefix cache served (not prefilled)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's KV-block and adapter-slot counters: what metrics read, so that they need
    not reach into the allocator or the slot manager."""

    kv_blocks_used: int
    kv_blocks_total: int
    kv_blocks_cached: int
    kv_blocks_cached_idle: int
    prefix_cache_evictions: int
    slots_in_use: int
    slots_total: int
    slots_resident: int
    slot_loads: int
    slot_evictions: int
    adapter_pages_used: int = 0  # LoRA page pool (--adapter-memory)
    adapter_pages_total: int = 0


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
    cache_queried_tokens: int = 0  # prefix cache: tokens looked up at the request's first admission
    cache_hit_tokens: int = 0  # of which found cached (not prefilled)
    wait_steps: int = -1  # engine steps from arrival to first admission (-1: never admitted)


class EngineObserver:
    """Hooks the engine calls from its worker thread; override what you need. Must be cheap."""

    def on_step(self, engine: AsyncEngine, num_tokens: int, num_seqs: int, seconds: float) -> None: ...
    def on_token(self, adapter: str | None, first: bool, seconds_since_last: float) -> None: ...
    def on_adapter_load(self, adapter: str, slot: int, seconds: float) -> None: ...
    def on_request_done(self, stats: RequestStats) -> None: ...


@dataclass
class Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    generator: Any
    first_token_at: float | None = None
    last_token_at: float | None = None
    scorer: PromptScorer | None = None  # the request scores its prompt (SamplingParams.prompt_logprobs)
    matcher: Any = None  # guided decoding: this sequence's grammar state (engine/guided.py), advanced in _advance

    @property
    def adapter_name(self) -> str | None:
        return self.seq.adapter.name if self.seq.adapter is not None else None


@dataclass(frozen=True)
class AddRequest:
    req: Request


@dataclass(frozen=True)
class AbortRequest:
    req: Request


@dataclass(frozen=True)
class CallInWorker:
    fn: Callable[[], None]


InboxMessage = AddRequest | AbortRequest | CallInWorker


class AsyncEngine:
    def __init__(self, runner: Runner, *, max_num_seqs: int, max_batch_tokens: int,
                 torch_threads: int | None = None, prefix_caching: bool = True, max_slot_wait: int = 32) -> None:
        self.runner = runner
        self.info: ModelInfo = runner.info
        self.torch_threads = torch_threads  # CPU threads of the worker (see server.threads)
        self.tokenizer = runner.tokenizer
        self.max_model_len = self.info.max_model_len
        self.max_num_seqs = max_num_seqs
        self.allocator = BlockAllocator(self.info.num_blocks, self.info.block_size)
        self.slots = SlotManager(self.info.max_adapters, self.info.adapter_pages or None)
        self.scheduler = Scheduler(self.allocator, max_num_seqs=max_num_seqs,
                                   max_batch_tokens=max_batch_tokens, slots=self.slots,
                                   prefix_caching=prefix_caching, max_slot_wait=max_slot_wait,
                                   stage_loads=callable(getattr(runner, "stage_adapter", None)))
        # Paged adapters load here, while steps run (the scheduler holds only their requests meanwhile).
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="peftserve-adapter-load")
        self.staging = 0  # loads in flight on the loader thread
        self._park_state: dict[Any, Any] = {}  # parked adapters' staged state, by key, until a slot activates it
        self._eos = self.info.eos_token_ids
        self._inbox: queue.SimpleQueue[InboxMessage] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._requests: dict[str, Request] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed: BaseException | None = None  # set by abort_all: every request gets this error
        self.in_flight = 0
        self.failed_steps = 0  # consecutive
        self.dead: BaseException | None = None
        self.steps = 0
        self.last_step_at = time.monotonic()
        self.step_started_at: float | None = None  # monotonic start of the step running now (None: between)
        self.observers: list[EngineObserver] = []
        self.fault_injector: Callable[[list[ScheduledChunk]], None] | None = None  # tests: raise inside a step

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="peftserve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._loader.shutdown(wait=False, cancel_futures=True)
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._fail_all(EngineDeadError("engine stopped (server shutting down)"))

    def abort_all(self, error: BaseException) -> None:
        """Between steps, end every request held or queued with `error` (shutdown deadline); new ones are
        refused with it too. Their streams then send an error event and finish."""
        def fail() -> None:
            for req in list(self._requests.values()):
                self._retire(req, "abort")
                self._emit(req, Delta([], "", error=error))
        self._closed = error
        self.call_in_worker(fail)

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

    def is_resident(self, key: Any) -> bool:
        """Whether an adapter version (AdapterHandle.key) sits in a device slot now."""
        return self.slots.slot_of(key) is not None

    def stats(self) -> EngineStats:
        """The KV-block and adapter-slot counters now (plain reads of ints: safe from any thread)."""
        a, sl = self.allocator, self.slots
        return EngineStats(
            kv_blocks_used=a.num_used, kv_blocks_total=a.num_blocks, kv_blocks_cached=a.num_cached,
            kv_blocks_cached_idle=a.num_cached_idle, prefix_cache_evictions=a.evictions,
            slots_in_use=sl.num_in_use, slots_total=sl.num_slots, slots_resident=sl.num_resident,
            slot_loads=sl.loads, slot_evictions=sl.evictions,
            adapter_pages_used=sl.pages_used, adapter_pages_total=sl.num_pages or 0,
        )

    def worker_cpu_seconds(self) -> float | None:
        """CPU seconds the worker thread has used so far (None before start or where the OS has no per-thread
        clock). Benchmarks divide work by it: unlike wall time, other processes' load barely inflates it."""
        thread = self._thread
        if thread is None or thread.ident is None or not hasattr(time, "pthread_getcpuclockid"):
            return None
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except OSError:  # the thread has exited
            return None

    def step_running_for(self) -> float:
        """Seconds the current step has been running (0.0 between steps)."""
        started = self.step_started_at
        return 0.0 if started is None else time.monotonic() - started

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
            seq.num_virtual = adapter.adapter.virtual_tokens
            seq.num_prefix = adapter.adapter.prefix_tokens
            seq.adapter_pages = -(-adapter.adapter.page_rank // self.info.adapter_page_rank)
        detok = IncrementalDetokenizer(self.tokenizer, params.stop, params.min_tokens)
        req = Request(seq, detok, asyncio.Queue(), loop, make_generator(params.seed))
        if params.guide is not None:
            req.matcher = params.guide.matcher()
        if params.prompt_logprobs is not None:
            req.scorer = PromptScorer(seq.prompt_ids, seq.num_virtual, params.prompt_logprobs)
        self._post(AddRequest(req))
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
                self._post(AbortRequest(req))

    def forget_adapter(self, key: Any) -> None:
        """An adapter version no request will use again leaves its device slot as soon as that is idle."""
        self.call_in_worker(lambda: self.slots.discard(key))

    def call_in_worker(self, fn: Callable[[], None]) -> None:
        """Run fn on the worker thread between steps (slot bookkeeping must not race a step)."""
        self._post(CallInWorker(fn))

    def _post(self, msg: InboxMessage) -> None:
        self._inbox.put(msg)
        self._wake.set()

    # ---- the worker ---------------------------------------------------------------------------
    def _run(self) -> None:
        if self.torch_threads:
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

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, AddRequest):
                if self._closed is not None:  # after abort_all: refused with its error
                    self._emit(msg.req, Delta([], "", error=self._closed))
                    continue
                self._requests[msg.req.seq.request_id] = msg.req
                self.scheduler.add(msg.req.seq)
            elif isinstance(msg, AbortRequest):
                if msg.req.seq.request_id in self._requests:
                    self._retire(msg.req, "abort")
            else:
                msg.fn()

    def _fail_all(self, error: BaseException) -> None:
        """Answer every request the engine holds or has queued with `error` (the loop is gone)."""
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(msg, AddRequest):
                self._requests[msg.req.seq.request_id] = msg.req
        for req in list(self._requests.values()):
            self._emit(req, Delta([], "", error=error))
        self._requests.clear()

    def _step(self) -> None:
        """One engine step: schedule → run → postprocess."""
        self.step_started_at = t0 = time.monotonic()
        try:
            out = self._schedule()
            self._start_stages(out)
            if not out.chunks:
                try:
                    self._apply_loads(out)
                except Exception:  # noqa: BLE001 - nobody runs on these slots yet: forget them
                    log.exception("adapter load failed")
                    for _slot, seq in out.loads:
                        self.slots.discard(seq.adapter_key)
                if self.staging:  # every waiting request waits for a load: sleep until one lands
                    self._wake.wait(0.05)
                    self._wake.clear()
                return
            logits = self._execute(out)
            if logits is not None:
                self._postprocess(out, logits, t0)
        finally:
            self.step_started_at = None

    def _schedule(self) -> SchedulerOutput:
        """The scheduler's batch; requests that can never fit the KV cache are answered here."""
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
        return out

    def _execute(self, out: SchedulerOutput) -> torch.Tensor | None:
        """Load the step's new adapters and run the forward pass; None when the step failed."""
        try:
            self._apply_activations(out)
            self._apply_loads(out)
            if self.fault_injector is not None:
                self.fault_injector(out.chunks)
            logits = self.runner.execute([self._model_chunk(c, self._logits_from(c)) for c in out.chunks])
        except Exception as e:  # noqa: BLE001 - fail this step's requests, keep serving the rest
            self._step_failed(out, e)
            return None
        self.failed_steps = 0
        return logits

    def _apply_loads(self, out: SchedulerOutput) -> None:
        """The step's synchronous adapter loads (families without pages), on this thread."""
        for slot, seq in out.loads:
            t_load = time.monotonic()
            self._load_slot(slot, seq.adapter)
            for ob in self.observers:
                ob.on_adapter_load(seq.adapter.name, slot, time.monotonic() - t_load)
        out.loads = []

    def _apply_activations(self, out: SchedulerOutput) -> None:
        """Parked adapters that took a slot this step: their pages are written, make them serve the slot."""
        for slot, seq in out.activations:
            state = self._park_state.pop(seq.adapter_key)
            self.runner.activate_adapter(slot, seq.adapter.adapter, state, self.slots.pages_of(slot))

    def _start_stages(self, out: SchedulerOutput) -> None:
        """Clear slots evicted for their pages, then hand the step's paged loads to the loader thread: they
        write only pages no active slot reads, and become usable between two steps (`_staged`)."""
        for slot in out.cleared:
            self.runner.clear_slot(slot)
        out.cleared = []
        for slot, seq in out.stages:
            handle: AdapterHandle = seq.adapter
            pages = self.slots.pages_of(slot)
            self._submit_stage(handle, pages, lambda f, t0, slot=slot, handle=handle, pages=pages:
                               self._staged(slot, handle, pages, f, t0))
        out.stages = []
        for key in self.slots.take_dropped():  # parked adapters reclaimed before a slot took them
            self._park_state.pop(key, None)
        for seq in out.parks:  # weights ahead of a slot: written now, activated when a slot frees
            handle = seq.adapter
            self._submit_stage(handle, self.slots.parked_pages(seq.adapter_key),
                               lambda f, t0, handle=handle: self._parked(handle, f, t0))
        out.parks = []

    def _submit_stage(self, handle: AdapterHandle, pages: list[int], done: Callable[[Future, float], None]) -> None:
        """Write `handle`'s weights into `pages` on the loader thread; `done(future, t0)` runs on the engine
        thread between two steps."""
        self.runner.device_form(handle.adapter.family)  # created on this thread, used by the loader
        t0 = time.monotonic()
        self.staging += 1
        fut = self._loader.submit(self._stage_job, handle.adapter, pages)
        fut.add_done_callback(lambda f: self.call_in_worker(lambda: done(f, t0)))

    def _parked(self, handle: AdapterHandle, fut: Future, t0: float) -> None:
        """A parked adapter's pages are written (between steps): usable by the next slot that frees."""
        self.staging -= 1
        try:
            self._park_state[handle.key] = fut.result()
        except Exception as e:  # noqa: BLE001 - fail that adapter's waiting requests, keep serving the rest
            log.exception("adapter %s failed to load", handle.name)
            self.slots.drop_parked(handle.key)
            self._fail_waiting(handle.key, handle.name, e)
            return
        self.slots.parked_landed(handle.key)
        for ob in self.observers:
            ob.on_adapter_load(handle.name, -1, time.monotonic() - t0)

    def _fail_waiting(self, key: Any, name: str, e: BaseException) -> None:
        for req in list(self._requests.values()):
            if req.seq.adapter_key == key and req.seq.status is SeqStatus.WAITING:
                self._retire(req, "error")
                self._emit(req, Delta([], "", error=StepError(f"adapter {name!r} failed to load: {e}")))

    def _stage_job(self, adapter: Any, pages: list[int]) -> Any:
        single_threaded()
        return self.runner.stage_adapter(adapter, pages)

    def _staged(self, slot: int, handle: AdapterHandle, pages: list[int], fut: Future, t0: float) -> None:
        """A loader-thread load finished (between steps): activate it, or fail the requests waiting for it."""
        self.staging -= 1
        try:
            self.runner.activate_adapter(slot, handle.adapter, fut.result(), pages)
        except Exception as e:  # noqa: BLE001 - fail that adapter's waiting requests, keep serving the rest
            log.exception("adapter %s failed to load", handle.name)
            key = self.slots.load_failed(slot)
            self.runner.clear_slot(slot)
            self._fail_waiting(key, handle.name, e)
            return
        self.slots.loaded(slot)
        for ob in self.observers:
            ob.on_adapter_load(handle.name, slot, time.monotonic() - t0)

    def _step_failed(self, out: SchedulerOutput, e: Exception) -> None:
        """Failure policy: fail the step's requests; a dead device or repeated failures stop the engine."""
        log.exception("forward step failed; failing its %d requests", len(out.chunks))
        for c in out.chunks:
            req = self._requests.get(c.seq.request_id)
            if req is not None:
                self._retire(req, "error")
                self._emit(req, Delta([], "", error=StepError(f"forward step failed: {e}")))
        for _slot, seq in (*out.loads, *out.activations):  # a half-loaded slot must not be trusted later
            self.slots.discard(seq.adapter_key)
        self.failed_steps += 1
        fatal = is_fatal_device_error(e)
        if fatal or self.failed_steps >= MAX_FAILED_STEPS:
            # the device is gone (or every step fails): stop, so /ready says 503, instead of failing forever
            raise EngineDeadError(f"{'fatal device error' if fatal else 'repeated failures'}: {e}") from e

    def _postprocess(self, out: SchedulerOutput, logits: torch.Tensor, t0: float) -> None:
        """Advance every chunk, score prompts, sample the sequences that reached their end, deliver, tell
        the observers."""
        sampled, sample_rows = self._score_prompts(out, logits)
        for c in out.chunks:
            c.seq.num_computed += c.num_tokens
        batch: dict[asyncio.AbstractEventLoop, list[tuple[Request, Delta]]] = {}
        reqs = []
        for c in sampled:
            req = self._requests[c.seq.request_id]
            if req.seq.params.max_tokens == 0:  # prompt scoring only: done once the prompt is in
                batch.setdefault(req.loop, []).append((req, self._scored_only(req)))
            else:
                reqs.append(req)
        if len(reqs) != len(sampled) or len(sample_rows) != logits.shape[0]:
            keep = [r for c, r in zip(sampled, sample_rows, strict=True) if c.seq.params.max_tokens != 0]
            logits = logits[torch.tensor(keep, dtype=torch.long, device=logits.device)]
        if reqs:
            results = sample(logits, [r.seq.params for r in reqs], [r.generator for r in reqs],
                             [self._suppressed(r.seq) for r in reqs], grammar_masks([r.matcher for r in reqs]))
            for req, res in zip(reqs, results, strict=True):
                batch.setdefault(req.loop, []).append((req, self._advance(req, res)))
        for loop, items in batch.items():  # one wake-up of each requester loop per step, not per token
            self._deliver(loop, items)
        for ob in self.observers:
            ob.on_step(self, out.num_tokens, len(out.chunks), time.monotonic() - t0)

    def _logits_from(self, c: ScheduledChunk) -> int | None:
        """First row of the chunk whose logits prompt scoring needs (None: none, the common case)."""
        req = self._requests.get(c.seq.request_id)
        if req is None or req.scorer is None:
            return None
        return req.scorer.logits_from(c.start, c.num_tokens)

    def _score_prompts(self, out: SchedulerOutput, logits: torch.Tensor) -> tuple[list[ScheduledChunk], list[int]]:
        """Hand each prompt-scoring chunk its rows of `logits`; the chunks to sample and their rows."""
        sampled, rows, row = [], [], 0
        for c in out.chunks:
            lf = self._logits_from(c)
            k = c.num_tokens - lf if lf is not None else int(c.want_logits)
            if lf is not None:
                self._requests[c.seq.request_id].scorer.add(c.start + lf, logits[row:row + k])
            if c.want_logits:
                sampled.append(c)
                rows.append(row + k - 1)
            row += k
        return sampled, rows

    def _scored_only(self, req: Request) -> Delta:
        """The answer of a max_tokens=0 request: its prompt's logprobs, nothing generated."""
        self._retire(req, "length")
        return Delta([], "", finished=True, finish_reason="length", prompt_tokens=len(req.seq.prompt_ids),
                     prompt_logprobs=req.scorer.entries if req.scorer is not None else None,
                     cached_tokens=req.seq.cached_prompt_tokens)

    def _suppressed(self, seq: Sequence) -> list[int] | None:
        """Token ids that must not be sampled yet: EOS and stop ids until min_tokens are out."""
        p = seq.params
        if len(seq.output_ids) >= p.min_tokens:
            return None
        return list(self._eos | set(p.stop_token_ids))

    def _load_slot(self, slot: int, adapter: AdapterHandle) -> None:
        """Put an adapter in a device slot, with the flat KV slots the scheduler reserved for its prefix."""
        bs = self.allocator.block_size
        blocks = self.scheduler.prefix_blocks(slot)
        kv_slots = [b * bs + o for b in blocks for o in range(bs)][:adapter.adapter.prefix_tokens]
        pages = self.slots.pages_of(slot) if self.slots.num_pages is not None else None
        self.runner.load_adapter(slot, adapter.adapter, kv_slots, pages=pages)

    @staticmethod
    def _model_chunk(c: ScheduledChunk, logits_from: int | None = None) -> SeqChunk:
        """The runner's view of a scheduled chunk; the adapter in `slot` adds its own part there."""
        seq = c.seq
        return SeqChunk(seq_id=seq.seq_id, token_ids=seq.token_ids(c.start, c.num_tokens), start_pos=c.start,
                        block_table=seq.block_table, want_logits=c.want_logits, adapter_slot=seq.slot,
                        logits_from=logits_from)

    def _retire(self, req: Request, reason: str) -> None:
        """Take a request out of the engine: free its blocks and slot, tell the observers."""
        seq = req.seq
        self.scheduler.finish(seq, reason)
        self._requests.pop(seq.request_id, None)
        if self.observers:
            stats = RequestStats(seq.request_id, req.adapter_name, len(seq.prompt_ids), len(seq.output_ids),
                                 reason, seq.arrival, req.first_token_at, time.monotonic(), seq.num_preemptions,
                                 seq.num_cache_queried, seq.num_cache_hit,
                                 seq.admit_step - seq.arrival_step if seq.admit_step >= 0 else -1)
            for ob in self.observers:
                ob.on_request_done(stats)

    def _advance(self, req: Request, res: SampleResult) -> Delta:
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
        if req.matcher is not None and (not req.matcher.accept(res.token_id) or req.matcher.done):
            reason = "stop"  # the grammar is complete (it took a stop token), or refused one it never allowed
        elif not p.ignore_eos and res.token_id in self._eos:
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
        if first and req.scorer is not None:
            delta.prompt_logprobs = req.scorer.entries
        if finished:
            delta.cached_tokens = seq.cached_prompt_tokens
            self._retire(req, reason)
        return delta

    def _emit(self, req: Request, delta: Delta) -> None:
        self._deliver(req.loop, [(req, delta)])

    def _deliver(self, loop: asyncio.AbstractEventLoop, items: list[tuple[Request, Delta]]) -> None:
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the requesters' event loop is closed: nobody will read, stop the sequences
            for req, _ in items:
                if req.seq.request_id in self._requests:
                    self._retire(req, "abort")


def _put_all(items: list[tuple[Request, Delta]]) -> None:
    for req, delta in items:
        req.out.put_nowait(delta)
