"""The Triton paged-attention backend (forced on under the interpreter) serves the same tokens as the twin.

Mixed batch over HTTP: base, two LoRA adapters, a prefix-tuning adapter whose 5 virtual tokens do not
fill its 4-token blocks (shared prefix blocks in every block table) and a prompt-tuning adapter, on a
Mistral with a sliding window, with a token budget small enough that prompts are prefilled in chunks
on top of cached tokens. A third server runs the decode-graph path too: every eligible decode step
(LoRA rows included) through the padded bucket template a CUDA graph captures (`graph_template`), with
fixed-shape LoRA metadata and the fused q/k/v / gate/up launches under the interpreter.
"""

from __future__ import annotations

import asyncio
import os
import random

import httpx

from tests.adapters import make_lora, make_prompt_learning
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint

N_TOKENS = 6


def build(root: str) -> tuple[str, dict[str, str]]:
    base = make_tiny_checkpoint(root, "mistral", seed=31, sliding_window=6)
    adapters = {
        "lora-a": make_lora(base, os.path.join(root, "pg-lora-a"), r=8, targets=["q_proj", "v_proj", "down_proj"],
                            seed=41),
        "lora-b": make_lora(base, os.path.join(root, "pg-lora-b"), r=16, targets=["k_proj", "o_proj", "up_proj"],
                            seed=42),
        "prefix": make_prompt_learning(base, os.path.join(root, "pg-prefix"), "prefix", num_virtual_tokens=5,
                                       prefix_projection=False, seed=43),
        "prompt": make_prompt_learning(base, os.path.join(root, "pg-prompt"), "prompt", num_virtual_tokens=3,
                                       seed=44),
    }
    return base, adapters


async def fire(url: str, jobs: list[tuple[str | None, list[int]]]) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        resps = await asyncio.gather(*(
            c.post("/v1/completions", json={"prompt": p, "max_tokens": N_TOKENS, "min_tokens": N_TOKENS,
                                            "temperature": 0, "logprobs": 0, "return_token_ids": True,
                                            **({"model": a} if a else {})})
            for a, p in jobs))
    for r in resps:
        assert r.status_code == 200, r.text
    return [r.json()["choices"][0] for r in resps]


def serve(base: str, adapters: dict[str, str], jobs: list, backend: str, graphs: bool = False) -> list[dict]:
    from server.model.runner import ModelRunner

    kwdefaults = ModelRunner.__init__.__kwdefaults__
    assert kwdefaults is not None and kwdefaults["graph_template"] is False
    kwdefaults["graph_template"] = graphs  # the runner's CPU proof of the graph path (no Settings field)
    try:
        return _serve(base, adapters, jobs, backend, graphs)
    finally:
        kwdefaults["graph_template"] = False


def _serve(base: str, adapters: dict[str, str], jobs: list, backend: str, graphs: bool) -> list[dict]:
    with live_server(model=base, adapter=[f"{n}={d}" for n, d in adapters.items()], max_model_len=64,
                     kv_cache_blocks=160, block_size=4, max_adapters=4, max_num_seqs=16, max_batch_tokens=40,
                     attention_backend=backend) as srv:
        runner = srv.state.engine.runner
        assert runner.attention_backend == backend
        out = asyncio.run(fire(srv.url, jobs))
        if graphs:  # decode steps with LoRA rows did go through the LoRA template
            assert runner.graphs is not None and runner.graphs.lora_replays > 0
        return out


def test_triton_backend_matches_twin_on_mixed_adapters(tiny_root):
    base, adapters = build(tiny_root)
    rng = random.Random(3)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(3, 17))] for _ in range(3)]
    names = [None, *adapters]
    jobs = [(names[k % len(names)], prompts[k % len(prompts)]) for k in range(15)]
    rng.shuffle(jobs)
    twin = serve(base, adapters, jobs, "torch")
    by_job = {(a, tuple(p)): c["token_ids"] for (a, p), c in zip(jobs, twin, strict=True)}
    for name in adapters:  # every adapter changes the base model's tokens on some prompt
        assert any(by_job[(name, tuple(p))] != by_job[(None, tuple(p))] for p in prompts), name
    for graphs in (False, True):
        kern = serve(base, adapters, jobs, "triton", graphs=graphs)
        for (name, _), t, k in zip(jobs, twin, kern, strict=True):
            assert k["token_ids"] == t["token_ids"], (name, graphs)
            for a, b in zip(k["logprobs"]["token_logprobs"], t["logprobs"]["token_logprobs"], strict=True):
                assert abs(a - b) < 1e-4, (name, graphs)
