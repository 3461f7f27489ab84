"""Our decoder's logits against transformers' on tiny random checkpoints of every served architecture,
each with its quirks switched on (sliding windows shorter than the prompts, soft-capping, tied embeddings)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.model.runner import ModelRunner, SeqChunk
from tests.model.helpers import decode_chunks, hf_last_logits, prefill_chunks, random_prompts, shuffled_tables
from tests.tiny import make_tiny_checkpoint

TOL = dict(atol=1e-4, rtol=1e-4)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 5000.0}
CASES = {
    "llama": ("llama", {}),
    "llama-tied-bias": ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "llama-rope-llama3": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "llama-rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama-rope-dynamic": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "mistral-window6": ("mistral", {"sliding_window": 6}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied-window": ("qwen2", {"tie_word_embeddings": True, "use_sliding_window": True,
                                    "sliding_window": 5, "max_window_layers": 1}),
    "qwen3": ("qwen3", {}),
    "qwen3-tied-window": ("qwen3", {"tie_word_embeddings": True, "use_sliding_window": True,
                                    "sliding_window": 5, "max_window_layers": 1}),
    "gemma2-softcap-window": ("gemma2", {"sliding_window": 5, "attn_logit_softcapping": 2.0,
                                         "final_logit_softcapping": 3.0}),
    "gemma3-window-local-rope": ("gemma3_text", {"sliding_window": 5,
                                                 "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3-window-tied": ("phi3", {"sliding_window": 6, "tie_word_embeddings": True}),
}


def _load(ckpt_dir: str, case: str, **runner_kw: object) -> tuple[ModelRunner, torch.nn.Module]:
    arch, overrides = CASES[case]
    path = make_tiny_checkpoint(ckpt_dir, arch, **overrides)
    runner = ModelRunner(path, **{"block_size": 5, "num_blocks": 64, **runner_kw})
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return runner, hf


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_then_decode_matches_hf(ckpt_dir: str, case: str) -> None:
    runner, hf = _load(ckpt_dir, case)
    seqs = random_prompts([7, 12, 3, 20, 1])
    tables = shuffled_tables(len(seqs), 8, runner.info.num_blocks)
    out = runner.execute(prefill_chunks(seqs, tables))  # one call, ragged prefill (incl. a 1-token prompt)
    torch.testing.assert_close(out, hf_last_logits(hf, seqs), **TOL)
    for _ in range(3):
        out = runner.execute(decode_chunks(seqs, out.argmax(-1).tolist(), tables))
        torch.testing.assert_close(out, hf_last_logits(hf, seqs), **TOL)


def test_mixed_prefill_and_decode_step(ckpt_dir: str) -> None:
    """A step holding decodes of running sequences and a new prompt; only some chunks want logits."""
    runner, hf = _load(ckpt_dir, "llama", block_size=3)
    seqs = random_prompts([9, 4, 11], seed=1)
    tables = shuffled_tables(3, 12, runner.info.num_blocks, seed=1)
    out = runner.execute(prefill_chunks(seqs[:2], tables[:2]))
    new = out.argmax(-1).tolist()
    chunks = [SeqChunk(2, seqs[2][:6], 0, tables[2], False)]  # first half of a prompt: no logits
    chunks += decode_chunks(seqs[:2], new, tables[:2])
    out = runner.execute(chunks)
    assert out.shape[0] == 2
    torch.testing.assert_close(out, hf_last_logits(hf, seqs[:2]), **TOL)
    out = runner.execute([SeqChunk(2, seqs[2][6:], 6, tables[2], True)])
    torch.testing.assert_close(out, hf_last_logits(hf, seqs[2:]), **TOL)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_chunked_prefill_equals_single_call(ckpt_dir: str, block_size: int) -> None:
    runner, hf = _load(ckpt_dir, "mistral-window6", block_size=block_size, num_blocks=200)
    seqs = random_prompts([13, 10], seed=2)
    tables = shuffled_tables(2, 200 // 2 // block_size, runner.info.num_blocks, seed=2)
    whole = runner.execute(prefill_chunks(seqs, tables))
    tables2 = shuffled_tables(2, 200 // 2 // block_size, runner.info.num_blocks, seed=3)
    runner.execute([SeqChunk(0, seqs[0][:5], 0, tables2[0], False),
                    SeqChunk(1, seqs[1][:1], 0, tables2[1], False)])
    parts = runner.execute([SeqChunk(0, seqs[0][5:], 5, tables2[0], True),
                            SeqChunk(1, seqs[1][1:], 1, tables2[1], True)])
    torch.testing.assert_close(parts, whole, **TOL)
    torch.testing.assert_close(parts, hf_last_logits(hf, seqs), **TOL)
