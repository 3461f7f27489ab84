"""SIGTERM: `peftserve serve` stops accepting, lets in-flight streams finish, and exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import threading

import httpx

from tests.server_utils import spawn_server
from tests.tiny import make_tiny_checkpoint


def start_server(model: str, max_model_len: int, kv_blocks: int, shutdown_timeout: int) -> tuple[subprocess.Popen, str]:
    """`peftserve serve` as a subprocess, ready to answer; its log readable from proc.stdout."""
    return spawn_server("--model", model, "--max-model-len", str(max_model_len), "--kv-cache-blocks",
                        str(kv_blocks), "--shutdown-timeout", str(shutdown_timeout), "--log-level", "warning",
                        output=subprocess.PIPE)


def start_streams(url: str, max_tokens: int, n: int = 2) -> tuple[list[threading.Thread], list[list[str]]]:
    """n streamed completions in threads; returns once each has received its first event."""
    started = [threading.Event() for _ in range(n)]
    streams: list[list[str]] = [[] for _ in range(n)]

    def stream(i: int) -> None:
        body = {"prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    streams[i].append(line)
                    started[i].set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    assert all(e.wait(30) for e in started), "the streams did not start"
    return threads, streams


def test_sigterm_drains_streams_and_exits_0(tiny_model: str) -> None:
    proc, url = start_server(tiny_model, 256, 64, 120)
    try:
        threads, streams = start_streams(url, 60)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        code = proc.wait(60)
        output = proc.stdout.read()
        for lines in streams:  # finished in full before the deadline: every token, no error event
            assert lines[-1] == "data: [DONE]", (lines[-3:], output)
            assert sum(line.startswith("data: {") for line in lines) == 60, (lines[-3:], output)
            assert not any('"error"' in line for line in lines)
        assert code == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_deadline_ends_long_streams_with_an_error_and_exits_0(tiny_root: str) -> None:
    """Streams far longer than --shutdown-timeout: at the deadline each gets a final error event naming the
    flag and `[DONE]`, the engine stops and the process exits 0 (it used to abort with SIGABRT)."""
    model = make_tiny_checkpoint(tiny_root, name="long-ctx", max_position_embeddings=4096)
    proc, url = start_server(model, 4096, 600, 1)
    try:
        # ~4000 tokens: many seconds on any CPU, so both are still running at the 1 s deadline
        threads, streams = start_streams(url, 4000)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "a stream was not ended after the shutdown deadline"
        code = proc.wait(30)
        output = proc.stdout.read()
        for lines in streams:
            assert lines[-1] == "data: [DONE]", (lines[-3:], output)
            final = json.loads(lines[-2].removeprefix("data: "))
            assert "error" in final, f"the stream finished before the deadline: {lines[-2]}"
            assert final["error"]["code"] == "engine_dead" and "--shutdown-timeout" in final["error"]["message"]
            tokens = sum(line.startswith("data: {") and '"choices"' in line for line in lines)
            assert 0 < tokens < 4000
        assert code == 0, output
        assert "still running" in output  # the log says why the requests ended
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
