"""Property-based fuzzing of the OpenAPI spec against the live server: no input may cause a 5xx.

Needs the `schemathesis` dev dependency; skipped when it is not installed.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.server_utils import live_server

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

MAX_EXAMPLES = 30


def fuzz(op: Any, url: str, failures: list[str]) -> None:
    """Up to MAX_EXAMPLES generated requests for one operation; record every 5xx."""

    @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(case=op.as_strategy())
    def check(case: Any) -> None:
        r = case.call(base_url=url, timeout=60)
        if r.status_code >= 500:
            failures.append(f"{op.method.upper()} {op.path} -> {r.status_code}: {r.text[:300]}\n"
                            f"  body: {str(case.body)[:300]}")

    check()


def test_no_input_causes_a_server_error(tiny_model: str) -> None:
    # Tight caps keep every accepted generation short: the fuzzer explores validation, not decoding speed.
    with live_server(model=tiny_model, max_model_len=64, kv_cache_blocks=64, max_tokens_limit=8, max_n=2,
                     max_stop=2) as srv:
        schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
        ops = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
        failures: list[str] = []
        for op in ops:
            fuzz(op, srv.url, failures)
        assert srv.state.engine.alive
        assert not failures, "\n".join(failures)
