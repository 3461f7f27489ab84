"""Mixed-adapter LoRA through HTTP: every request gets exactly what PEFT gives its adapter alone."""

from __future__ import annotations

import asyncio
import os
import random

import httpx
import pytest

from tests.adapters import greedy, make_lora, peft_model, token_logprobs
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint

LORAS = {
    "qv-r4": dict(r=4, targets=["q_proj", "v_proj"]),
    "all-r8": dict(r=8, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp-r16": dict(r=16, targets=["gate_proj", "up_proj", "down_proj"]),
    "rslora-r32": dict(r=32, targets=["q_proj", "k_proj", "o_proj", "down_proj"], use_rslora=True, alpha=8),
    "pattern-r8": dict(r=8, targets=["q_proj", "v_proj", "up_proj"], rank_pattern={"up_proj": 24},
                       alpha_pattern={"q_proj": 3}),
    "regex-r64": dict(r=64, targets=r".*\.(o_proj|down_proj)", alpha=16),
}
N_TOKENS = 8


def build(root: str, arch: str) -> tuple[str, dict[str, str]]:
    base = make_tiny_checkpoint(root, arch, seed=11)
    adapters = {}
    for i, (name, cfg) in enumerate(LORAS.items()):
        cfg = dict(cfg)
        adapters[name] = make_lora(base, os.path.join(root, f"{arch}-lora-{name}"), r=cfg.pop("r"),
                                   targets=cfg.pop("targets"), seed=100 + i, **cfg)
    return base, adapters


def references(base: str, adapters: dict[str, str], prompts: list[list[int]]) -> dict:
    """PEFT's greedy tokens (and logprobs) for every (adapter, prompt), each adapter alone."""
    ref = {}
    base_model = peft_model(base, None)
    base_out = {i: greedy(base_model, p, N_TOKENS) for i, p in enumerate(prompts)}
    for name in [None, *adapters]:
        m = base_model if name is None else peft_model(base, adapters[name])
        for i, p in enumerate(prompts):
            out = base_out[i] if name is None else greedy(m, p, N_TOKENS)
            ref[(name, i)] = (out, token_logprobs(m, p, out))
        if name is not None:
            # the adapter visibly changes the base model's output before we check that we match it
            assert any(ref[(name, i)][0] != base_out[i] for i in range(len(prompts))), name
    return ref


async def fire(url: str, jobs: list[tuple[str | None, list[int]]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        return await asyncio.gather(*(
            c.post("/v1/completions", json={"prompt": p, "max_tokens": N_TOKENS, "min_tokens": N_TOKENS,
                                            "temperature": 0, "logprobs": 0, "return_token_ids": True,
                                            **({"model": a} if a else {})})
            for a, p in jobs))


@pytest.mark.parametrize("arch, max_adapters", [("llama", 8), ("qwen2", 8), ("llama", 2)])
def test_mixed_lora_batch_matches_peft(tiny_root, arch, max_adapters):
    base, adapters = build(tiny_root, arch)
    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(4, 24))] for _ in range(4)]
    ref = references(base, adapters, prompts)
    names = [None, *adapters]
    jobs = [(names[k % len(names)], prompts[k % len(prompts)]) for k in range(28)]
    rng.shuffle(jobs)
    with live_server(model=base, adapter=[f"{n}={d}" for n, d in adapters.items()], max_model_len=128,
                     kv_cache_blocks=256, block_size=8, max_adapters=max_adapters, max_num_seqs=32) as srv:
        models = {m["id"]: m for m in srv.client().get("/v1/models").json()["data"]}
        assert all(models[n]["parent"] == srv.state.base_name for n in adapters)
        resps = asyncio.run(fire(srv.url, jobs))
        if max_adapters < len(adapters):
            assert srv.state.engine.slots.evictions > 0  # more adapters than slots were in use
    for (name, p), r in zip(jobs, resps, strict=True):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        want, want_lp = ref[(name, prompts.index(p))]
        assert choice["token_ids"] == want, name
        got_lp = choice["logprobs"]["token_logprobs"]
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp, strict=True)) < 2e-3, name
