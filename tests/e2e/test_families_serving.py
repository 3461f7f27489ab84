"""Every family in one batch: AdapterHub bottleneck adapters, IA3 and DoRA beside LoRA, prefix, prompt and base.

References: `peft` (greedy by recomputation, logprobs of the chosen tokens) for the peft adapters, and the
`adapters` library's own greedy tokens and logprobs for the bottleneck adapters (committed fixtures, made by
tests/fixtures/bottleneck/generate.py on the same tiny base). Each adapter must change the base's greedy
output before its served output is compared with its reference.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import httpx
import pytest

from tests.adapters import (
    greedy_recompute,
    make_dora,
    make_ia3,
    make_lora,
    make_prompt_learning,
    peft_model,
    token_logprobs,
)
from tests.families.bottleneck_fixtures import ARCHS, adapter_dir, adapter_names, base_copy, expected
from tests.server_utils import live_server

PEFT_ADAPTERS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", dict(r=8, targets=["q_proj", "up_proj"])),
    "prefix": ("prefix", dict(num_virtual_tokens=5)),
    "prompt": ("prompt", dict(num_virtual_tokens=4)),
    "ia3-default": ("ia3", dict()),  # peft's default targets for the model type (k or q, v, down; down feed-forward)
    "ia3-mlp-ff": ("ia3", dict(target_modules=["v_proj", "o_proj", "gate_proj", "up_proj"],
                               feedforward_modules=["o_proj", "up_proj"])),
    "dora-attn": ("dora", dict(r=4, targets=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "dora-all": ("dora", dict(r=16, targets="all-linear")),
}


def _make(base: str, root: str, name: str, kind: str, cfg: dict[str, Any], seed: int) -> str:
    out = os.path.join(root, name)
    if kind == "lora":
        return make_lora(base, out, seed=seed, **cfg)
    if kind == "ia3":
        return make_ia3(base, out, seed=seed, **cfg)
    if kind == "dora":
        return make_dora(base, out, seed=seed, **cfg)
    return make_prompt_learning(base, out, kind, seed=seed, **cfg)


def build(root: str, arch: str) -> tuple[str, dict[str, str], dict[Any, tuple[list[int], list[float]]]]:
    """The fixture base, every adapter (name -> dir), and each one's reference per prompt index."""
    exp = expected()["archs"][arch]
    base = base_copy(root, arch)
    adapters: dict[str, str] = {}
    ref: dict[Any, tuple[list[int], list[float]]] = {}
    for i in range(len(exp["prompts"])):
        ref[(None, i)] = tuple(exp["base"][i])  # type: ignore[assignment]
    base_model = peft_model(base, None)
    for i, p in enumerate(exp["prompts"]):  # our HF base agrees with the reference's base
        assert greedy_recompute(base_model, p, exp["n_tokens"], eos=exp["eos_token_id"]) == ref[(None, i)][0]
    for k, (name, (kind, cfg)) in enumerate(PEFT_ADAPTERS.items()):
        adapters[name] = _make(base, os.path.join(root, f"fam-{arch}"), name, kind, cfg, seed=300 + k)
        m = peft_model(base, adapters[name])
        for i, p in enumerate(exp["prompts"]):
            out = greedy_recompute(m, p, exp["n_tokens"], eos=exp["eos_token_id"])
            ref[(name, i)] = (out, token_logprobs(m, p, out))
    for name in adapter_names(arch):
        adapters[name] = adapter_dir(arch, name)
        for i in range(len(exp["prompts"])):
            ref[(name, i)] = tuple(exp[name][i])  # type: ignore[assignment]
    for name in adapters:  # every adapter visibly steers the greedy output
        assert any(ref[(name, i)][0] != ref[(None, i)][0] for i in range(len(exp["prompts"]))), name
    return base, adapters, ref


async def _fire(url: str, jobs: list[tuple[str | None, int]], prompts: list[list[int]], n: int
                ) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        return await asyncio.gather(*(
            c.post("/v1/completions", json={"prompt": prompts[i], "max_tokens": n, "min_tokens": n, "temperature": 0,
                                            "logprobs": 0, "return_token_ids": True, **({"model": a} if a else {})})
            for a, i in jobs))


def _check(jobs: list[tuple[str | None, int]], resps: list[httpx.Response], ref: dict[Any, Any]) -> None:
    for (name, i), r in zip(jobs, resps, strict=True):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        want, want_lp = ref[(name, i)]
        assert choice["token_ids"] == want, (name, i)
        got_lp = choice["logprobs"]["token_logprobs"]
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp, strict=True)) < 2e-3, (name, i)


def _drain(srv: Any) -> None:
    eng = srv.state.engine
    deadline = time.time() + 10
    while (eng.num_requests or eng.allocator.num_used) and time.time() < deadline:
        time.sleep(0.02)
    assert eng.allocator.num_used == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_mixed_in_one_batch_matches_references(tiny_root: str, arch: str) -> None:
    base, adapters, ref = build(tiny_root, arch)
    exp = expected()["archs"][arch]
    names: list[str | None] = [None, *adapters]
    jobs = [(names[k % len(names)], k % len(exp["prompts"])) for k in range(2 * len(names))]  # >= 24, all families
    random.Random(5).shuffle(jobs)
    with live_server(model=base, adapter=[f"{n}={d}" for n, d in adapters.items()], max_model_len=128,
                     kv_cache_blocks=512, block_size=4, max_adapters=len(adapters), max_num_seqs=48) as srv:
        with srv.client() as c:
            models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
            kinds = {n: models[n]["adapter_type"] for n in adapters}
        resps = asyncio.run(_fire(srv.url, jobs, exp["prompts"], exp["n_tokens"]))
        _drain(srv)
    assert kinds["ia3-default"] == "ia3" and kinds["dora-all"] == "dora" and kinds["parbn-r2"] == "bottleneck"
    _check(jobs, resps, ref)


def test_more_families_than_slots(tiny_root: str) -> None:
    """--max-adapters 2 with five families in use: requests wait for slots, every answer is still exact."""
    base, adapters, ref = build(tiny_root, "llama")
    exp = expected()["archs"]["llama"]
    use = ["ia3-mlp-ff", "dora-attn", "seqbn-r16", "parbn-r8-s2-leave1", "dseqbn-r8", "lora", "prefix"]
    names: list[str | None] = [None, *use]
    jobs = [(names[k % len(names)], k % len(exp["prompts"])) for k in range(24)]
    random.Random(6).shuffle(jobs)
    with live_server(model=base, adapter=[f"{n}={adapters[n]}" for n in use], max_model_len=128,
                     kv_cache_blocks=512, block_size=4, max_adapters=2, max_num_seqs=16) as srv:
        resps = asyncio.run(_fire(srv.url, jobs, exp["prompts"], exp["n_tokens"]))
        _drain(srv)
    _check(jobs, resps, ref)
