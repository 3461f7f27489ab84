"""bench.tune_lora's dry run (CPU, interpreter): the sweep's JSON has a row per shape with every configuration
tried, a configuration whose output is off the default's is refused and never chosen, the result lands under
"tune" of an existing JSON without touching its other keys, gpu_summary reports it, and a spent budget stops
the sweep cleanly with the file still written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import kernels.fused_lora as fl
from bench import gpu_summary, tune_lora
from tests.kernels.test_paged_lora import needs_interp

WRONG = "block_n=32,expand_warps=2"  # the dry grid's expand override (stage 3)


@needs_interp
def test_dry_run_rows_and_a_wrong_config_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = fl.lora_apply_fused

    def broken(x: Any, ys: Any, modules: Any, meta: Any, **kw: Any) -> None:
        """A configuration with the WRONG expand skips the kernels (so it is the fastest) and writes a wrong
        answer."""
        cfg = kw.get("config")
        if cfg is not None and cfg.block_n == 32:
            ys[0].add_(1.0)
            return
        real(x, ys, modules, meta, **kw)

    monkeypatch.setattr(fl, "lora_apply_fused", broken)
    path = tmp_path / "bench_fused.json"
    path.write_text(json.dumps({"device": "earlier", "rows": []}))
    tune_lora.main(["--dry-run", "--into", str(path)])
    doc = json.loads(path.read_text())
    assert doc["device"] == "earlier" and doc["rows"] == []  # bench_fused's own keys kept
    t = doc["tune"]
    assert t["complete"] and t["stopped"] is None and t["dry_run"]
    assert [(s["group"], s["tokens"], s["adapters"]) for s in t["shapes"]] == [
        ("qkv", 2, 2), ("gate_up", 2, 2), ("down", 2, 2)]
    for s in t["shapes"]:
        by = {tr["label"]: tr for tr in s["trials"]}
        assert len(by) == 6 and list(by)[:3] == ["default", "block_k=32", "block_k=32,split_k=2"]
        assert s["default_err"] < 1e-4  # the default matches the float32 torch reference
        split = by["block_k=32,split_k=2"]  # CPU: auto split-K is 1, so 2x auto is 2
        assert split["launch"]["split_k"] == 2 and split["launch"]["block_k"] == 32 and split["ok"]
        assert split["max_err"] <= s["tol"] and split["us"] > 0
        assert {tr["launch"]["shrink_warps"] for tr in s["trials"]} == {2, 4}
        last = s["trials"][-1]
        assert last["label"].endswith(WRONG) and last["launch"]["block_n"] == 32
        if s["group"] == "down":  # the fixed launches are not wrapped: all six agree
            assert s["wrong"] == [] and all(tr["ok"] for tr in s["trials"])
        else:
            assert s["wrong"] == [last["label"]]
            assert not last["ok"] and last["max_err"] >= 1.0 and last["us"] is None
            assert WRONG not in s["best_label"] and s["best_launch"]["block_n"] == 64
    assert t["summary"]["wrong"] == 2
    rows = gpu_summary.summarise(str(tmp_path))
    row = next(r for r in rows if r["name"].startswith("best fused q/k/v config vs default"))
    assert row["met"] is None and "2 configs refused" in row["detail"] and row["detail"].startswith("dry run")


@needs_interp
def test_spent_budget_stops_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "bench_fused.json"  # bench_fused did not run: the file holds the sweep alone
    result = tune_lora.main(["--dry-run", "--budget-s", "0", "--into", str(path)])
    saved = json.loads(path.read_text())
    assert list(saved) == ["tune"] and saved["tune"] == json.loads(json.dumps(result))
    t = saved["tune"]
    assert not t["complete"] and t["stopped"].startswith("budget of 0 s spent before tiny qkv 2x2")
    assert t["shapes"] == []
    row = next(r for r in gpu_summary.summarise(str(tmp_path)) if r["name"].startswith("best fused q/k/v"))
    assert row["value"] is None and "no q/k/v shape finished" in row["detail"]
    assert "stopped: budget of 0 s" in row["detail"]
