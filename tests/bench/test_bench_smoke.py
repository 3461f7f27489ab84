"""Smoke tests of the benchmark runners: they run end to end on tiny shapes and print their tables.

No timing is asserted: figures on a shared CPU mean nothing at these sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    out = _run("bench.mixed_adapters", ["--quick", "--json", str(out_json)], tmp_path)
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
