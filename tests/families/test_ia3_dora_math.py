"""IA3 and DoRA at module level against peft 0.21's own layers, mixed with base rows and a second adapter.

For every targeted projection of a tiny Qwen2 (q/k/v carry biases, which DoRA and IA3 treat differently),
each adapter's slot form (`IA3Slots` / `DoraSlots`, the device forms the server uses) is driven through its
step hooks on a batch that interleaves two adapters' rows with base rows; each adapter's rows must equal
peft's layer output for that adapter alone, base rows the plain projection. DoRA's weight norms are
computed when a slot is loaded: a step reads no base weight.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from adapters_store.loader import load_adapter
from kernels.metadata import LoRAMeta
from server.families.dora import DoraSlots, fold_dora
from server.families.ia3 import IA3Slots
from server.model.hooks import DeviceContext
from server.model.shapes import BaseModelInfo
from tests.adapters import make_dora, make_ia3, peft_model
from tests.tiny import make_tiny_checkpoint

SLOTS = [0, -1, 1, 1, -1, 0, 0, 1]  # two adapters' rows interleaved with base rows


def _info(model: Any) -> BaseModelInfo:
    c = model.config
    return BaseModelInfo(model_type=c.model_type, num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
                         intermediate_size=c.intermediate_size, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, head_dim=c.hidden_size // c.num_attention_heads,
                         vocab_size=c.vocab_size)


def _modules(model: Any) -> dict[tuple[int, str], Any]:
    hf = model.base_model.model if hasattr(model, "peft_config") else model  # a PeftModel wraps the HF model
    out = {}
    for i, layer in enumerate(hf.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for name, mod in parent.named_children():
                if name.endswith("_proj"):
                    out[(i, name)] = mod
    return out


def _base_linear(mod: Any) -> Any:
    return mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = str(tmp_path_factory.mktemp("ia3-dora"))
    base = make_tiny_checkpoint(root, "qwen2", seed=5)
    # HF initialises biases to zero; DoRA rescales the biased output without its bias and IA3 scales it with
    # it, so make them count
    path = os.path.join(base, "model.safetensors")
    state = load_file(path)
    g = torch.Generator().manual_seed(9)
    for k in state:
        if k.endswith("proj.bias"):
            state[k] = torch.randn(state[k].shape, generator=g) * 0.5
    save_file(state, path, metadata={"format": "pt"})
    return {
        "base": base,
        "ia3": [make_ia3(base, os.path.join(root, "ia3-a"), seed=1),
                make_ia3(base, os.path.join(root, "ia3-b"), seed=2,
                         target_modules=["q_proj", "o_proj", "gate_proj", "up_proj"],
                         feedforward_modules=["o_proj", "gate_proj"])],
        "dora": [make_dora(base, os.path.join(root, "dora-a"), r=4, targets="all-linear", seed=3),
                 make_dora(base, os.path.join(root, "dora-b"), r=8, targets=["k_proj", "v_proj", "up_proj"], seed=4,
                           use_rslora=True)],
    }


def _ctx(info: BaseModelInfo, base_modules: dict[tuple[int, str], Any], calls: list[int]) -> DeviceContext:
    def base_weight(layer: int, name: str) -> torch.Tensor:
        calls.append(1)
        return _base_linear(base_modules[(layer, name)]).weight.detach()

    def base_bias(layer: int, name: str) -> torch.Tensor | None:
        calls.append(1)
        bias = _base_linear(base_modules[(layer, name)]).bias
        return None if bias is None else bias.detach()

    return DeviceContext(shapes=info, max_adapters=3, max_rank=16, dtype=torch.float32, device=torch.device("cpu"),
                         kv_cache=None, base_weight=base_weight, base_bias=base_bias)


@pytest.mark.parametrize("family", ["ia3", "dora"])
def test_slot_forms_match_peft_layers(setup: dict[str, Any], family: str) -> None:
    torch.manual_seed(0)
    base_model = peft_model(setup["base"], None)
    info = _info(base_model)
    base_mods = _modules(base_model)
    calls: list[int] = []
    form = (IA3Slots if family == "ia3" else DoraSlots)(_ctx(info, base_mods, calls))
    peft_mods = []
    for slot, d in enumerate(setup[family]):
        form.load(slot, load_adapter(d, info, max_rank=16), [])
        peft_mods.append(_modules(peft_model(setup["base"], d)))
    loads = len(calls)
    assert family == "ia3" or loads > 0  # DoRA read the base weights at load
    meta = LoRAMeta.from_token_slots(SLOTS)
    batch = SimpleNamespace(segments=meta, active_slots=(0, 1))
    checked = 0
    for (layer, name), base_mod in base_mods.items():
        lin = _base_linear(base_mod)
        x = torch.randn(len(SLOTS), lin.in_features)
        with torch.inference_mode():
            xin = form.project_input(layer, name, x, batch) if name not in ("q_proj", "k_proj", "v_proj") else x
            y = F.linear(xin, lin.weight, lin.bias)
            form.project_output(layer, name, xin, y, batch)
            plain = F.linear(x, lin.weight, lin.bias)
            for slot in (0, 1):
                rows = [t for t, s in enumerate(SLOTS) if s == slot]
                want = peft_mods[slot][(layer, name)](x[rows])
                torch.testing.assert_close(y[rows], want, atol=1e-5, rtol=1e-5)
                if not torch.allclose(want, plain[rows], atol=1e-4):
                    checked += 1  # this adapter changes this module: the comparison above could fail
            base_rows = [t for t, s in enumerate(SLOTS) if s < 0]
            assert torch.equal(y[base_rows], plain[base_rows])
    assert checked >= 8
    assert len(calls) == loads  # a step reads no base weight: DoRA's norms were computed once, at load


def test_fold_dora_is_peft_formula() -> None:
    """y = base(x) + (g - 1)(base(x) - b) + g s B A x  ==  (x W^T + b) g + b (1 - g) + s (A x)(g B)^T."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    a, bb = torch.randn(4, 24, generator=g), torch.randn(40, 4, generator=g)
    m = torch.rand(40, generator=g) + 0.5
    s = 1.7
    x = torch.randn(6, 24, generator=g)
    norm = torch.linalg.norm(w + s * (bb @ a), dim=1)
    base = x @ w.T + b
    want = base + (m / norm - 1) * (base - b) + (m / norm) * (x @ a.T @ bb.T) * s
    gg, gb, add = fold_dora(w, b, a, bb, s, m)
    got = base * gg + add + s * (x @ a.T) @ gb.T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, base + s * (x @ a.T @ bb.T), atol=1e-3)  # the magnitude matters
