"""Run the real server (uvicorn + engine + model) in-process on a loopback port, for tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(*args: str, output: int | None = subprocess.DEVNULL,
                 ready_timeout: float = 240) -> tuple[subprocess.Popen, str]:
    """`python -m server serve --port P ARGS...` as a child process (for signal tests), once /ready answers 200.

    `output`: subprocess.PIPE keeps stdout+stderr readable as text (e.g. for the shutdown log); the default
    discards it. The child is killed if it dies or is not ready within `ready_timeout` (a cold start of torch,
    transformers and the model on a busy 2-core box)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port), *args], cwd=ROOT,
                            stdout=output, stderr=subprocess.STDOUT if output is not None else None, text=True)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}: " + (
                proc.stdout.read() if proc.stdout else "")
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
