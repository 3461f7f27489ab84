"""Client disconnects abort their sequences; a failed step fails only its requests; a dead engine is not ready."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest

from tests.ops.conftest import SERVER, scrape, value, wait_for
from tests.server_utils import LiveServer, live_server

LONG = {"prompt": [3] * 20, "max_tokens": 200, "ignore_eos": True}


@pytest.fixture()
def srv(tiny_model: str) -> LiveServer:
    with live_server(model=tiny_model, **SERVER) as s:
        yield s


def engine_idle(srv: LiveServer, free_blocks: int) -> bool:
    eng = srv.state.engine
    return eng.num_requests == 0 and eng.allocator.num_free == free_blocks and not eng.scheduler.running


def slow_steps(chunks: list) -> None:
    """Keep long requests long on any machine: 200 tokens take at least 4 s."""
    time.sleep(0.02)


def wait_until_running(srv: LiveServer) -> None:
    wait_for(lambda: srv.state.engine.num_running == 1 and srv.state.engine.allocator.num_used > 0,
             what="the request to start running")


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", LONG),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 5}], "max_tokens": 200,
                              "ignore_eos": True}),
])
def test_non_streaming_disconnect_aborts_the_sequence(srv: LiveServer, route: str, body: dict) -> None:
    eng = srv.state.engine
    eng.fault_injector = slow_steps
    free = eng.allocator.num_free
    box: dict = {}

    def call() -> None:
        try:
            with srv.client(timeout=httpx.Timeout(30, read=0.5)) as c:
                box["response"] = c.post(route, json=body)
        except httpx.HTTPError as e:
            box["error"] = e

    t = threading.Thread(target=call)
    t.start()
    wait_until_running(srv)
    t.join(60)
    assert isinstance(box.get("error"), httpx.ReadTimeout), box
    # The proof of the abort is its finish reason (a sequence left alone would end with "length" after 200
    # slow steps), not how fast the blocks came back.
    wait_for(lambda: engine_idle(srv, free), what="the aborted sequence to free its blocks")
    with srv.client() as c:
        assert value(scrape(c), "peftserve_sequences_finished_total", finish_reason="abort") == 1
        assert value(scrape(c), "peftserve_sequences_finished_total", finish_reason="length") == 0


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {**LONG, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                              "ignore_eos": True, "stream": True, "n": 2}),
])
def test_streaming_disconnect_aborts_the_sequence(srv: LiveServer, route: str, body: dict) -> None:
    eng = srv.state.engine
    eng.fault_injector = slow_steps
    free = eng.allocator.num_free
    with srv.client() as c, c.stream("POST", route, json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: {"))
        assert eng.num_requests == body.get("n", 1)
    wait_for(lambda: engine_idle(srv, free), what="the aborted sequences to free their blocks")
    with srv.client() as c:
        s = scrape(c)
    assert value(s, "peftserve_sequences_finished_total", finish_reason="abort") == body.get("n", 1)
    assert value(s, "peftserve_sequences_finished_total", finish_reason="length") == 0


def test_a_failed_step_fails_only_its_requests(srv: LiveServer) -> None:
    eng = srv.state.engine
    calls = []

    def fail_once(chunks: list) -> None:
        calls.append(len(chunks))
        if len(calls) == 1:
            raise RuntimeError("injected forward failure")

    eng.fault_injector = fail_once
    with srv.client() as c:
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["code"] == "step_failed" and "injected forward failure" in err["message"], err
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        assert c.get("/ready").status_code == 200
        s = scrape(c)
        assert value(s, "peftserve_http_requests_total", route="/v1/completions", status="500", adapter="base") == 1
        assert value(s, "peftserve_sequences_finished_total", finish_reason="error") == 1
    assert engine_idle(srv, eng.allocator.num_blocks)


class _Fatal(BaseException):
    """Not an Exception: escapes the per-step handler and kills the engine loop."""


def test_ready_is_503_once_the_engine_dies(srv: LiveServer) -> None:
    eng = srv.state.engine

    def die(chunks: list) -> None:
        raise _Fatal("device lost")

    with srv.client() as c:
        assert c.get("/ready").status_code == 200
        eng.fault_injector = die
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "engine_dead"
        r = c.get("/ready")
        assert r.status_code == 503 and "device lost" in r.json()["reason"]
        assert c.get("/health").status_code == 200
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4}).status_code == 503
        assert value(scrape(c), "peftserve_engine_alive") == 0


def test_ready_is_503_when_the_engine_is_stopped(srv: LiveServer) -> None:
    with srv.client() as c:
        assert c.get("/ready").status_code == 200
        srv.state.engine.stop()
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["reason"] == "engine not running"


def test_one_structured_log_line_per_request(srv: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="peftserve.request")
    with srv.client() as c:
        r = c.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 5, "ignore_eos": True},
                   headers={"x-request-id": "req-42"})
        assert r.headers["x-request-id"] == "req-42"
        s = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                                 "ignore_eos": True, "stream": True, "model": "nope"})
        assert s.status_code == 404
        with c.stream("POST", "/v1/completions", json={"prompt": "ab", "max_tokens": 6, "ignore_eos": True,
                                                       "stream": True}) as st:
            assert list(st.iter_lines())[-2] == "data: [DONE]"
        c.get("/health")
    records = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "peftserve.request"]
    assert len(records) == 3, records  # /health logs at DEBUG
    first, missing, streamed = records
    assert first["id"] == "req-42" and first["method"] == "POST" and first["path"] == "/v1/completions"
    assert first["status"] == 200 and first["model"] is None
    assert (first["prompt_tokens"], first["completion_tokens"]) == (3, 5)
    assert first["latency_ms"] > 0 and first["response_id"] == r.json()["id"]
    assert missing["status"] == 404 and missing["model"] == "nope" and missing["completion_tokens"] is None
    assert streamed["status"] == 200 and streamed["completion_tokens"] == 6


def test_fatal_device_error_flips_ready_to_503(srv: LiveServer) -> None:
    """A CUDA error (an Exception, unlike _Fatal) leaves the context unusable: the engine stops at once."""
    eng = srv.state.engine

    def cuda_dies(chunks: list) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with srv.client() as c:
        assert c.get("/ready").status_code == 200
        eng.fault_injector = cuda_dies
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert r.status_code in (500, 503), r.text
        wait_for(lambda: c.get("/ready").status_code == 503, what="/ready to answer 503 after the fatal error")
        r = c.get("/ready")
        assert r.status_code == 503 and "illegal memory access" in r.json()["reason"]
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4}).status_code == 503
