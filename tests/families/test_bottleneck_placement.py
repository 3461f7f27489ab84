"""The bottleneck placement formula (server.families.bottleneck) against the `adapters` library's own output.

The HF model (transformers, this venv) runs with forward hooks that replace o_proj's and down_proj's
outputs by `block_output_ref(h, a)`; its greedy tokens and logprobs must equal what `adapters` 1.3 computed
for the same adapter (tests/fixtures/bottleneck/expected.json). This pins the residual/norm order the
server's kernel path must follow, independently of the server.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters_store.safetensors_check import load_checked
from server.families.bottleneck import block_output_ref, bottleneck_weights, parse_bottleneck
from tests.families.bottleneck_fixtures import ARCHS, FIXTURES, adapter_dir, adapter_names, expected


def _greedy(model: torch.nn.Module, prompt: list[int], n: int, eos: int) -> tuple[list[int], list[float]]:
    ids, lps = list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            logp = torch.log_softmax(logits, -1)
            logits[eos] = float("-inf")
            tok = int(logits.argmax())
            ids.append(tok)
            lps.append(float(logp[tok]))
    return ids[len(prompt):], lps


@pytest.mark.parametrize("arch", ARCHS)
def test_placement_formula_reproduces_adapters_library(arch: str) -> None:
    exp = expected()["archs"][arch]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, arch, "base"), dtype=torch.float32).eval()
    cfg = model.config
    prompts = exp["prompts"][:2]  # two of the four keep this quick; the e2e test serves all four
    base_out = [_greedy(model, p, exp["n_tokens"], exp["eos_token_id"]) for p in prompts]
    assert [t for t, _ in base_out] == [t for t, _ in exp["base"][:2]]  # same base as the reference saw
    for name in adapter_names(arch):
        with open(os.path.join(adapter_dir(arch, name), "adapter_config.json")) as f:
            spec = parse_bottleneck(json.load(f), hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
                                    max_width=4 * cfg.hidden_size)
        weights = bottleneck_weights(spec, load_checked(os.path.join(adapter_dir(arch, name), "adapter.safetensors"),
                                                        name="adapter.safetensors"), cfg.hidden_size)
        handles, resid = [], {}
        for i, layer in enumerate(model.model.layers):
            for block, norm, proj in (("attn", layer.input_layernorm, layer.self_attn.o_proj),
                                      ("mlp", layer.post_attention_layernorm, layer.mlp.down_proj)):
                handles.append(norm.register_forward_pre_hook(
                    lambda mod, args, key=(i, block), r=resid: r.__setitem__(key, args[0])))
                if (i, block) in spec.modules:
                    w = weights[(i, block)]
                    handles.append(proj.register_forward_hook(
                        lambda m, a, out, key=(i, block), w=w, s=spec, r=resid: block_output_ref(s, w, r[key], out)))
        try:
            got = [_greedy(model, p, exp["n_tokens"], exp["eos_token_id"]) for p in prompts]
        finally:
            for h in handles:
                h.remove()
        assert sum(g[0] != b[0] for g, b in zip(exp[name], exp["base"], strict=True)) >= 2, name  # it steers
        want = exp[name][:2]
        for (toks, lps), (wtoks, wlps) in zip(got, want, strict=True):
            assert toks == wtoks, (arch, name)
            assert max(abs(a - b) for a, b in zip(lps, wlps, strict=True)) < 1e-4, (arch, name)
