"""CLI: bad values exit 2 with one line naming the flag; env vars set the same settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server.cli import build_parser
from server.config import settings_from_args


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, flag", [
    (["--port", "abc"], "--port"),
    (["--port", "70000"], "--port"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "int3"], "--dtype"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--adapter", "no-equals-sign"], "--adapter"),
    (["--max-batch-tokens", "4", "--max-num-seqs", "8"], "--max-batch-tokens"),
])
def test_bad_flag_is_one_line_naming_it(args, flag):
    r = run_cli("serve", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], r.stderr


def test_bad_env_value_names_the_variable():
    r = run_cli("serve", env={"PEFTSERVE_PORT": "eighty"})
    assert r.returncode == 2 and "PEFTSERVE_PORT" in r.stderr


def test_env_sets_defaults_and_flags_override(monkeypatch):
    monkeypatch.setenv("PEFTSERVE_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("PEFTSERVE_DTYPE", "float16")
    monkeypatch.setenv("PEFTSERVE_METRICS_REQUIRE_KEY", "true")
    s = settings_from_args(build_parser().parse_args(["serve", "--dtype", "float32"]))
    assert s.max_num_seqs == 7 and s.dtype == "float32" and s.metrics_require_key is True


def test_unsupported_architecture_refused_at_start(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    r = run_cli("serve", "--model", str(tmp_path), "--port", "8123")
    assert r.returncode == 2
    assert "LlamaForCausalLM" in r.stderr and "gpt2" in r.stderr
