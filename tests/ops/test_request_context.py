"""What the handler tells the middleware (request.state), and /ready on a hung step.

- an aborted stream is logged and counted as 499 (like the non-streaming path), with its real token counts;
- a request whose adapter is deleted while it runs is counted under the adapter's name, not "other";
- a step that hangs past --ready-step-timeout while requests wait turns /ready to 503, and back after.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from tests.ops.conftest import SERVER, scrape, value
from tests.server_utils import live_server

ROUTE = "/v1/completions"


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)


def _records(caplog: pytest.LogCaptureFixture, path: str) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records
            if r.name == "peftserve.request" and json.loads(r.getMessage())["path"] == path]


def test_aborted_stream_is_499_with_real_token_counts(tiny_model: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="peftserve.request")
    with live_server(model=tiny_model, **SERVER) as srv, srv.client() as c:
        before = scrape(c)
        body = {"prompt": [5, 6, 7, 8], "max_tokens": 200, "ignore_eos": True, "stream": True}
        with c.stream("POST", ROUTE, json=body) as st:
            assert st.status_code == 200
            got = 0
            for line in st.iter_lines():
                if line.startswith("data: {"):
                    got += 1
                if got == 3:
                    break  # leave: the client goes away mid-stream
        wait_for(lambda: len(_records(caplog, ROUTE)) == 1, "the request's log line")
        rec = _records(caplog, ROUTE)[0]
        assert rec["status"] == 499, rec
        assert rec["prompt_tokens"] == 4 and 3 <= rec["completion_tokens"] < 200, rec
        assert rec["response_id"].startswith("cmpl-")
        wait_for(lambda: srv.state.engine.num_requests == 0, "the aborted sequence to leave the engine")
        after = scrape(c)
        for status, delta in (("499", 1), ("200", 0)):
            got_delta = (value(after, "peftserve_http_requests_total", route=ROUTE, status=status, adapter="base")
                         - value(before, "peftserve_http_requests_total", route=ROUTE, status=status, adapter="base"))
            assert got_delta == delta, (status, got_delta)


def test_adapter_deleted_mid_flight_is_counted_under_its_name(tiny_model: str, lora_dir: str) -> None:
    with live_server(model=tiny_model, adapter=[f"a={lora_dir}"], **SERVER) as srv, srv.client() as c:
        body = {"model": "a", "prompt": [5, 6, 7], "max_tokens": 24, "ignore_eos": True, "stream": True}
        with c.stream("POST", ROUTE, json=body) as st:
            lines = st.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            assert srv.state.registry.remove("a") is not None  # what DELETE does: new requests get 404
            assert list(lines)[-2] == "data: [DONE]"
        assert c.post(ROUTE, json={"model": "a", "prompt": [1], "max_tokens": 1}).status_code == 404
        s = scrape(c)
        assert value(s, "peftserve_http_requests_total", route=ROUTE, status="200", adapter="a") == 1
        assert value(s, "peftserve_http_requests_total", route=ROUTE, status="200", adapter="other") == 0
        assert value(s, "peftserve_http_requests_total", route=ROUTE, status="404", adapter="other") == 1
        assert value(s, "peftserve_generation_tokens_total", adapter="a") == 24


def test_ready_is_503_while_a_step_hangs(tiny_model: str) -> None:
    with live_server(model=tiny_model, ready_step_timeout=0.3, **SERVER) as srv, srv.client() as c:
        eng = srv.state.engine
        assert c.get("/ready").status_code == 200
        in_step, release = threading.Event(), threading.Event()

        def hang(_chunks: list) -> None:  # runs inside the step, as a deadlocked kernel would
            in_step.set()
            release.wait(60)

        eng.fault_injector = hang
        answers: list[httpx.Response] = []
        t = threading.Thread(target=lambda: answers.append(
            srv.client().post(ROUTE, json={"prompt": [1, 2], "max_tokens": 2, "ignore_eos": True})))
        t.start()
        try:
            assert in_step.wait(30), "the request never reached a step"
            wait_for(lambda: c.get("/ready").status_code == 503, "/ready to turn 503")
            r = c.get("/ready")
            assert "--ready-step-timeout" in r.json()["reason"] and eng.alive
            assert c.get("/health").status_code == 200  # the process is alive; it is just not ready
        finally:
            eng.fault_injector = None
            release.set()
            t.join(60)
        assert answers and answers[0].status_code == 200, answers
        wait_for(lambda: c.get("/ready").status_code == 200, "/ready to recover once the step ends")
