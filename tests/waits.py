"""Waiting in tests: on a condition (an engine counter, a state change), with a deadline and a message.

The deadlines are generous (a loaded 2-core CI box can be 10x slower than a laptop); they only turn a
hang into a failure that says what never happened. No test may assume something happens *within* a
wall-clock window.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

DEFAULT_TIMEOUT = 60.0


def wait_for(cond: Callable[[], bool], what: str, timeout: float = DEFAULT_TIMEOUT, poll: float = 0.01) -> None:
    """Block until cond() is true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(poll)


async def async_wait_for(cond: Callable[[], bool], what: str, timeout: float = DEFAULT_TIMEOUT,
                         poll: float = 0.005) -> None:
    """wait_for for coroutines: yields to the event loop between checks."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(poll)


def engine_settled(engine: object) -> Callable[[], bool]:
    """True once the engine holds no request and every KV block is free (all requests answered)."""
    return lambda: not engine.num_requests and not engine.allocator.num_used  # type: ignore[attr-defined]


def hold_first_step_until(engine: object, cond: Callable[[], bool], what: str,
                          timeout: float = DEFAULT_TIMEOUT) -> None:
    """Make the engine's next step wait (on the worker thread) until cond() holds, then step normally.

    Requests sent together over HTTP reach the engine at times the OS decides; a test that needs them
    in one batch (or needs the KV cache to overflow) holds the first step until all of them are in
    the engine's inbox (e.g. `lambda: engine.in_flight == n`), so the next step schedules them together.
    """
    previous = engine.fault_injector  # type: ignore[attr-defined]

    def hold(chunks: list) -> None:
        engine.fault_injector = previous  # type: ignore[attr-defined]
        wait_for(cond, what, timeout)
        if previous is not None:
            previous(chunks)

    engine.fault_injector = hold  # type: ignore[attr-defined]


class EngineGate:
    """While closed, each engine step waits (on the worker thread, before its forward pass) until open():
    a test holds sequences mid-generation while it acts, instead of hoping they are slow enough."""

    def __init__(self, engine: object, timeout: float = 2 * DEFAULT_TIMEOUT) -> None:
        self.engine = engine
        self.previous = engine.fault_injector  # type: ignore[attr-defined]
        self._open = threading.Event()
        self.entered = threading.Event()  # a step is waiting at the gate

        def gate(chunks: list) -> None:
            self.entered.set()
            if not self._open.wait(timeout):
                raise AssertionError(f"the test never opened the engine gate ({timeout:g}s)")
            if self.previous is not None:
                self.previous(chunks)

        engine.fault_injector = gate  # type: ignore[attr-defined]

    def open(self) -> None:
        self.engine.fault_injector = self.previous  # type: ignore[attr-defined]
        self._open.set()
