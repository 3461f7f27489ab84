"""The bad-input table of the IA3, DoRA and bottleneck families: every refusal names the field and the value.

Configs go through `parse_config` (the store's entry point); weights and extra files through `load_adapter`
on a directory made from a real adapter with one thing broken, so a refusal is the only possible outcome.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_store import AdapterError, parse_config
from adapters_store.loader import load_adapter
from server.families.bottleneck import BottleneckAdapterSpec
from server.families.dora import DoraSpec
from server.families.ia3 import IA3Spec
from server.model.shapes import BaseModelInfo
from tests.families.bottleneck_fixtures import adapter_dir

LLAMA = BaseModelInfo(model_type="llama", num_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=259)


def _bn_cfg(**config: Any) -> dict[str, Any]:
    cfg = json.loads((Path(adapter_dir("llama", "seqbn-r16")) / "adapter_config.json").read_text())
    cfg["config"].update(config)
    return cfg


def _ia3(**kw: Any) -> dict[str, Any]:
    return {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
            "feedforward_modules": ["down_proj"], **kw}


def _dora(**kw: Any) -> dict[str, Any]:
    return {"peft_type": "LORA", "use_dora": True, "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], **kw}


CONFIG_REFUSALS = [
    # IA3
    (_ia3(fan_in_fan_out=True), "fan_in_fan_out", ["fan_in_fan_out true"]),
    (_ia3(feedforward_modules=["down_proj", "up_proj"]), "feedforward_modules", ["'up_proj'", "subset"]),
    (_ia3(target_modules=["k_proj", "v_proj"], feedforward_modules=["k_proj"]), "feedforward_modules",
     ["k_proj", "fused"]),
    (_ia3(feedforward_modules="(*"), "feedforward_modules", ["'(*'", "regular expression"]),
    (_ia3(target_modules=["lm_head"]), "target_modules", ["'lm_head'"]),
    (_ia3(layers_to_transform=[0]), "layers_to_transform", ["layers_to_transform [0]"]),
    (_ia3(modules_to_save=["lm_head"]), "modules_to_save", ["modules_to_save"]),
    # DoRA: LoRA's checks, with DoRA allowed
    (_dora(r=128), "r", ["rank 128", "--max-rank 64"]),
    (_dora(bias="all"), "bias", ["bias 'all'"]),
    (_dora(target_modules=["embed_tokens"]), "target_modules", ["'embed_tokens'"]),
    # bottleneck (AdapterHub)
    (_bn_cfg(phm_layer=True), "config.phm_layer", ["config.phm_layer True", "Compacter"]),
    (_bn_cfg(use_gating=True), "config.use_gating", ["config.use_gating True", "gated"]),
    (_bn_cfg(ln_before=True), "config.ln_before", ["config.ln_before True", "layer norm"]),
    (_bn_cfg(ln_after=True), "config.ln_after", ["config.ln_after True"]),
    (_bn_cfg(inv_adapter="nice", inv_adapter_reduction_factor=2), "config.inv_adapter",
     ["config.inv_adapter 'nice'", "invertible"]),
    (_bn_cfg(cross_adapter=True), "config.cross_adapter", ["config.cross_adapter True"]),
    (_bn_cfg(original_ln_after=False), "config.original_ln_after", ["config.original_ln_after False"]),
    (_bn_cfg(residual_before_ln="post_add"), "config.residual_before_ln", ["'post_add'"]),
    (_bn_cfg(scaling="learned"), "config.scaling", ["config.scaling 'learned'"]),
    (_bn_cfg(scaling="channel"), "config.scaling", ["'channel'"]),
    (_bn_cfg(non_linearity="mish"), "config.non_linearity", ["'mish'", "relu"]),
    (_bn_cfg(reduction_factor=0), "config.reduction_factor", ["config.reduction_factor 0", "> 0"]),
    (_bn_cfg(reduction_factor={"0": 4}), "config.reduction_factor", ["layer 1", "'default'"]),
    (_bn_cfg(reduction_factor=0.01), "config.reduction_factor", ["width 6399", "limit of 256"]),
    (_bn_cfg(leave_out=[0, 1]), "config.output_adapter", ["place no adapter"]),
    (_bn_cfg(mh_adapter=False, output_adapter=False), "config.output_adapter", ["place no adapter"]),
    (_bn_cfg(architecture="union"), "config.architecture", ["config.architecture 'union'"]),
    (_bn_cfg(fusion_method="dynamic"), "config.fusion_method", ["'dynamic'", "composition"]),
    (_bn_cfg(new_knob=3), "config.new_knob", ["config.new_knob 3", "unknown"]),
    ({**_bn_cfg(), "config": "seq_bn"}, "config", ["'seq_bn'", "preset"]),
    ({**_bn_cfg(), "hidden_size": 128}, "hidden_size", ["hidden_size 128", "64"]),
    ({**_bn_cfg(), "name": None}, "name", ["name None"]),
]


@pytest.mark.parametrize(("cfg", "field", "needles"), CONFIG_REFUSALS,
                         ids=[f"{i}-{r[1]}" for i, r in enumerate(CONFIG_REFUSALS)])
def test_config_refusals(cfg: dict[str, Any], field: str, needles: list[str]) -> None:
    with pytest.raises(AdapterError) as info:
        parse_config(cfg, LLAMA, max_rank=64)
    assert info.value.field == field
    for needle in needles:
        assert needle in str(info.value)
    assert 400 <= info.value.status < 500


def test_configs_accepted_resolve_families() -> None:
    ia3 = parse_config({"peft_type": "IA3", "target_modules": None, "feedforward_modules": None}, LLAMA, max_rank=64)
    assert isinstance(ia3, IA3Spec)  # peft's llama defaults: k, v, down (down scales its input)
    assert ia3.modules == {(i, m): m == "down_proj" for i in range(2) for m in ("k_proj", "v_proj", "down_proj")}
    regex = parse_config(_ia3(target_modules=["o_proj", "up_proj", "v_proj"], feedforward_modules=r".*\.(o|up)_proj"),
                         LLAMA, max_rank=64)
    assert isinstance(regex, IA3Spec)  # a regex string must match the whole module name
    assert {m for (_, m), ff in regex.modules.items() if ff} == {"o_proj", "up_proj"}
    dora = parse_config(_dora(), LLAMA, max_rank=64)
    assert isinstance(dora, DoraSpec) and dora.peft_type == "DORA" and dora.rank == 8
    bn = parse_config(_bn_cfg(reduction_factor={"1": 4, "default": 32}, mh_adapter=True, leave_out=[]), LLAMA,
                      max_rank=64)
    assert isinstance(bn, BottleneckAdapterSpec) and bn.peft_type == "BOTTLENECK"
    assert bn.bn.modules == {(0, "attn"): 2, (0, "mlp"): 2, (1, "attn"): 16, (1, "mlp"): 16}


# ---- weights and files -----------------------------------------------------------------------------------


def _copy(src: str, tmp: Path) -> Path:
    dst = tmp / "a"
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(d: Path, name: str, fn: Any) -> None:
    t = load_file(str(d / name))
    fn(t)
    save_file(t, str(d / name))


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.adapters import make_dora, make_ia3
    from tests.families.bottleneck_fixtures import base_copy

    root = tmp_path_factory.mktemp("fam-refusals")
    base = base_copy(str(root), "llama")
    return {"ia3": make_ia3(base, str(root / "ia3")),
            "dora": make_dora(base, str(root / "dora"), r=4, targets=["q_proj", "down_proj"])}


def _ia3_key(k: str) -> str:
    return f"base_model.model.model.layers.0.{k}.ia3_l"


WEIGHT_REFUSALS = [
    ("ia3", "adapter_model.safetensors", lambda t: t.pop(_ia3_key("self_attn.k_proj")),
     _ia3_key("self_attn.k_proj"), "missing"),
    ("ia3", "adapter_model.safetensors",
     lambda t: t.__setitem__(_ia3_key("self_attn.k_proj"), torch.ones(1, 64)),  # feed-forward shape, not [out, 1]
     _ia3_key("self_attn.k_proj"), "expected [32, 1]"),
    ("ia3", "adapter_model.safetensors", lambda t: t.__setitem__(_ia3_key("self_attn.q_proj"), torch.ones(64, 1)),
     _ia3_key("self_attn.q_proj"), "does not select"),
    ("dora", "adapter_model.safetensors",
     lambda t: t.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"),
     "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector", "missing"),
    ("dora", "adapter_model.safetensors",
     lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector", torch.ones(128)),
     "base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector", "expected [64]"),
    ("dora", "adapter_model.safetensors",
     lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector", torch.zeros(64)),
     "base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector", "non-zero"),
    ("bn", "adapter.safetensors",
     lambda t: t.pop("model.layers.1.output_adapters.adapters.seqbn-r16.adapter_up.bias"),
     "model.layers.1.output_adapters.adapters.seqbn-r16.adapter_up.bias", "missing"),
    ("bn", "adapter.safetensors",
     lambda t: t.__setitem__("model.layers.0.output_adapters.adapters.seqbn-r16.adapter_down.0.weight",
                             torch.ones(8, 64)),
     "model.layers.0.output_adapters.adapters.seqbn-r16.adapter_down.0.weight", "expected [4, 64]"),
    ("bn", "adapter.safetensors",  # mh_adapter is false for SeqBn: an attention adapter is not expected
     lambda t: t.__setitem__("model.layers.0.attention_adapters.adapters.seqbn-r16.adapter_up.bias", torch.ones(64)),
     "model.layers.0.attention_adapters.adapters.seqbn-r16.adapter_up.bias", "do not select"),
    ("bn", "adapter.safetensors",  # a gating unit (UniPELT) slipped in without use_gating
     lambda t: t.__setitem__("model.layers.0.output_adapters.adapters.seqbn-r16.gate.weight", torch.ones(1, 64)),
     "model.layers.0.output_adapters.adapters.seqbn-r16.gate.weight", "holds only"),
]


@pytest.mark.parametrize(("kind", "fname", "edit", "field", "needle"), WEIGHT_REFUSALS,
                         ids=[f"{i}-{r[0]}" for i, r in enumerate(WEIGHT_REFUSALS)])
def test_weight_refusals(kind: str, fname: str, edit: Any, field: str, needle: str, peft_dirs: dict[str, str],
                         tmp_path: Path) -> None:
    src = adapter_dir("llama", "seqbn-r16") if kind == "bn" else peft_dirs[kind]
    d = _copy(src, tmp_path)
    load_adapter(d, LLAMA, max_rank=64)  # intact: accepted
    _edit_tensors(d, fname, edit)
    with pytest.raises(AdapterError) as info:
        load_adapter(d, LLAMA, max_rank=64)
    assert info.value.field == field and needle in str(info.value)


def _write_json(d: Path, name: str, obj: Any) -> None:
    (d / name).write_text(json.dumps(obj))


FILE_REFUSALS = [
    ("classification head", lambda d: _write_json(d, "head_config.json", {
        "config": {"head_type": "classification", "num_labels": 2}, "model_class": "LlamaForCausalLM"}),
     "head_config.json.config", "'classification'"),
    ("head of a non-LM model", lambda d: _write_json(d, "head_config.json", {"config": None,
                                                                            "model_class": "LlamaModel"}),
     "head_config.json.model_class", "'LlamaModel'"),
    ("head weights alone", lambda d: (d / "head_config.json").unlink(), "head_config.json", "without"),
    ("interface elsewhere", lambda d: _write_json(d, "adapter_interface.json", {
        "interface": {"layer_output_proj": "mlp.gate_proj"}}), "adapter_interface.json.interface.layer_output_proj",
     "'mlp.gate_proj'"),
    ("peft weights beside", lambda d: shutil.copy(d / "adapter.safetensors", d / "adapter_model.safetensors"),
     "adapter_model.safetensors", "does not belong to a bottleneck adapter"),
    ("pickled weights", lambda d: (d / "pytorch_adapter.bin").write_bytes(b"\x80\x04K."), "files",
     "use_safetensors=True"),
    ("no weights", lambda d: (d / "adapter.safetensors").unlink(), "adapter.safetensors", "missing"),
]


@pytest.mark.parametrize(("case", "edit", "field", "needle"), FILE_REFUSALS, ids=[r[0] for r in FILE_REFUSALS])
def test_bottleneck_file_refusals(case: str, edit: Any, field: str, needle: str, tmp_path: Path) -> None:
    d = _copy(adapter_dir("llama", "seqbn-r16"), tmp_path)  # this one comes with its (base) LM head
    assert (d / "model_head.safetensors").is_file() and (d / "head_config.json").is_file()
    load_adapter(d, LLAMA, max_rank=64)  # the base's own head is accepted (and ignored)
    edit(d)
    with pytest.raises(AdapterError) as info:
        load_adapter(d, LLAMA, max_rank=64)
    assert info.value.field == field and needle in str(info.value), str(info.value)
