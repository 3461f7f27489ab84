"""SIGTERM: `peftserve serve` stops accepting, lets in-flight streams finish, and exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_streams_and_exits_0(tiny_model: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--model", tiny_model, "--port", str(port), "--max-model-len",
         "256", "--kv-cache-blocks", "64", "--shutdown-timeout", "120", "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300  # a hang detector: start-up imports torch, slow on a busy core
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)

        started = [threading.Event(), threading.Event()]
        streams: list[list[str]] = [[], []]

        def stream(i: int) -> None:
            body = {"prompt": "hello", "max_tokens": 60, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        streams[i].append(line)
                        started[i].set()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        assert all(e.wait(120) for e in started), "the streams did not start"
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(180)
        code = proc.wait(60)
        output = proc.stdout.read()
        for lines in streams:
            assert lines[-1] == "data: [DONE]", (lines[-3:], output)
            assert sum(line.startswith("data: {") for line in lines) == 60
        assert code == 0, output  # (these bounds only turns a hang into a failure)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
