"""load_adapter's tensors equal what PeftModel uses: LoRA A/B, prefix K/V (get_prompt), prompt embeds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_store import AdapterError, load_adapter
from tests.adapters_store.helpers import base_info_of, make_peft


def test_lora_weights_match_peft(tmp_path: Path) -> None:
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"layers.1.self_attn.v_proj": 2}, alpha_pattern={"down_proj": 3})
    pm = make_peft(cfg, tmp_path)
    base = base_info_of(pm.base_model.model)
    loaded = load_adapter(tmp_path, base, max_rank=16)
    assert loaded.kind == "lora" and loaded.virtual_tokens == loaded.prefix_tokens == 0
    assert len(loaded.modules) == 6
    layers = pm.base_model.model.model.layers
    for (layer, short), w in loaded.modules.items():
        parent = getattr(layers[layer], base.module_parent(short))
        mod = getattr(parent, short)
        assert w.a.dtype == torch.float32 and w.a.device.type == "cpu"
        torch.testing.assert_close(w.a, mod.lora_A["default"].weight.detach())
        torch.testing.assert_close(w.b, mod.lora_B["default"].weight.detach())
        assert w.b.abs().sum() > 0  # init_lora_weights=False: a real, non-zero delta
        assert w.scaling == pytest.approx(mod.scaling["default"])
    assert loaded.modules[(1, "v_proj")].a.shape == (2, 64)
    assert loaded.modules[(0, "down_proj")].a.shape == (4, 128)


def test_lora_delta_changes_output_like_peft(tmp_path: Path) -> None:
    """The loaded A/B/scaling reproduce PeftModel's q_proj output (and differ from the base's)."""
    from peft import LoraConfig

    pm = make_peft(LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                              target_modules=["q_proj"]), tmp_path)
    loaded = load_adapter(tmp_path, base_info_of(pm.base_model.model), max_rank=16)
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, 64)
    w = loaded.modules[(0, "q_proj")]
    base_out = q.base_layer(x)
    ours = base_out + w.scaling * (x @ w.a.T) @ w.b.T
    with torch.no_grad():
        theirs = q(x)
    assert not torch.allclose(base_out, theirs)
    torch.testing.assert_close(ours, theirs.detach())


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_lora_missing_extra_and_misshapen_tensors(lora_dir: Path, llama_base, tmp_path: Path) -> None:
    sd = load_file(str(lora_dir / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

    d = _copy(lora_dir, tmp_path / "missing")
    save_file({k: v for k, v in sd.items() if k != key}, str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="is missing") as info:
        load_adapter(d, llama_base, max_rank=64)
    assert info.value.field == key

    d = _copy(lora_dir, tmp_path / "extra")
    save_file({**sd, "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(4, 64)},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="do not select"):
        load_adapter(d, llama_base, max_rank=64)

    d = _copy(lora_dir, tmp_path / "dora")
    save_file({**sd, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="unexpected tensor"):
        load_adapter(d, llama_base, max_rank=64)

    d = _copy(lora_dir, tmp_path / "shape")
    save_file({**sd, key: torch.zeros(64, 5)}, str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"shape \[64, 5\], expected \[64, 4\]"):
        load_adapter(d, llama_base, max_rank=64)

    d = _copy(lora_dir, tmp_path / "nan")
    save_file({**sd, key: torch.full((64, 4), float("nan"))}, str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="NaN/Inf"):
        load_adapter(d, llama_base, max_rank=64)


def test_pickle_in_dir_refused_without_opening(lora_dir: Path, llama_base, tmp_path: Path) -> None:
    d = _copy(lora_dir, tmp_path / "pickle")
    (d / "adapter_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(AdapterError, match="pickled"):
        load_adapter(d, llama_base, max_rank=64)


def test_missing_weights_and_rank_cap(lora_dir: Path, llama_base, tmp_path: Path) -> None:
    d = _copy(lora_dir, tmp_path / "noweights")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        load_adapter(d, llama_base, max_rank=64)
    with pytest.raises(AdapterError, match="rank 4 .* exceeds --max-rank 2"):
        load_adapter(lora_dir, llama_base, max_rank=2)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_kv_equals_peft_get_prompt(kind: str, projection: bool, tmp_path: Path) -> None:
    from peft import PrefixTuningConfig

    pm = make_peft(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection,
                                      encoder_hidden_size=24), tmp_path, kind=kind)
    loaded = load_adapter(tmp_path, base_info_of(pm.base_model), max_rank=8)
    assert loaded.kind == "prefix" and loaded.prefix_tokens == 3 and loaded.virtual_tokens == 0
    assert loaded.keys.shape == (2, 3, 2, 16) == loaded.values.shape  # [L, P, kv, hd]
    with torch.no_grad():
        cache = pm.get_prompt(batch_size=1)
    for layer in range(2):
        k = cache.layers[layer].keys  # [1, kv, P, hd]
        v = cache.layers[layer].values
        torch.testing.assert_close(loaded.keys[layer], k[0].permute(1, 0, 2))
        torch.testing.assert_close(loaded.values[layer], v[0].permute(1, 0, 2))
    assert not torch.allclose(loaded.keys, loaded.values)


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_reloaded_in_inference_mode(projection: bool, tmp_path: Path) -> None:
    """What PeftModel.from_pretrained serves equals what we load (the encoder output was saved)."""
    from peft import PeftModel, PrefixTuningConfig

    from tests.adapters_store.helpers import hf_model

    make_peft(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, prefix_projection=projection),
              tmp_path)
    model = hf_model("llama")
    pm = PeftModel.from_pretrained(model, str(tmp_path))
    loaded = load_adapter(tmp_path, base_info_of(model), max_rank=8)
    with torch.no_grad():
        cache = pm.get_prompt(batch_size=1)
    torch.testing.assert_close(loaded.keys[1], cache.layers[1].keys[0].permute(1, 0, 2))


@pytest.mark.parametrize("method", ["prompt_random", "prompt_vocab", "p_tuning_mlp", "p_tuning_lstm"])
def test_prompt_embeds_equal_peft(method: str, tmp_path: Path) -> None:
    from peft import PromptEncoderConfig, PromptTuningConfig

    if method.startswith("prompt"):
        init = "RANDOM" if method == "prompt_random" else "SAMPLE_VOCAB"
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init=init)
    else:
        cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32,
                                  encoder_reparameterization_type=method.rsplit("_", 1)[1].upper())
    pm = make_peft(cfg, tmp_path, randomize=not method.endswith("vocab"))
    loaded = load_adapter(tmp_path, base_info_of(pm.base_model), max_rank=8)
    assert loaded.kind == "prompt" and loaded.embeds.shape == (4, 64)
    with torch.no_grad():
        expected = pm.get_prompt(batch_size=1)[0]
    torch.testing.assert_close(loaded.embeds, expected)
    if method.startswith("p_tuning"):  # the encoder ran: the raw embedding table is not what is served
        assert not torch.allclose(expected, pm.prompt_encoder["default"].embedding.weight)


def test_prompt_tensor_checks(tmp_path: Path, llama_base) -> None:
    from peft import PromptTuningConfig

    make_peft(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["num_virtual_tokens"] = 5
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"shape \[4, 64\], expected \[5, 64\]"):
        load_adapter(tmp_path, llama_base, max_rank=8)
    save_file({"prompt_embeddings": torch.zeros(5, 64), "extra": torch.zeros(1)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="unexpected tensor 'extra'"):
        load_adapter(tmp_path, llama_base, max_rank=8)


def test_prefix_kv_reproduce_peft_logits(tmp_path: Path) -> None:
    """Fed to the base as a KV cache (un-rotated, prompt positions starting at P), our K/V give PEFT's logits."""
    from peft import PrefixTuningConfig
    from transformers import DynamicCache

    pm = make_peft(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True),
                   tmp_path, kind="qwen2")
    base_model = pm.get_base_model()
    loaded = load_adapter(tmp_path, base_info_of(base_model), max_rank=8)
    ids = torch.tensor([[5, 17, 42, 99]])
    cache = DynamicCache()
    for layer in range(2):
        k, v = (t[layer].permute(1, 0, 2)[None] for t in (loaded.keys, loaded.values))
        cache.update(k, v, layer)  # [1, kv, P, hd]
    with torch.no_grad():
        ours = base_model(input_ids=ids, past_key_values=cache, attention_mask=torch.ones(1, 7)).logits
        theirs = pm(input_ids=ids, attention_mask=torch.ones(1, 4)).logits
        plain = base_model(input_ids=ids).logits
    assert not torch.allclose(plain, theirs, atol=1e-4)
    torch.testing.assert_close(ours, theirs)


def test_prompt_embeds_reproduce_peft_logits(tmp_path: Path) -> None:
    from peft import PromptEncoderConfig

    pm = make_peft(PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32), tmp_path)
    base_model = pm.get_base_model()
    loaded = load_adapter(tmp_path, base_info_of(base_model), max_rank=8)
    ids = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        embeds = torch.cat([loaded.embeds[None], base_model.get_input_embeddings()(ids)], dim=1)
        ours = base_model(inputs_embeds=embeds).logits
        theirs = pm(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs)
