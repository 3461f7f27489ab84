"""SIGTERM under one deadline.

uvicorn's own graceful shutdown waits `timeout_graceful_shutdown` for connections, then cancels the
HTTP tasks (clients get no terminal event) while the engine keeps generating, and only then runs the
app's shutdown, which waited again: about twice the timeout, then an abort. Here one deadline,
`--shutdown-timeout` after the signal, covers the whole drain: requests that finish before it finish
normally; at the deadline the engine ends every request still running with an error (a stream sends
an error event and `[DONE]`, a plain request answers 503), the connections close, the engine thread
stops, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from types import FrameType
from typing import Any

import uvicorn

from server.engine.async_engine import EngineDeadError

log = logging.getLogger("peftserve")
# After the deadline: time for the final events to reach the clients and the engine to finish its step.
FINAL_GRACE_S = 5.0


def shutdown_error(timeout: float) -> EngineDeadError:
    return EngineDeadError(f"server shutting down: the request was still running when --shutdown-timeout "
                           f"({timeout:g} s) passed")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose drain ends, for every request, at SIGTERM + `drain_timeout`."""

    def __init__(self, config: uvicorn.Config, engine: Any, drain_timeout: float) -> None:
        config.timeout_graceful_shutdown = math.ceil(drain_timeout + FINAL_GRACE_S)
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.drain_deadline: float | None = None  # time.monotonic() (the event loop's clock)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.drain_timeout
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.drain_deadline is None:  # should_exit set some other way
            self.drain_deadline = time.monotonic() + self.drain_timeout
        loop = asyncio.get_running_loop()
        timer = loop.call_at(self.drain_deadline, self._deadline_passed)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _deadline_passed(self) -> None:
        n = self.engine.num_requests
        if n:
            log.warning("shutdown: --shutdown-timeout %g s passed with %d request(s) still running; ending them "
                        "with an error", self.drain_timeout, n)
        self.engine.abort_all(shutdown_error(self.drain_timeout))
