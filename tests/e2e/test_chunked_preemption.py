"""Chunked prefill and preemption with every adapter kind, against peft.

A server with a 5-token step budget and a 17-block KV cache (block size 4): prompts are prefilled in
chunks that end inside prompt-tuning / p-tuning virtual tokens, and sequences overflow the cache, so
the newest running ones are preempted (blocks freed) and later recomputed from scratch. LoRA, prefix
tuning (two variants), prompt tuning, p-tuning and the base model run mixed; every greedy request must
still give peft's tokens, and a seeded sampled request the same tokens as when it ran alone.

The requests are put into the engine in a fixed order while its first step is held, so the schedule
(chunk boundaries, who is preempted) is the same on every machine; the test still checks that chunks
did end inside virtual tokens and that sequences of every kind were preempted, rather than assuming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterator
from typing import Any

import httpx
import torch

from server.engine.async_engine import EngineObserver, RequestStats
from tests.adapters import greedy_recompute, peft_model
from tests.e2e.test_prompt_learning import build
from tests.server_utils import live_server
from tests.waits import EngineGate, async_wait_for, engine_settled, wait_for

N_TOKENS = 16
SAMPLED_AT = 2  # the sampled request's place in the arrival order: among the first, while the cache is full
EOS = 257
SERVER = dict(max_model_len=48, block_size=4, kv_cache_blocks=13, max_batch_tokens=5, max_num_seqs=4,
              max_adapters=8)
SAMPLED = {"temperature": 1.0, "top_p": 0.95, "seed": 4242}


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """HF/peft references on one thread: with the machine's cores busy (CI, other jobs), an OpenMP team
    that spins for cores it does not get makes a tiny model's forward 50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class Recorder(EngineObserver):
    """Per request id: how often it was preempted (the engine reports it when the request ends)."""

    def __init__(self) -> None:
        self.preemptions: dict[str, int] = {}

    def on_request_done(self, stats: RequestStats) -> None:
        self.preemptions[stats.request_id] = stats.num_preemptions


def watch_chunks(engine: Any) -> list[tuple[str, int, int, int]]:
    """Record (adapter kind, chunk start, chunk end, virtual tokens) of every scheduled chunk of a sequence
    with virtual tokens in its KV (prompt tuning, p-tuning)."""
    seen: list[tuple[str, int, int, int]] = []

    def record(chunks: list) -> None:
        for c in chunks:
            if c.seq.num_virtual:
                seen.append((c.seq.adapter.name, c.start, c.start + c.num_tokens, c.seq.num_virtual))

    engine.fault_injector = record
    return seen


def test_chunked_prefill_and_preemption_with_every_adapter_kind(tiny_root: str) -> None:
    base, adapters = build(tiny_root, "llama")
    rng = random.Random(17)
    names: list[str | None] = [None, *adapters]
    jobs = [(names[k % len(names)], [rng.randrange(256) for _ in range(rng.randint(5, 12))]) for k in range(12)]
    ref: dict[int, list[int]] = {}
    models: dict[str | None, Any] = {}
    with one_torch_thread():
        for k, (name, prompt) in enumerate(jobs):
            if name not in models:
                models[name] = peft_model(base, None if name is None else adapters[name])
            ref[k] = greedy_recompute(models[name], prompt, N_TOKENS, eos=EOS)
        for k, (name, prompt) in enumerate(jobs):
            if name is not None:
                assert ref[k] != greedy_recompute(models[None], prompt, N_TOKENS, eos=EOS), f"{name} changes nothing"
    sampled_job = ("ptuning", jobs[4][1])

    def body(name: str | None, prompt: list[int], **extra: Any) -> dict:
        b = {"prompt": prompt, "max_tokens": N_TOKENS, "min_tokens": N_TOKENS, "temperature": 0,
             "return_token_ids": True, **extra}
        return b | ({"model": name} if name else {})

    with live_server(model=base, adapter=[f"{n}={d}" for n, d in adapters.items()], **SERVER) as srv:
        eng = srv.state.engine
        rec = Recorder()
        eng.observers.append(rec)
        chunks = watch_chunks(eng)

        with srv.client() as c:  # the sampled request alone: nothing to preempt it
            alone = c.post("/v1/completions", json=body(*sampled_job, **SAMPLED))
            assert alone.status_code == 200, alone.text
        assert rec.preemptions[alone.json()["id"] + "-0"] == 0

        async def fire() -> list[httpx.Response]:
            async with srv.async_client() as ac:
                # A one-token primer's step is held at a gate while the requests enter the engine's inbox one
                # at a time; when the gate opens the primer ends and the next step takes them all, in order.
                gate = EngineGate(eng)
                try:
                    primer = asyncio.create_task(ac.post("/v1/completions", json={"prompt": [1], "max_tokens": 1}))
                    await async_wait_for(gate.entered.is_set, "the primer's step to reach the gate")
                    tasks = []
                    order = [(n, p, {}) for n, p in jobs]
                    order.insert(SAMPLED_AT, (*sampled_job, SAMPLED))
                    for k, (name, prompt, extra) in enumerate(order):
                        tasks.append(asyncio.create_task(ac.post("/v1/completions",
                                                                 json=body(name, prompt, **extra))))
                        await async_wait_for(lambda k=k: eng.in_flight == k + 2, f"request {k} to reach the engine")
                finally:
                    gate.open()
                assert (await primer).status_code == 200
                return await asyncio.gather(*tasks)

        resps = asyncio.run(fire())
        wait_for(engine_settled(eng), "every KV block to be free again")
        metrics = httpx.get(srv.url + "/metrics").text

    sampled = resps.pop(SAMPLED_AT).json()
    for k, ((name, _), r) in enumerate(zip(jobs, resps, strict=True)):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == ref[k], (k, name)
    # the sampled request was preempted and recomputed, and drew the same tokens as alone
    pattern = [rec.preemptions[r.json()["id"] + "-0"] for r in resps]
    assert rec.preemptions[sampled["id"] + "-0"] > 0, (rec.preemptions[sampled["id"] + "-0"], pattern)
    assert sampled["choices"][0]["token_ids"] == alone.json()["choices"][0]["token_ids"]

    kind_of = {resp.json()["id"] + "-0": name or "base" for (name, _), resp in zip(jobs, resps, strict=True)}
    preempted_kinds = {kind_of[rid] for rid, n in rec.preemptions.items() if n and rid in kind_of}
    assert preempted_kinds >= {"lora", "prefix-plain", "prompt", "ptuning"}, (preempted_kinds, pattern)
    total = sum(rec.preemptions.values())
    assert f"peftserve_preemptions_total {float(total)}" in metrics
    inside = {(name, s, e) for name, s, e, v in chunks if s < e < v}
    assert {name for name, _, _ in inside} == {"prompt", "ptuning"}, chunks  # chunks ending inside virtual tokens
