"""parse_config resolves the same modules, ranks and scalings as PeftModel, and refuses clearly."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from adapters_store import AdapterError, LoraSpec, PrefixSpec, PromptSpec, load_config, parse_config, validate_name
from tests.adapters_store.helpers import base_info_of, hf_model, make_peft, read_cfg

LORA_CASES = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "all_linear": dict(target_modules="all-linear"),
    "regex": dict(target_modules=r".*\.(self_attn\.k_proj|mlp\.up_proj)"),
    "regex_one_layer": dict(target_modules=r"model\.layers\.1\..*_proj"),
    "rslora": dict(target_modules=["q_proj", "o_proj"], use_rslora=True, r=16, lora_alpha=4),
    "patterns": dict(
        target_modules=["q_proj", "k_proj", "gate_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6, r"k_pr.*": 3},
        alpha_pattern={"gate_proj": 32, "layers.0.self_attn.q_proj": 5},
    ),
    "patterns_rslora": dict(target_modules=["up_proj"], use_rslora=True, rank_pattern={"layers.0.mlp.up_proj": 2},
                            alpha_pattern={"up_proj": 3}),
    "layers_to_transform": dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers"),
    "layers_int_no_pattern": dict(target_modules=["v_proj"], layers_to_transform=0),
    "exact_name_skips_layer_filter": dict(
        target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1]
    ),
    "exclude": dict(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.1.self_attn.v_proj"]),
}


def _peft_modules(pm: Any) -> dict[tuple[int, str], tuple[int, float]]:
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            m = re.fullmatch(r"model\.layers\.(\d+)\.\w+\.(\w+)", name)
            assert m, name
            out[(int(m.group(1)), m.group(2))] = (mod.r["default"], mod.scaling["default"])
    return out


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_resolution_matches_peft(case: str, tmp_path: Path) -> None:
    from peft import LoraConfig

    kwargs = {"r": 4, "lora_alpha": 8, **LORA_CASES[case]}
    pm = make_peft(LoraConfig(init_lora_weights=False, **kwargs), tmp_path)
    expected = _peft_modules(pm)
    spec = parse_config(read_cfg(tmp_path), base_info_of(pm.base_model.model), max_rank=64)
    assert isinstance(spec, LoraSpec)
    got = {k: (m.rank, m.scaling) for k, m in spec.modules.items()}
    assert got.keys() == expected.keys()
    for key, (rank, scaling) in expected.items():
        assert got[key][0] == rank, key
        assert got[key][1] == pytest.approx(scaling), key
    assert spec.rank == max(r for r, _ in expected.values())


def _lora(**kw: Any) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none", **kw}


REFUSALS = [
    (_lora(r=128), "r", ["rank 128", "--max-rank 64"]),
    (_lora(rank_pattern={"q_proj": 100}), "rank_pattern['q_proj']", ["rank 100", "--max-rank 64"]),
    (_lora(modules_to_save=["lm_head"]), "modules_to_save", ["modules_to_save", "lm_head"]),
    (_lora(target_modules=["q_proj", "lm_head"]), "target_modules", ["'lm_head'", "supported modules"]),
    (_lora(target_modules=["embed_tokens"]), "target_modules", ["'embed_tokens'", "embeddings"]),
    (_lora(target_modules=".*embed_tokens"), "target_modules", ["embed_tokens"]),
    (_lora(target_modules=["c_attn"]), "target_modules", ["'c_attn'", "matches no module", "q_proj"]),
    (_lora(target_modules=["q_proj"], layers_to_transform=[5]), "layers_to_transform", ["layer 5", "0..1"]),
    (_lora(target_modules=["q_proj"], exclude_modules="model.*"), "target_modules", ["selects no module"]),
    (_lora(bias="all"), "bias", ["bias 'all'", "'none'"]),
    (_lora(bias="lora_only"), "bias", ["'lora_only'"]),
    (_lora(lora_bias=True), "lora_bias", ["lora_bias"]),
    (_lora(target_parameters=["mlp.experts.gate_up_proj"]), "target_parameters", ["target_parameters"]),
    (_lora(init_lora_weights="pissa"), "init_lora_weights", ["'pissa'", "base weights"]),
    (_lora(r=0), "r", ["r 0", ">= 1"]),
    (_lora(target_modules=None), "target_modules", ["target_modules None"]),
    (_lora(auto_map={"AutoModel": "evil.Model"}), "auto_map", ["auto_map", "remote code"]),
    ({"peft_type": "LOHA", "target_modules": ["q_proj"]}, "peft_type", ["'LOHA'", "LORA, DORA, PREFIX_TUNING", "IA3"]),
    ({"peft_type": None}, "peft_type", ["None", "PROMPT_TUNING"]),
    (_lora(task_type="SEQ_CLS"), "task_type", ["'SEQ_CLS'", "CAUSAL_LM"]),
    ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "num_layers": 2, "num_attention_heads": 4,
      "token_dim": 64}, "num_attention_heads", ["num_attention_heads 4", "num_attention_heads=2"]),
    ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "num_layers": 3, "num_attention_heads": 2,
      "token_dim": 32}, "num_layers", ["num_layers 3", "num_layers=2"]),
    ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "num_layers": 2, "num_attention_heads": 2,
      "token_dim": 64}, "token_dim", ["token_dim 64", "token_dim=32"]),
    ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 0, "num_layers": 2, "num_attention_heads": 2,
      "token_dim": 32}, "num_virtual_tokens", ["num_virtual_tokens 0"]),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "token_dim": 32}, "token_dim",
     ["token_dim 32", "token_dim=64"]),
    ({"peft_type": "P_TUNING", "num_virtual_tokens": 4, "token_dim": 64, "num_transformer_submodules": 2},
     "num_transformer_submodules", ["num_transformer_submodules 2"]),
]


@pytest.mark.parametrize(("cfg", "field", "needles"), REFUSALS, ids=[f"{i}-{r[1]}" for i, r in enumerate(REFUSALS)])
def test_refusals(cfg: dict[str, Any], field: str, needles: list[str], llama_base: Any) -> None:
    with pytest.raises(AdapterError) as info:
        parse_config(cfg, llama_base, max_rank=64)
    assert info.value.field == field
    for needle in needles:
        assert needle in str(info.value)
    assert info.value.status in (400, 422)


def test_base_model_name_is_recorded_not_used(llama_base: Any) -> None:
    spec = parse_config(_lora(base_model_name_or_path="https://evil.example/model"), llama_base, max_rank=64)
    assert spec.base_model_name_or_path == "https://evil.example/model"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_config_from_peft(kind: str, projection: bool, tmp_path: Path) -> None:
    from peft import PrefixTuningConfig

    pm = make_peft(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection),
                   tmp_path, kind=kind)
    spec = parse_config(load_config(tmp_path / "adapter_config.json"), base_info_of(pm.base_model), max_rank=8)
    assert isinstance(spec, PrefixSpec)
    assert (spec.num_virtual_tokens, spec.num_layers, spec.num_kv_heads, spec.head_dim) == (3, 2, 2, 16)
    assert spec.prefix_projection is projection and spec.rank is None


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "P_TUNING"])
def test_prompt_config_from_peft(peft_type: str, tmp_path: Path) -> None:
    from peft import PromptEncoderConfig, PromptTuningConfig

    cfg_cls = PromptTuningConfig if peft_type == "PROMPT_TUNING" else PromptEncoderConfig
    pm = make_peft(cfg_cls(task_type="CAUSAL_LM", num_virtual_tokens=5), tmp_path)
    spec = parse_config(read_cfg(tmp_path), base_info_of(pm.base_model), max_rank=8)
    assert isinstance(spec, PromptSpec)
    assert (spec.peft_type, spec.num_virtual_tokens, spec.token_dim) == (peft_type, 5, 64)


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="missing") as info:
        load_config(tmp_path / "adapter_config.json")
    assert info.value.field == "adapter_config.json"
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_config(tmp_path / "adapter_config.json")
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="JSON object"):
        load_config(tmp_path / "adapter_config.json")


@pytest.mark.parametrize("name", ["a", "my-adapter_v1.2", "A" * 64, "0abc"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "a..b", "A" * 65, "with space", "é", "a\x00"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(AdapterError) as info:
        validate_name(name)
    assert info.value.field == "name" and info.value.status == 400 and repr(name) in str(info.value)


def test_other_base_models(tmp_path: Path) -> None:
    """A Qwen2 base (biased q/k/v) resolves the same way."""
    base = base_info_of(hf_model("qwen2"))
    spec = parse_config(_lora(target_modules=["k_proj"]), base, max_rank=64)
    assert sorted(spec.modules) == [(0, "k_proj"), (1, "k_proj")]
