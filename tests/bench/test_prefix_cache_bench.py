"""Smoke test of bench/prefix_cache.py: it runs end to end on tiny shapes and prints its table.

No timing is asserted (figures on a shared CPU mean nothing at these sizes); token counts are exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_prefix_cache_bench_quick(tmp_path: Path) -> None:
    out_json = tmp_path / "prefix.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # CPU runs the torch twins; nothing here launches a Triton kernel
    # two fresh engine processes (caching on, off) and a tiny adapter: minutes on a loaded 2-core machine
    proc = subprocess.run([sys.executable, "-m", "bench.prefix_cache", "--quick", "--json", str(out_json)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, f"exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = proc.stdout
    assert "== prefix caching" in out and "TTFT p50" in out and "fewer prefill tokens" in out
    result = json.loads(out_json.read_text())
    on, off = result["runs"]["on"][0], result["runs"]["off"][0]
    # 6 requests x (48 system + 8 user): without caching every token is prefilled; warm, only the user turns
    assert off["warm"]["prefill_tokens"] == 6 * 56 and on["warm"]["prefill_tokens"] == 6 * 8
    assert on["multi_turn"]["prefill_tokens"] < off["multi_turn"]["prefill_tokens"]
    assert off["hit_tokens"] == 0 and on["hit_tokens"] > 0
    assert result["outputs_identical"]
