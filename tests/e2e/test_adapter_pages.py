"""Paged adapter memory through HTTP: --adapter-memory is a byte budget in pages of the adapter's own rank,
and mixed-rank batches over more adapters than fit stay token-exact with PEFT."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

from server.model.adapter_pages import page_bytes
from server.model.loader import load_spec
from tests.e2e.test_lora_serving import N_TOKENS, build, fire, references
from tests.e2e.test_residency import base_stream
from tests.server_utils import live_server
from tests.waits import async_wait_for

# pages per adapter of tests/e2e/test_lora_serving.LORAS at 8 rank rows a page (largest rank over modules)
PAGES = {"qv-r4": 1, "all-r8": 1, "mlp-r16": 2, "rslora-r32": 4, "pattern-r8": 3, "regex-r64": 8}
POOL = 12  # pages: all six need 19


def _settings(base: str, adapters: dict[str, str], **kw: object) -> dict[str, object]:
    spec, _ = load_spec(base)
    memory = POOL * page_bytes(spec.base_info(), torch.float32)
    return dict(model=base, adapter=[f"{n}={d}" for n, d in adapters.items()], max_model_len=128,
                kv_cache_blocks=256, block_size=8, max_num_seqs=32, adapter_memory=str(memory), **kw)


@pytest.fixture(scope="module")
def built(tiny_root):
    base, adapters = build(tiny_root, "llama")
    rng = random.Random(7)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(4, 20))] for _ in range(3)]
    return base, adapters, prompts, references(base, adapters, prompts)


def test_pages_follow_each_adapters_rank(built):
    """Four adapters of ranks 4..32 take 1 + 1 + 2 + 4 pages and are resident together in a pool that would
    hold one max-rank (64) slot; nothing is evicted."""
    base, adapters, prompts, ref = built
    four = ["qv-r4", "all-r8", "mlp-r16", "rslora-r32"]
    with live_server(**_settings(base, adapters)) as srv:
        eng = srv.state.engine
        assert eng.info.adapter_pages == POOL and eng.slots.num_pages == POOL
        jobs = [(n, prompts[i % len(prompts)]) for i, n in enumerate(four * 2)]
        resps = asyncio.run(fire(srv.url, jobs))
        assert all(r.status_code == 200 for r in resps)
        sm = eng.slots
        assert sm.num_resident == 4 and sm.evictions == 0
        assert sm.pages_used == sum(PAGES[n] for n in four) == 8
        assert sm.pages_free == POOL - 8
        for n in four:
            assert len(sm.pages_of(sm.slot_of(srv.state.registry.entry(n).key))) == PAGES[n]
        sm.check()
    for (name, p), r in zip(jobs, resps, strict=True):
        assert r.json()["choices"][0]["token_ids"] == ref[(name, prompts.index(p))][0], name


def test_mixed_ranks_over_a_short_pool_match_peft(built):
    """All six adapters (19 pages) and base requests over a 12-page pool: adapters are evicted for their pages,
    and every answer is still PEFT's."""
    base, adapters, prompts, ref = built
    rng = random.Random(3)
    names = [None, *adapters]
    jobs = [(names[k % len(names)], prompts[k % len(prompts)]) for k in range(28)]
    rng.shuffle(jobs)
    with live_server(**_settings(base, adapters, max_adapters=16)) as srv:
        resps = asyncio.run(fire(srv.url, jobs))
        sm = srv.state.engine.slots
        assert sm.evictions > 0  # the pool really was short
        sm.check()
    for (name, p), r in zip(jobs, resps, strict=True):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        want, want_lp = ref[(name, prompts.index(p))]
        assert choice["token_ids"] == want, name
        got_lp = choice["logprobs"]["token_logprobs"]
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp, strict=True)) < 2e-3, name
    assert N_TOKENS == len(want)


def test_device_load_runs_while_steps_go_on(built):
    """A paged adapter's CPU -> device load runs on the loader thread: a base stream keeps decoding while the
    load is held, the request on that adapter waits for it, then gets PEFT's answer."""
    base, adapters, prompts, ref = built
    with live_server(**_settings(base, adapters)) as srv:
        runner = srv.state.engine.runner
        real_stage = runner.stage_adapter
        loading, release = threading.Event(), threading.Event()

        def slow_stage(adapter, pages):  # the real load, held until decoding was seen to go on without it
            loading.set()
            assert release.wait(120), "the test never released the load"
            return real_stage(adapter, pages)

        runner.stage_adapter = slow_stage

        async def scenario():
            async with srv.async_client() as ac:
                tokens: list[int] = []
                stream = asyncio.create_task(base_stream(ac, tokens))
                try:
                    await async_wait_for(lambda: len(tokens) >= 3, "the base stream to start")
                    req = asyncio.create_task(ac.post("/v1/completions", json={
                        "model": "mlp-r16", "prompt": prompts[0], "max_tokens": N_TOKENS,
                        "min_tokens": N_TOKENS, "temperature": 0, "return_token_ids": True}))
                    await async_wait_for(loading.is_set, "the adapter's device load to start")
                    at_load = len(tokens)
                    assert at_load < 50  # the stream is mid-way: the steps below run during the load
                    await async_wait_for(lambda: len(tokens) >= at_load + 10,
                                         "the base stream to decode 10 tokens while the device load is held")
                    assert not req.done() and srv.state.engine.staging == 1
                finally:
                    release.set()
                r = await req
                await stream
                return r, len(tokens)

        r, n = asyncio.run(scenario())
    assert r.status_code == 200 and n == 100
    assert r.json()["choices"][0]["token_ids"] == ref[("mlp-r16", 0)][0]
