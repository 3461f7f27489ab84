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


def _settings(argv: list[str]):
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


@pytest.mark.parametrize("fmt", ["toml", "yaml"])
def test_one_precedence_flag_env_file_default(tmp_path, monkeypatch, fmt):
    """flag > PEFTSERVE_* env > --config file > default, for scalars and lists alike: a list given at a
    higher level replaces the lower one's, it never appends."""
    text = {
        "toml": 'max-num-seqs = 16\nmax_batch_tokens = 512\ndtype = "float16"\nadapter = ["f=/file"]\n'
                'allowed-adapter-dir = ["/from-file"]\nmetrics_require_key = true\n',
        "yaml": "max-num-seqs: 16\nmax_batch_tokens: 512\ndtype: float16\nadapter: [f=/file]\n"
                "allowed-adapter-dir: [/from-file]\nmetrics_require_key: true\n",
    }[fmt]
    cfg = tmp_path / f"peftserve.{fmt}"
    cfg.write_text(text)
    s = _settings(["--config", str(cfg)])  # file over defaults
    assert (s.max_num_seqs, s.max_batch_tokens, s.dtype, s.adapter, s.metrics_require_key) == (
        16, 512, "float16", ["f=/file"], True)
    assert s.max_rank == 64  # untouched: the default
    monkeypatch.setenv("PEFTSERVE_MAX_NUM_SEQS", "8")
    monkeypatch.setenv("PEFTSERVE_ADAPTER", "e1=/env1,e2=/env2")
    s = _settings(["--config", str(cfg)])  # env over file
    assert (s.max_num_seqs, s.max_batch_tokens, s.adapter, s.allowed_adapter_dir) == (
        8, 512, ["e1=/env1", "e2=/env2"], ["/from-file"])
    s = _settings(["--config", str(cfg), "--max-num-seqs", "4", "--adapter", "x=/flag", "--adapter", "y=/flag2",
                   "--allowed-adapter-dir", "/from-flag"])  # flags over both
    assert (s.max_num_seqs, s.adapter, s.allowed_adapter_dir) == (4, ["x=/flag", "y=/flag2"], ["/from-flag"])
    monkeypatch.setenv("PEFTSERVE_CONFIG", str(cfg))  # the file may come from the environment too
    assert _settings([]).dtype == "float16"


def test_bad_config_file_exits_2_naming_the_setting_and_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('max-num-seqs = "many"\n')
    r = run_cli("serve", "--config", str(cfg))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "--max-num-seqs" in lines[0] and str(cfg) in lines[0] and "'many'" in lines[0]
    cfg.write_text("max-num-seq = 3\n")
    r = run_cli("serve", "--config", str(cfg))
    assert r.returncode == 2 and "unknown setting 'max-num-seq'" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run_cli("serve", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "missing.yaml" in r.stderr and len(r.stderr.splitlines()) == 1


def test_cross_field_error_names_where_the_value_came_from():
    r = run_cli("serve", "--max-num-seqs", "8", env={"PEFTSERVE_MAX_BATCH_TOKENS": "4"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1
    assert "--max-batch-tokens" in lines[0] and "PEFTSERVE_MAX_BATCH_TOKENS" in lines[0]


def test_help_lists_every_setting_with_its_env_var():
    from server.config import Settings

    r = run_cli("serve", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in text and "PEFTSERVE_" + name.upper() in text, name
    assert "--config" in text and "PEFTSERVE_CONFIG" in text


def test_settings_built_in_code_ignore_the_environment(monkeypatch):
    from server.config import Settings, SettingsError

    monkeypatch.setenv("PEFTSERVE_MAX_NUM_SEQS", "3")
    assert Settings().max_num_seqs == 64 and Settings(max_num_seqs=5).max_num_seqs == 5
    with pytest.raises(SettingsError, match="--port: invalid value 0"):
        Settings(port=0)


def test_adapter_named_like_the_base_model_refused_at_start(tiny_root):
    from tests.adapters import make_lora
    from tests.tiny import make_tiny_checkpoint

    base = make_tiny_checkpoint(tiny_root)
    lora = make_lora(base, os.path.join(tiny_root, "cli-basename-lora"), r=2, targets=["q_proj"], seed=1)
    r = run_cli("serve", "--model", base, "--served-model-name", "same", "--adapter", f"same={lora}",
                "--port", "8124")
    assert r.returncode == 2 and "'same'" in r.stderr and "--served-model-name" in r.stderr, r.stderr
