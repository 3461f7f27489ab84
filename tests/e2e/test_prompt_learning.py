"""Prefix tuning, prompt tuning and p-tuning served beside LoRA and base in one batch, exactly as PEFT."""

from __future__ import annotations

import asyncio
import os
import random

import httpx
import pytest

from tests.adapters import greedy_recompute, make_lora, make_prompt_learning, peft_model, token_logprobs
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint
from tests.waits import engine_settled, wait_for

N_TOKENS = 6
KINDS = {
    "prefix-plain": ("prefix", dict(num_virtual_tokens=5, prefix_projection=False)),
    "prefix-proj": ("prefix", dict(num_virtual_tokens=7, prefix_projection=True, encoder_hidden_size=32)),
    "prompt": ("prompt", dict(num_virtual_tokens=4)),
    "ptuning": ("ptuning", dict(num_virtual_tokens=6, encoder_hidden_size=32)),
}


def build(root: str, arch: str) -> tuple[str, dict[str, str]]:
    base = make_tiny_checkpoint(root, arch, seed=21)
    adapters = {}
    for i, (name, (kind, cfg)) in enumerate(KINDS.items()):
        adapters[name] = make_prompt_learning(base, os.path.join(root, f"{arch}-{name}"), kind, seed=200 + i, **cfg)
    adapters["lora"] = make_lora(base, os.path.join(root, f"{arch}-pl-lora"), r=8, targets=["q_proj", "up_proj"],
                                 seed=7)
    return base, adapters


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prompt_learning_mixed_with_lora_matches_peft(tiny_root, arch):
    base, adapters = build(tiny_root, arch)
    rng = random.Random(9)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(3, 20))] for _ in range(3)]
    eos = 257
    ref = {}
    base_model = peft_model(base, None)
    for name in [None, *adapters]:
        m = base_model if name is None else peft_model(base, adapters[name])
        for i, p in enumerate(prompts):
            out = greedy_recompute(m, p, N_TOKENS, eos=eos)
            ref[(name, i)] = (out, token_logprobs(m, p, out))
        if name is not None:
            assert any(ref[(name, i)][0] != ref[(None, i)][0] for i in range(len(prompts))), name
    names = [None, *adapters]
    jobs = [(names[k % len(names)], k % len(prompts)) for k in range(30)]
    rng.shuffle(jobs)

    async def fire(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            return await asyncio.gather(*(
                c.post("/v1/completions", json={"prompt": prompts[i], "max_tokens": N_TOKENS, "min_tokens": N_TOKENS,
                                                "temperature": 0, "logprobs": 0, "return_token_ids": True,
                                                **({"model": a} if a else {})})
                for a, i in jobs))

    with live_server(model=base, adapter=[f"{n}={d}" for n, d in adapters.items()], max_model_len=128,
                     kv_cache_blocks=256, block_size=4, max_adapters=8, max_num_seqs=32) as srv:
        eng = srv.state.engine
        resps = asyncio.run(fire(srv.url))
        wait_for(engine_settled(eng), "every request to finish and free its blocks")
        assert eng.allocator.num_used == 0  # sequences and idle prefixes gave every block back
    for (name, i), r in zip(jobs, resps, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        want, want_lp = ref[(name, i)]
        assert body["choices"][0]["token_ids"] == want, name
        assert body["usage"]["prompt_tokens"] == len(prompts[i])  # the user's tokens only
        assert body["prompt_token_ids"] == prompts[i]
        got = body["choices"][0]["logprobs"]["token_logprobs"]
        assert max(abs(a - b) for a, b in zip(got, want_lp, strict=True)) < 2e-3, name
