"""Every new architecture with its quirks switched on serves base, LoRA, prefix, prompt and p-tuning mixed
in one batch, token for token as PEFT (greedy by full recomputation on transformers' eager attention)."""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.adapters import greedy_recompute, make_lora, make_prompt_learning, token_logprobs
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint

N_TOKENS = 6
EOS = 257  # the byte tokenizer's </s>
# Quirks on: windows shorter than the prompts, soft-capping, tied embeddings, Gemma 3's local/global RoPE.
ARCHS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "qwen3": ("qwen3", dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=5,
                            max_window_layers=1), ["q_proj", "k_proj", "up_proj"]),
    "gemma2": ("gemma2", dict(sliding_window=5, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
               ["q_proj", "v_proj", "down_proj"]),
    "gemma3": ("gemma3_text", dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"]),
               ["k_proj", "o_proj", "gate_proj"]),
    # Phi-3 has fused qkv_proj / gate_up_proj; LoRA on those is not served (see README), o/down are
    "phi3": ("phi3", dict(sliding_window=6, tie_word_embeddings=True), ["o_proj", "down_proj"]),
}
KINDS = {
    "prefix": ("prefix", dict(num_virtual_tokens=5, prefix_projection=False)),
    "prompt": ("prompt", dict(num_virtual_tokens=4)),
    "ptuning": ("ptuning", dict(num_virtual_tokens=3, encoder_hidden_size=32)),
}


def _eager(path: str, adapter: str | None) -> Any:
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return base if adapter is None else PeftModel.from_pretrained(base, adapter).eval()


@pytest.mark.parametrize("case", list(ARCHS))
def test_arch_adapter_matrix_mixed_batch_matches_peft(tiny_root: str, case: str) -> None:
    arch, quirks, lora_targets = ARCHS[case]
    base = make_tiny_checkpoint(tiny_root, arch, seed=31, **quirks)
    adapters = {name: make_prompt_learning(base, os.path.join(base + "-" + name), kind, seed=300 + i, **cfg)
                for i, (name, (kind, cfg)) in enumerate(KINDS.items())}
    adapters["lora"] = make_lora(base, base + "-lora", r=4, targets=lora_targets, seed=8)
    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (3, 11, 17)]  # longer than the windows
    names = [None, *adapters]
    ref = {}
    for name in names:
        m = _eager(base, adapters.get(name) if name else None)
        for i, p in enumerate(prompts):
            out = greedy_recompute(m, p, N_TOKENS, eos=EOS)
            ref[(name, i)] = (out, token_logprobs(m, p, out))
        if name is not None:  # the adapter changes the output, or the match below proves nothing
            assert any(ref[(name, i)][0] != ref[(None, i)][0] for i in range(len(prompts))), name
    jobs = [(names[k % len(names)], k % len(prompts)) for k in range(20)]
    rng.shuffle(jobs)

    async def fire(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            return await asyncio.gather(*(
                c.post("/v1/completions", json={"prompt": prompts[i], "max_tokens": N_TOKENS, "min_tokens": N_TOKENS,
                                                "temperature": 0, "logprobs": 0, "return_token_ids": True,
                                                **({"model": a} if a else {})})
                for a, i in jobs))

    with live_server(model=base, adapter=[f"{n}={d}" for n, d in adapters.items()], max_model_len=64,
                     kv_cache_blocks=128, block_size=4, max_adapters=4, max_num_seqs=16) as srv:
        resps = asyncio.run(fire(srv.url))
        if arch == "phi3":  # LoRA on the fused projections is refused at upload, naming the module
            fused = make_lora(base, base + "-lora-qkv", r=4, targets=["qkv_proj"], seed=9)
            files = [("files", (n, open(os.path.join(fused, n), "rb").read()))
                     for n in ("adapter_config.json", "adapter_model.safetensors")]
            with srv.client() as c:
                r = c.post("/v1/adapters", data={"name": "fused"}, files=files)
            assert 400 <= r.status_code < 500 and "qkv_proj" in r.json()["error"]["message"], r.text
    for (name, i), r in zip(jobs, resps, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        want, want_lp = ref[(name, i)]
        assert body["choices"][0]["token_ids"] == want, (case, name, i)
        got = body["choices"][0]["logprobs"]["token_logprobs"]
        assert max(abs(a - b) for a, b in zip(got, want_lp, strict=True)) < 2e-3, (case, name)
