"""The hooks for prefix tuning (shared KV prefix slots + position offset) and prompt tuning (embedding
overrides), checked against HF given the same past key/values or inputs_embeds."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from server.model.runner import ModelRunner, SeqChunk
from tests.model.helpers import random_prompts, shuffled_tables
from tests.tiny import make_tiny_checkpoint

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def models(ckpt_dir: str) -> tuple[ModelRunner, torch.nn.Module]:
    path = make_tiny_checkpoint(ckpt_dir, "llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return ModelRunner(path, block_size=4, num_blocks=64), hf


def _hf_with_prefix(hf: torch.nn.Module, keys: torch.Tensor, values: torch.Tensor, seq: list[int]
                    ) -> torch.Tensor:
    cache = DynamicCache()
    for layer in range(keys.shape[0]):  # HF layout [batch, kv_heads, P, head_dim]
        cache.update(keys[layer].transpose(0, 1)[None], values[layer].transpose(0, 1)[None], layer)
    mask = torch.ones(1, keys.shape[1] + len(seq), dtype=torch.long)
    with torch.no_grad():
        return hf(torch.tensor([seq]), past_key_values=cache, attention_mask=mask).logits[0, -1]


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
def test_prefix_slots_match_hf_past_key_values(models: tuple) -> None:
    runner, hf = models
    s = runner.spec
    p = 5
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(s.num_layers, p, s.num_kv_heads, s.head_dim, generator=g)
    values = torch.randn(s.num_layers, p, s.num_kv_heads, s.head_dim, generator=g)
    pool = shuffled_tables(4, 4, runner.info.num_blocks, seed=9)
    prefix_slots = [b * runner.info.block_size + o for b in pool[3][:2] for o in range(runner.info.block_size)][:p]
    with torch.inference_mode():  # what the prefix family's device form does at load
        runner.kv_cache.write_all_layers(prefix_slots, keys, values)
    seqs = random_prompts([6, 1, 9], seed=9)
    chunks = [SeqChunk(0, seqs[0], 0, pool[0], True, prefix_slots=prefix_slots, pos_offset=p),
              SeqChunk(1, seqs[1], 0, pool[1], True, prefix_slots=prefix_slots, pos_offset=p),
              SeqChunk(2, seqs[2], 0, pool[2], True)]
    out = runner.execute(chunks)
    torch.testing.assert_close(out[0], _hf_with_prefix(hf, keys, values, seqs[0]), **TOL)
    torch.testing.assert_close(out[1], _hf_with_prefix(hf, keys, values, seqs[1]), **TOL)
    with torch.no_grad():
        torch.testing.assert_close(out[2], hf(torch.tensor([seqs[2]])).logits[0, -1], **TOL)
    nxt = out.argmax(-1).tolist()
    out = runner.execute([SeqChunk(0, [nxt[0]], 6, pool[0], True, prefix_slots=prefix_slots, pos_offset=p),
                          SeqChunk(1, [nxt[1]], 1, pool[1], True, prefix_slots=prefix_slots, pos_offset=p)])
    torch.testing.assert_close(out[0], _hf_with_prefix(hf, keys, values, seqs[0] + [nxt[0]]), **TOL)
    torch.testing.assert_close(out[1], _hf_with_prefix(hf, keys, values, seqs[1] + [nxt[1]]), **TOL)


def test_input_embeds_override_matches_hf_inputs_embeds(models: tuple) -> None:
    runner, hf = models
    seq = random_prompts([8], seed=10)[0]
    virtual = torch.randn(3, runner.spec.hidden_size, generator=torch.Generator().manual_seed(1))
    table = shuffled_tables(1, 4, runner.info.num_blocks, seed=10)[0]
    out = runner.execute([SeqChunk(0, seq, 0, table, True, input_embeds=virtual)])
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(torch.tensor([seq]))
        embeds[0, :3] = virtual
        ref = hf(inputs_embeds=embeds).logits[0, -1]
        plain = hf(torch.tensor([seq])).logits[0, -1]
    assert (ref - plain).abs().max() > 1e-2
    torch.testing.assert_close(out[0], ref, **TOL)
