"""The random demo model (`--model demo`): built once, offline, deterministic, loadable like any checkpoint."""

from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file

from server.model.default_model import DEMO_DIR_NAME, ensure_demo_model
from server.model.runner import ModelRunner, SeqChunk


def test_demo_model_builds_once_and_serves(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTSERVE_CACHE_DIR", str(tmp_path))
    path = ensure_demo_model()
    assert path == os.path.join(tmp_path, DEMO_DIR_NAME)
    assert sorted(os.listdir(tmp_path)) == [DEMO_DIR_NAME]  # no temp dir left behind
    weights = os.path.join(path, "model.safetensors")
    mtime = os.path.getmtime(weights)
    assert ensure_demo_model() == path and os.path.getmtime(weights) == mtime

    other = ensure_demo_model(str(tmp_path / "again"))  # same seed, same weights
    a, b = load_file(weights), load_file(os.path.join(other, "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    r = ModelRunner(path)
    info = r.info.shapes
    assert (info.num_layers, info.hidden_size, info.intermediate_size) == (4, 256, 688)
    assert (info.num_attention_heads, info.num_key_value_heads, r.info.max_model_len) == (8, 2, 2048)
    tok = r.tokenizer
    text = "héllo wörld, 世界 🙂\n\ttabs  and spaces"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < 256
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    assert r.info.eos_token_ids == {tok.convert_tokens_to_ids("</s>")}
    out = r.execute([SeqChunk(0, tok.encode(prompt), 0, list(range(4)), True)])
    assert out.shape == (1, len(tok)) and out.isfinite().all()
