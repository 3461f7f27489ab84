"""Engine edge cases: a request larger than the KV cache, closing a one-choice stream, requests queued while
the engine dies."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from server.engine.block_manager import BlockAllocator
from server.engine.scheduler import Scheduler
from server.engine.sequence import SamplingParams, Sequence
from tests.waits import async_wait_for


def test_request_larger_than_the_kv_cache_is_rejected() -> None:
    """A request the whole KV cache cannot hold is finished as rejected, not left waiting forever (which
    would spin the engine loop at 100% CPU)."""
    sched = Scheduler(BlockAllocator(4, 16), max_num_seqs=4, max_batch_tokens=64)
    s = Sequence("big", list(range(1, 81)), SamplingParams(max_tokens=4))
    sched.add(s)
    for _ in range(3):
        sched.schedule()
    assert s.is_finished and s.finish_reason == "error", "request neither scheduled nor rejected: it waits forever"
    assert sched.allocator.num_free == 4 and not sched.has_work


def test_merge_of_one_choice_closes_it() -> None:
    """Closing _merge with one choice closes the engine generator at once (its finally queues the abort),
    rather than leaving it to garbage collection."""
    from server.api.openai import _merge

    closed = []

    async def gen():
        try:
            while True:
                yield SimpleNamespace(token_ids=[1])
                await asyncio.sleep(0)
        finally:
            closed.append(True)

    async def main():
        g = gen()
        m = _merge([g])
        await m.__anext__()
        await m.aclose()  # closes g before it returns: nothing to wait for
        # g is still referenced (as by the gens list in _serve's closure); check before asyncio.run's
        # shutdown_asyncgens closes it for us
        assert closed, "closing _merge left the engine generator (and its sequence) running"
        return g

    asyncio.run(main())


def test_engine_death_fails_requests_still_in_the_inbox(tmp_path) -> None:
    """A request whose 'add' is queued while the fatal step runs is answered with EngineDeadError too."""
    from server.engine.async_engine import AsyncEngine, EngineDeadError, StepError
    from server.model.runner import ModelInfo
    from tests.tiny import tiny_tokenizer

    info = ModelInfo(name="fake", shapes=None, vocab_size=259, max_model_len=256, block_size=16, num_blocks=64,
                     max_adapters=2, max_rank=8, eos_token_ids=frozenset({0}), device="cpu", dtype="float32")
    runner = SimpleNamespace(tokenizer=tiny_tokenizer(), info=info)
    eng = AsyncEngine(runner, max_num_seqs=4, max_batch_tokens=64)
    in_step, go = threading.Event(), threading.Event()

    def fault(_chunks):
        in_step.set()
        assert go.wait(60), "the test never released the step"
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    eng.fault_injector = fault
    eng.start()

    async def main():
        p = SamplingParams(max_tokens=4)
        first = eng.generate([1, 2, 3], p)
        t1 = asyncio.ensure_future(first.__anext__())
        assert await asyncio.get_running_loop().run_in_executor(None, in_step.wait, 60), "no step started"
        second = eng.generate([4, 5, 6], p)
        t2 = asyncio.ensure_future(second.__anext__())
        # generate() counts the request in flight right after putting its add in the inbox
        await async_wait_for(lambda: eng.in_flight == 2, "the second request's add to reach the inbox")
        go.set()
        with pytest.raises((StepError, EngineDeadError)):
            await asyncio.wait_for(t1, 60)
        with pytest.raises(EngineDeadError):  # not a TimeoutError: queued requests are answered too
            await asyncio.wait_for(t2, 60)

    try:
        asyncio.run(main())
    finally:
        eng.stop(1)


def test_fatal_device_errors_known_by_type_then_by_message() -> None:
    """torch's AcceleratorError is fatal whatever it says; a plain RuntimeError only with a CUDA marker."""
    torch = pytest.importorskip("torch")
    from server.engine.async_engine import is_fatal_device_error

    assert is_fatal_device_error(torch.AcceleratorError("unspecified failure"))
    assert is_fatal_device_error(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"))
    assert not is_fatal_device_error(RuntimeError("shape mismatch"))
    assert not is_fatal_device_error(ValueError("CUDA error: text in a user's value is not a device error"))
