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

WRONG = "block_n=32,expand_warps=2"  # the dry run's third configuration


@needs_interp
def test_dry_run_rows_and_a_wrong_config_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = fl.lora_apply_fused

    def broken(x: Any, ys: Any, modules: Any, meta: Any, **kw: Any) -> None:
        """The WRONG configuration skips the kernels (so it is the fastest) and writes a wrong answer."""
        cfg = kw.get("config")
        if cfg is not None and cfg.label() == WRONG:
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
        ("qkv", 4, 2), ("gate_up", 4, 2), ("down", 4, 2)]
    for s in t["shapes"]:
        labels = [tr["label"] for tr in s["trials"]]
        assert labels == ["default", "block_k=32,shrink_warps=2,shrink_stages=2,split_k=2", WRONG]
        assert s["default_err"] < 1e-4  # the default matches the float32 torch reference
        split = s["trials"][1]
        assert split["launch"]["split_k"] == 2 and split["launch"]["block_k"] == 32 and split["ok"]
        assert split["max_err"] <= s["tol"] and split["us"] > 0
        if s["group"] == "down":  # the fixed launches are not wrapped: all three agree
            assert s["wrong"] == [] and all(tr["ok"] for tr in s["trials"])
        else:
            assert s["wrong"] == [WRONG]
            bad = s["trials"][2]
            assert not bad["ok"] and bad["max_err"] >= 1.0 and bad["us"] is None
            assert s["best_label"] != WRONG
    assert t["summary"]["wrong"] == 2
    rows = gpu_summary.summarise(str(tmp_path))
    row = next(r for r in rows if r["name"].startswith("best fused q/k/v config vs default"))
    assert row["met"] is None and "2 configs refused" in row["detail"] and row["detail"].startswith("dry run")


@needs_interp
def test_spent_budget_stops_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "tune.json"
    result = tune_lora.main(["--dry-run", "--budget-s", "0", "--out", str(path)])
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result))
    assert not saved["complete"] and saved["stopped"].startswith("budget of 0 s spent before tiny qkv 4x2")
    assert saved["shapes"] == []
