"""Smoke tests of the benchmark runners: they run end to end on tiny shapes and print their tables.

No timing is asserted: figures on a shared CPU mean nothing at these sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2"]


def _run(module: str, args: list[str], tmp_path: Path) -> str:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # CPU runs the torch twins; nothing here launches a Triton kernel
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=540)  # a hang detector: a busy 1-core CI box takes minutes
    assert proc.returncode == 0, f"{module} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_throughput_tiny(tmp_path: Path) -> None:
    out_json = tmp_path / "throughput.json"
    out = _run("bench.throughput", [*TINY, "--num-requests", "4", "--prompt-len", "8", "--output-len", "4",
                                    "--json", str(out_json)], tmp_path)
    assert "peftserve engine :" in out and "tok/s" in out
    assert "transformers     :" in out and "ratio ours/hf" in out
    result = json.loads(out_json.read_text())
    assert result["peftserve"]["tokens"] == 16


def test_mixed_adapters_quick(tmp_path: Path) -> None:
    out_json = tmp_path / "mixed.json"
    out = _run("bench.mixed_adapters", ["--quick", "--skip-families", "--json", str(out_json)], tmp_path)
    assert "== mixed adapters" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("workload"))
    assert "/paired" in lines[header] and "/best base" in lines[header] and "ideal(mem)" in lines[header]
    for name in ("ours base", "ours LoRA K=1", "ours LoRA K=2", "ours prefix K=2", "ours prompt K=2", "ours mix",
                 "transformers base", "peft one-at-a-time K=2", "peft mixed batch K=2"):
        assert any(line.startswith(name) for line in lines[header:]), (name, out)
    result = json.loads(out_json.read_text())
    assert {r["name"] for r in result["rows"]} >= {"ours base", "ours LoRA K=2", "peft one-at-a-time K=2"}
    assert all(r["tok_per_s"] > 0 for r in result["rows"])


def test_residency_rounds_report_median_and_spread(tmp_path: Path) -> None:
    """--residency --rounds: each row holds one ratio per interleaved round (wall and CPU time) and the
    median / min / max printed from them; the K=8 row is labelled as the noise row."""
    out_json = tmp_path / "residency.json"
    out = _run("bench.mixed_adapters", [*TINY, "--residency", "--threads", "1", "--ks", "8,16", "--fit", "16",
                                        "--num-requests", "4", "--total-requests", "8", "--prompt-len", "4",
                                        "--output-len", "2", "--rounds", "3", "--no-capped", "--json",
                                        str(out_json)], tmp_path)
    assert "median of 3 rounds" in out and "tok/CPU-s median" in out
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["name"] for r in rows] == ["r16 K=8 (noise: same config)", "r16 K=16"]  # --no-capped: no third row
    for r in rows:
        assert r["rounds"] == 3 and len(r["tput_ratios"]) == 3 and len(r["cpu_ratios"]) == 3
        assert len(r["runs"]) == 3 and len(r["ref_runs"]) == 3
        want = [a["tok_per_s"] / b["tok_per_s"] for a, b in zip(r["runs"], r["ref_runs"], strict=True)]
        assert r["tput_ratios"] == pytest.approx(want)
        assert r["tput_ratio_min"] <= r["tput_ratio_median"] <= r["tput_ratio_max"]
        assert r["tput_ratio_median"] == pytest.approx(sorted(want)[1])
        assert r["cpu_ratio_min"] <= r["cpu_ratio_median"] <= r["cpu_ratio_max"]


@pytest.mark.timeout(150)
def test_bench_attention_dry_run_and_summary(tmp_path: Path) -> None:
    """The GPU script's attention bench runs on CPU (interpreter) and agrees with the twin; the summary
    marks what a CPU cannot measure as n/a rather than inventing a figure."""
    out_json = tmp_path / "bench_attention.json"
    out = _run("bench.bench_attention", ["--dry-run", "--out", str(out_json)], tmp_path)
    assert "GB/s" in out
    result = json.loads(out_json.read_text())
    assert len(result["results"]) == 4
    assert all(r["max_abs_err"] < 1e-4 and r["pct_of_peak"] is None for r in result["results"])
    summary = _run("bench.gpu_summary", [str(tmp_path)], tmp_path)
    assert "| paged decode attention % of HBM peak at 4k (best batch) | - | >= 70 % | n/a |" in summary
    assert "| mixed 64 adapters / base tokens/s | - | >= 0.8 | n/a | not run |" in summary
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [t["met"] for t in saved["targets"]] == [None, None, None, None]


@pytest.mark.timeout(300)
def test_kernels_compile_for_hopper_without_a_gpu(tmp_path: Path) -> None:
    """Real Triton (not the interpreter) compiles the paged decode kernels to sm_90 cubins here."""
    out = _run("bench.compile_check", ["--quick"], tmp_path)
    assert "compile_check: 2 kernels compiled for sm_90" in out


@pytest.mark.timeout(300)
def test_mixed_adapters_quick_new_families(tmp_path: Path) -> None:
    out_json = tmp_path / "families.json"
    out = _run("bench.mixed_adapters", ["--quick", "--skip-peft", "--skip-prompt-learning", "--json", str(out_json)],
               tmp_path)
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("workload"))
    for name in ("ours IA3 K=2", "ours DoRA K=2", "ours bottleneck K=1", "ours bottleneck K=2"):
        assert any(line.startswith(name) for line in lines[header:]), (name, out)
    assert "/paired cpu" in lines[header]
    result = json.loads(out_json.read_text())
    assert not result["failures"] and all(r["tok_per_s"] > 0 for r in result["rows"])
    # the engine thread's CPU time is measured for every adapter workload (and its paired base)
    ours = [r for r in result["rows"] if r["system"] == "ours" and r["kind"] != "base"]
    assert ours and all(r["tok_per_cpu_s"] > 0 and r["ratios"]["cpu_vs_our_base"] > 0 for r in ours)
    assert result["loadavg_start"]
