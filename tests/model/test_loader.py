"""Start-up checks: what we refuse, and how a checkpoint's options are read."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import GPT2Config

from server.model.loader import resolve_dtype
from server.model.runner import ModelRunner, SeqChunk
from tests.tiny import make_tiny_checkpoint


def test_unsupported_architecture_is_refused(tmp_path: str) -> None:
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        ModelRunner(str(tmp_path))


def test_pickled_weights_are_refused(ckpt_dir: str, tmp_path: str) -> None:
    src = make_tiny_checkpoint(ckpt_dir, "llama")
    dst = os.path.join(tmp_path, "pickled")
    shutil.copytree(src, dst)
    os.rename(os.path.join(dst, "model.safetensors"), os.path.join(dst, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="pickled weights"):
        ModelRunner(dst)


def test_unsupported_rope_type_is_refused(ckpt_dir: str) -> None:
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128}
    path = make_tiny_checkpoint(ckpt_dir, "llama", rope_scaling=yarn)
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        ModelRunner(path)


def test_runner_attributes_and_limits(ckpt_dir: str) -> None:
    path = make_tiny_checkpoint(ckpt_dir, "qwen2")
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings 256"):
        ModelRunner(path, max_model_len=512)
    r = ModelRunner(path, block_size=8)
    assert r.info.name == os.path.basename(path)
    assert r.info.max_model_len == 256 and r.info.block_size == 8
    assert r.info.num_blocks * r.info.block_size == 8192  # CPU default: max(4 * max_model_len, 8192) tokens
    assert r.dtype == torch.float32 and r.info.eos_token_ids == {r.tokenizer.eos_token_id}
    shapes = r.info.shapes
    assert shapes.model_type == "qwen2" and shapes.num_key_value_heads == 2 and shapes.head_dim == 16
    with open(os.path.join(path, "config.json")) as f:
        assert r.info.vocab_size == json.load(f)["vocab_size"] == len(r.tokenizer)
    assert r.execute([]).shape == (0, r.info.vocab_size)
    with pytest.raises(ValueError, match="does not cover 9 tokens"):
        r.execute([SeqChunk(0, list(range(9)), 0, [0], True)])
    with pytest.raises(ValueError, match="block ids must be in"):
        r.execute([SeqChunk(0, [1], 0, [r.info.num_blocks], True)])
    with pytest.raises(ValueError, match="adapter_slot 7"):
        r.execute([SeqChunk(0, [1], 0, [0], True, adapter_slot=7)])


@pytest.mark.parametrize("dtype, device, ckpt, want", [
    ("auto", "cpu", "bfloat16", torch.float32),
    ("auto", "cuda", "bfloat16", torch.bfloat16),
    ("auto", "cuda", None, torch.bfloat16),  # bf16 by default on CUDA
    ("auto", "cuda", "float32", torch.bfloat16),
    ("auto", "cuda", "float16", torch.float16),
    ("float16", "cpu", "float32", torch.float16),
])
def test_resolve_dtype(dtype: str, device: str, ckpt: str | None, want: torch.dtype) -> None:
    assert resolve_dtype(dtype, device, ckpt) == want
    with pytest.raises(ValueError, match="use one of"):
        resolve_dtype("float64", "cpu", None)


def test_tokenizer_vocab_fits_the_model_for_every_arch(ckpt_dir: str) -> None:
    for arch in ("llama", "mistral", "qwen2"):
        r = ModelRunner(make_tiny_checkpoint(ckpt_dir, arch), num_blocks=8)
        ids = r.tokenizer.encode("<|endoftext|> </s> héllo")
        assert len(r.tokenizer) == r.info.vocab_size and max(ids) < r.info.vocab_size
        assert r.tokenizer.decode(ids) == "<|endoftext|> </s> héllo"
        with pytest.raises(ValueError, match="token ids must be in"):
            r.execute([SeqChunk(0, [r.info.vocab_size], 0, [0], True)])
