"""Run the real server (uvicorn + engine + model) in-process on a loopback port, for tests."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from server.api.app import create_app
from server.api.state import ServerState, build_state
from server.config import Settings


@dataclass
class LiveServer:
    url: str
    state: ServerState
    app: Any

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120), **kw)

    def async_client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=kw.pop("timeout", 120), **kw)


@contextlib.contextmanager
def live_server(**settings: Any) -> Iterator[LiveServer]:
    """Build state from Settings(**settings) (port 0 → a free one), serve it on 127.0.0.1 in a thread."""
    settings.setdefault("port", 1)  # validated, then replaced by the bound port
    s = Settings(**settings).validate()
    state = build_state(s)
    app = create_app(state)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", state, app)
    finally:
        server.should_exit = True
        thread.join(30)
