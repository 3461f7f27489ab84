"""LoRA in mixed batches: each row must equal its own PeftModel's logits; base rows equal the base model."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from server.families import LORA, AdapterSpec
from server.families.lora import LoraAdapter, LoraModuleWeights
from server.model.runner import ModelRunner, SeqChunk
from tests.model.helpers import decode_chunks, hf_last_logits, prefill_chunks, random_prompts, shuffled_tables
from tests.tiny import make_tiny_checkpoint

TOL = dict(atol=1e-4, rtol=1e-4)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # slot -> config
    0: LoraConfig(r=8, lora_alpha=16, target_modules=ALL, init_lora_weights=False),
    1: LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    2: LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                  init_lora_weights=False, use_rslora=True),
}


def peft_weights(model: PeftModel) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """{(layer, module): (A, B, scaling)}, read straight off PEFT's lora_A / lora_B modules and scaling."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            a, b = m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()
            out[(layer, parts[-1])] = (a, b, float(m.scaling["default"]))
    return out


def load_lora(runner: ModelRunner, slot: int, weights: dict) -> None:
    """Through the family interface, as the engine loads an adapter (the weights as PEFT holds them)."""
    modules = {k: LoraModuleWeights(a, b, scaling) for k, (a, b, scaling) in weights.items()}
    runner.load_adapter(slot, LoraAdapter(family=LORA, spec=AdapterSpec("LORA", None), modules=modules))


@pytest.fixture(scope="module")
def setup(ckpt_dir: str) -> dict:
    path = make_tiny_checkpoint(ckpt_dir, "llama")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    peft_models = {}
    for slot, cfg in ADAPTERS.items():
        torch.manual_seed(100 + slot)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        peft_models[slot] = get_peft_model(model, cfg).eval()
    runner = ModelRunner(path, block_size=4, num_blocks=128, max_adapters=4, max_rank=8)
    for slot, model in peft_models.items():
        load_lora(runner, slot, peft_weights(model))
    return {"runner": runner, "base": base, "peft": peft_models}


def _reference(setup: dict, seqs: list[list[int]], slots: list[int]) -> torch.Tensor:
    rows = []
    for s, slot in zip(seqs, slots, strict=True):
        model = setup["base"] if slot < 0 else setup["peft"][slot]
        rows.append(hf_last_logits(model, [s])[0])
    return torch.stack(rows)


def test_each_adapter_changes_logits(setup: dict) -> None:
    seq = random_prompts([10], seed=5)
    base = hf_last_logits(setup["base"], seq)
    for model in setup["peft"].values():
        assert (hf_last_logits(model, seq) - base).abs().max() > 1e-2


def test_mixed_batch_matches_peft(setup: dict) -> None:
    runner = setup["runner"]
    slots = [1, -1, 0, 2, 1, -1, 0]
    seqs = random_prompts([6, 9, 3, 12, 1, 7, 5], seed=6)
    tables = shuffled_tables(len(seqs), 5, runner.info.num_blocks, seed=6)
    out = runner.execute(prefill_chunks(seqs, tables, slots))
    torch.testing.assert_close(out, _reference(setup, seqs, slots), **TOL)
    for _ in range(2):
        out = runner.execute(decode_chunks(seqs, out.argmax(-1).tolist(), tables, slots))
        torch.testing.assert_close(out, _reference(setup, seqs, slots), **TOL)


def test_cleared_slot_is_base(setup: dict) -> None:
    runner = setup["runner"]
    load_lora(runner, 3, peft_weights(setup["peft"][0]))
    seqs = random_prompts([8, 8], seed=7)
    tables = shuffled_tables(2, 3, runner.info.num_blocks, seed=7)
    out = runner.execute(prefill_chunks(seqs, tables, [3, -1]))
    torch.testing.assert_close(out[0], _reference(setup, seqs[:1], [0])[0], **TOL)
    runner.clear_slot(3)
    out = runner.execute([SeqChunk(0, seqs[0], 0, tables[0], True, adapter_slot=3)])
    torch.testing.assert_close(out, hf_last_logits(setup["base"], seqs[:1]), **TOL)


def test_load_lora_rejects_bad_weights(setup: dict) -> None:
    runner = setup["runner"]
    good = peft_weights(setup["peft"][1])
    with pytest.raises(ValueError, match="slot 4"):
        load_lora(runner, 4, good)
    a, b, s = good[(0, "q_proj")]
    with pytest.raises(ValueError, match="rank 9 exceeds --max-rank 8"):
        load_lora(runner, 3, {(0, "q_proj"): (torch.zeros(9, a.shape[1]), torch.zeros(b.shape[0], 9), s)})
    with pytest.raises(ValueError, match="expected A"):
        load_lora(runner, 3, {(0, "k_proj"): (a, b, s)})  # q's B is wider than k's output
    with pytest.raises(ValueError, match="module not one of"):
        load_lora(runner, 3, {(0, "lm_head"): (a, b, s)})


def test_base_weight_views_match_hf(setup: dict) -> None:
    """DeviceContext.base_weight (what a DoRA-like family reads) is each projection's own HF weight."""
    runner, hf = setup["runner"], setup["base"]
    for name in ALL:
        parent = hf.model.layers[1].self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) \
            else hf.model.layers[1].mlp
        torch.testing.assert_close(runner.decoder.base_weight(1, name), getattr(parent, name).weight.detach())
