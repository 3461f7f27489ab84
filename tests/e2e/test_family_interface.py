"""A family is one module: a toy family defined only here, served mixed with LoRA through the real server.

The toy family ("TOY_O_BIAS") adds a per-adapter bias vector to o_proj's output in chosen layers. It
goes through the whole public interface (config parse, weight checks, a device form with a row hook)
and nothing else in the stack is told about it. The reference is the HF model with the same bias
added by a forward hook on o_proj, and PEFT for the LoRA requests; greedy tokens must match exactly.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file

import server.families as families
from adapters_store.errors import AdapterError
from server.families.base import Adapter, AdapterFamily, AdapterSpec, DeviceContext, DeviceForm
from server.model.batch import StepBatch
from server.model.shapes import BaseModelInfo
from tests.adapters import greedy, load_base, make_lora, peft_model
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint

N_TOKENS = 8


# ---- the toy family: everything it is, in one place ------------------------------------------------
@dataclass(frozen=True)
class OBiasSpec(AdapterSpec):
    layers: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class OBiasAdapter(Adapter):
    bias: dict[int, torch.Tensor]  # layer -> [hidden]


class OBiasForm(DeviceForm):
    """bias[slot, layer, hidden] on the device; rows of this family's slots get it added to o_proj."""

    def __init__(self, ctx: DeviceContext) -> None:
        s = ctx.shapes
        self.bias = torch.zeros(ctx.max_adapters, s.num_layers, s.hidden_size, dtype=ctx.dtype, device=ctx.device)
        self.mine: set[int] = set()

    def load(self, slot: int, adapter: Adapter, kv_slots: list[int]) -> None:
        assert isinstance(adapter, OBiasAdapter)
        self.bias[slot].zero_()
        for layer, b in adapter.bias.items():
            self.bias[slot, layer].copy_(b)
        self.mine.add(slot)

    def clear(self, slot: int) -> None:
        self.bias[slot].zero_()
        self.mine.discard(slot)

    def project_output(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor, batch: StepBatch) -> None:
        if name != "o_proj":
            return
        seg = batch.segments
        for slot, start, n in zip(seg.slots, seg.starts, seg.lens, strict=True):
            if slot in self.mine and n:
                rows = seg.token_indices[start:start + n]
                y.index_add_(0, rows, self.bias[slot, layer].expand(n, -1))


class OBias(AdapterFamily):
    name = "toy-o-bias"
    peft_types = ("TOY_O_BIAS",)

    def parse(self, cfg: dict[str, Any], base: BaseModelInfo, *, max_rank: int) -> OBiasSpec:
        layers = cfg.get("layers")
        if not isinstance(layers, list) or not all(isinstance(i, int) and 0 <= i < base.num_layers for i in layers):
            raise AdapterError(f"layers {layers!r} is invalid: a list of layer indices in [0, {base.num_layers})",
                               field="layers")
        return OBiasSpec(peft_type="TOY_O_BIAS", base_model_name_or_path=None, layers=tuple(layers))

    def load(self, spec: AdapterSpec, tensors: dict[str, torch.Tensor], base: BaseModelInfo) -> OBiasAdapter:
        assert isinstance(spec, OBiasSpec)
        want = {f"o_bias.{i}" for i in spec.layers}
        if set(tensors) != want:
            raise AdapterError(f"tensors {sorted(tensors)} do not match layers {list(spec.layers)}", field="tensors")
        for k, t in tensors.items():
            if tuple(t.shape) != (base.hidden_size,):
                raise AdapterError(f"tensor {k!r} has shape {list(t.shape)}, expected [{base.hidden_size}]", field=k)
        return OBiasAdapter(family=self, spec=spec, bias={int(k.split(".")[1]): t for k, t in tensors.items()})

    def device_form(self, ctx: DeviceContext) -> OBiasForm:
        return OBiasForm(ctx)


# ---- the test ----------------------------------------------------------------------------------------
def make_obias(out_dir: str, layers: list[int], hidden: int, seed: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bias = {i: torch.randn(hidden, generator=g) * 0.5 for i in layers}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "TOY_O_BIAS", "task_type": "CAUSAL_LM", "layers": layers}, f)
    save_file({f"o_bias.{i}": b for i, b in bias.items()}, os.path.join(out_dir, "adapter_model.safetensors"))
    return bias


def obias_greedy(base_dir: str, bias: dict[int, torch.Tensor], prompt: list[int]) -> list[int]:
    """The reference: HF's model with the bias added to o_proj's output by a forward hook."""
    model = load_base(base_dir)
    for i, b in bias.items():
        model.model.layers[i].self_attn.o_proj.register_forward_hook(lambda _m, _x, y, b=b: y + b)
    return greedy(model, prompt, N_TOKENS)


@pytest.fixture()
def toy_family() -> Any:
    fam = OBias()
    families.register(fam)
    yield fam
    families.unregister(fam)


async def fire(url: str, jobs: list[tuple[str | None, list[int]]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        return await asyncio.gather(*(
            c.post("/v1/completions", json={"prompt": p, "max_tokens": N_TOKENS, "min_tokens": N_TOKENS,
                                            "temperature": 0, "return_token_ids": True, **({"model": a} if a else {})})
            for a, p in jobs))


def test_toy_family_served_mixed_with_lora(tiny_root: str, toy_family: OBias) -> None:
    base = make_tiny_checkpoint(tiny_root, "llama", seed=11)
    hidden = load_base(base).config.hidden_size
    root = os.path.join(tiny_root, "toy-family")
    biases = {"ob1": make_obias(os.path.join(root, "ob1"), [0, 1], hidden, seed=1),
              "ob2": make_obias(os.path.join(root, "ob2"), [1], hidden, seed=2)}
    lora = make_lora(base, os.path.join(root, "lora"), r=4, targets=["q_proj", "o_proj"], seed=3)
    rng = random.Random(9)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(4, 16))] for _ in range(3)]

    base_model, lora_model = peft_model(base, None), peft_model(base, lora)
    ref: dict[tuple[str | None, int], list[int]] = {}
    for i, p in enumerate(prompts):
        ref[(None, i)] = greedy(base_model, p, N_TOKENS)
        ref[("lora", i)] = greedy(lora_model, p, N_TOKENS)
        for name, bias in biases.items():
            ref[(name, i)] = obias_greedy(base, bias, p)
    for name in ("lora", *biases):  # every adapter visibly changes the base model's output
        assert any(ref[(name, i)] != ref[(None, i)] for i in range(len(prompts))), name

    names = [None, "lora", *biases]
    jobs = [(names[k % len(names)], prompts[k % len(prompts)]) for k in range(16)]
    rng.shuffle(jobs)
    adapters = [f"{n}={os.path.join(root, n)}" for n in biases] + [f"lora={lora}"]
    with live_server(model=base, adapter=adapters, max_model_len=64, kv_cache_blocks=128, block_size=8,
                     max_adapters=4, max_num_seqs=16) as srv:
        listed = {m["id"]: m.get("adapter_type") for m in srv.client().get("/v1/models").json()["data"]}
        assert listed["ob1"] == listed["ob2"] == "toy-o-bias" and listed["lora"] == "lora"
        resps = asyncio.run(fire(srv.url, jobs))
    for (name, p), r in zip(jobs, resps, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == ref[(name, prompts.index(p))], name
