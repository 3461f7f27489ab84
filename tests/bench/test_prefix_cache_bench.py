"""Smoke test of bench/prefix_cache.py: it runs end to end on tiny shapes and prints its table.

No timing is asserted (figures on a shared CPU mean nothing at these sizes); token counts are exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.test_bench_smoke import _run


@pytest.mark.timeout(240)
def test_prefix_cache_bench_quick(tmp_path: Path) -> None:
    out_json = tmp_path / "prefix.json"
    out = _run("bench.prefix_cache", ["--quick", "--json", str(out_json)], tmp_path)
    assert "== prefix caching" in out and "TTFT p50" in out and "fewer prefill tokens" in out
    result = json.loads(out_json.read_text())
    on, off = result["runs"]["on"][0], result["runs"]["off"][0]
    # 6 requests x (48 system + 8 user): without caching every token is prefilled; warm, only the user turns
    assert off["warm"]["prefill_tokens"] == 6 * 56 and on["warm"]["prefill_tokens"] == 6 * 8
    assert on["multi_turn"]["prefill_tokens"] < off["multi_turn"]["prefill_tokens"]
    assert off["hit_tokens"] == 0 and on["hit_tokens"] > 0
    assert result["outputs_identical"]
