"""Prefix caching through HTTP, on the real model: a cache hit gives what a miss gives (and what PEFT gives);
identical prompts on different adapters, on base vs a prefix / prompt adapter, or on a replaced adapter
version never share KV; the per-adapter metrics count it."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time

import httpx
import pytest

from server.engine.async_engine import EngineObserver, RequestStats
from tests.adapters import greedy_recompute, make_lora, make_prompt_learning, peft_model, token_logprobs
from tests.e2e.test_adapter_store_api import _stream_tokens, files_of, multipart, upload
from tests.ops.conftest import scrape, value
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint

N = 6
EOS = 257  # the byte tokenizer's EOS: masked in the references, min_tokens keeps the server off it too
BLOCK = 4


class Recorder(EngineObserver):
    """Every finished request's stats (the engine calls this before the request's last delta is sent)."""

    def __init__(self) -> None:
        self.done: list[RequestStats] = []
        self.lock = threading.Lock()

    def on_request_done(self, stats: RequestStats) -> None:
        with self.lock:
            self.done.append(stats)

    def last(self, completion_tokens: int = N) -> RequestStats:
        with self.lock:
            return next(s for s in reversed(self.done) if s.completion_tokens == completion_tokens)


@pytest.fixture(scope="module")
def base(tiny_root: str) -> str:
    return make_tiny_checkpoint(tiny_root, "llama", seed=11)


@pytest.fixture(scope="module")
def adapters(base: str, tiny_root: str) -> dict[str, str]:
    return {
        "lora-a": make_lora(base, os.path.join(tiny_root, "pc-lora-a"), r=8, targets=["q_proj", "v_proj"], seed=31),
        "lora-b": make_lora(base, os.path.join(tiny_root, "pc-lora-b"), r=8, targets=["q_proj", "v_proj"], seed=32),
        "mlp": make_lora(base, os.path.join(tiny_root, "pc-lora-mlp"), r=8, targets=["up_proj"], seed=33),
        "prefix": make_prompt_learning(base, os.path.join(tiny_root, "pc-prefix"), "prefix", num_virtual_tokens=5,
                                       seed=34),
        "prompt": make_prompt_learning(base, os.path.join(tiny_root, "pc-prompt"), "prompt", num_virtual_tokens=4,
                                       seed=35),
    }


def ask(c: httpx.Client, model: str | None, prompt: list[int], n: int = N) -> dict:
    r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": n, "min_tokens": n, "temperature": 0,
                                        "logprobs": 0, "return_token_ids": True, **({"model": model} if model else {})})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return {"ids": choice["token_ids"], "lp": choice["logprobs"]["token_logprobs"],
            "cached": r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]}


def ask_stream(c: httpx.Client, model: str | None, prompt: list[int]) -> int:
    """usage.prompt_tokens_details.cached_tokens of a streamed request (stream_options.include_usage)."""
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **({"model": model} if model else {})}
    with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        usage = [json.loads(line[6:])["usage"] for line in r.iter_lines()
                 if line.startswith("data: {") and '"usage"' in line]
    assert len(usage) == 1
    return usage[0]["prompt_tokens_details"]["cached_tokens"]


def test_hits_match_misses_and_nothing_is_shared_across_adapters(base, adapters):
    prompt = [random.Random(6).randrange(256) for _ in range(30)]
    names = [None, *adapters]
    ref = {}
    for name in names:
        m = peft_model(base, adapters[name] if name else None)
        out = greedy_recompute(m, prompt, N, eos=EOS)
        ref[name] = (out, token_logprobs(m, prompt, out))
    # every adapter visibly changes the output, and the two q/v LoRAs differ from each other
    assert all(ref[n][0] != ref[None][0] for n in adapters) and ref["lora-a"][0] != ref["lora-b"][0]

    with live_server(model=base, adapter=[f"{n}={d}" for n, d in adapters.items()], max_model_len=128,
                     kv_cache_blocks=256, block_size=BLOCK, max_num_seqs=8) as srv, srv.client() as c:
        rec = Recorder()
        srv.state.engine.observers.append(rec)
        before = scrape(c)
        first, second = {}, {}
        for name in names:  # the same prompt on every model in turn: each first request misses
            first[name] = ask(c, name, prompt)
            s = rec.last()
            virtual = 4 if name == "prompt" else 0
            assert (s.adapter, s.cache_queried_tokens, s.cache_hit_tokens) == (name, 30 + virtual, 0), name
            assert first[name]["cached"] == 0, name
        for name in names:  # again: each hits its own blocks (all full blocks before the last token)
            second[name] = ask(c, name, prompt)
            s = rec.last()
            virtual = 4 if name == "prompt" else 0
            assert s.cache_hit_tokens == (30 + virtual - 1) // BLOCK * BLOCK, name
            # usage counts the user's prompt tokens served from cache (a prompt adapter's virtual ones are not)
            assert second[name]["cached"] == (30 + virtual - 1) // BLOCK * BLOCK - virtual, name
        after = scrape(c)
        assert value(after, "peftserve_kv_blocks_cached") > 0
        assert ask_stream(c, "lora-a", prompt) == 28 and ask_stream(c, "lora-a", prompt[:3] + [1] + prompt[4:]) == 0
    for name in names:
        label = name or "base"
        assert value(after, "peftserve_prefix_cache_queried_tokens_total", adapter=label) - value(
            before, "peftserve_prefix_cache_queried_tokens_total", adapter=label) == 2 * (30 + (4 if name == "prompt"
                                                                                                  else 0))
        assert value(after, "peftserve_prefix_cache_hit_tokens_total", adapter=label) - value(
            before, "peftserve_prefix_cache_hit_tokens_total", adapter=label) == (
            (30 + (4 if name == "prompt" else 0) - 1) // BLOCK * BLOCK)
        want, want_lp = ref[name]
        assert first[name]["ids"] == second[name]["ids"] == want, name  # miss == hit == PEFT
        assert max(abs(a - b) for a, b in zip(first[name]["lp"], second[name]["lp"], strict=True)) < 1e-4, name
        assert max(abs(a - b) for a, b in zip(second[name]["lp"], want_lp, strict=True)) < 2e-3, name


def test_put_new_version_mid_traffic_never_serves_old_kv(base, tmp_path, tiny_root):
    """A stream on v1 holds v1's cached blocks of the prompt while v2 is PUT; every request after the PUT
    gets v2's tokens and starts with no cache hit (then hits v2's own blocks)."""
    v1 = make_lora(base, os.path.join(tiny_root, "pc-put-v1"), r=8, targets=["q_proj", "k_proj", "v_proj"], seed=41)
    v2 = make_lora(base, os.path.join(tiny_root, "pc-put-v2"), r=8, targets=["q_proj", "k_proj", "v_proj"], seed=42)
    prompt = [random.Random(4).randrange(256) for _ in range(29)]
    long_n = 100
    ref1 = greedy_recompute(peft_model(base, v1), prompt, long_n, eos=EOS)
    ref2 = greedy_recompute(peft_model(base, v2), prompt, N, eos=EOS)
    assert ref1[:N] != ref2  # the versions differ on this prompt
    with live_server(model=base, adapters_dir=str(tmp_path / "s"), max_model_len=160, kv_cache_blocks=256,
                     block_size=BLOCK) as srv:
        eng = srv.state.engine
        rec = Recorder()
        eng.observers.append(rec)
        with srv.client() as c:
            assert upload(c, "live", files_of(v1)).status_code == 201
            assert ask(c, "live", prompt)["ids"] == ref1[:N]
            assert rec.last().cache_hit_tokens == 0
        stream_id: list[int] = []

        def pace(chunks: list) -> None:  # keep the v1 stream going while it is the only sequence
            if len(chunks) == 1 and chunks[0].seq.seq_id in stream_id:
                time.sleep(0.03)

        eng.fault_injector = pace

        async def scenario() -> tuple:
            async with srv.async_client() as ac:
                stream = asyncio.create_task(_stream_tokens(ac, "live", prompt, long_n))
                deadline = time.monotonic() + 30
                while not eng.scheduler.running and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                stream_id.append(eng.scheduler.running[0].seq_id)
                warm = await asyncio.to_thread(_ask_new_client, srv, prompt)
                warm_hit = rec.last().cache_hit_tokens
                r = await ac.put("/v1/adapters/live", data={"name": "live"}, files=multipart(files_of(v2)))
                assert r.status_code == 200 and r.json()["version"] == 2, r.text
                after = await asyncio.to_thread(_ask_new_client, srv, prompt)
                after_hit = rec.last().cache_hit_tokens
                again = await asyncio.to_thread(_ask_new_client, srv, prompt)
                again_hit = rec.last().cache_hit_tokens
                in_flight = not stream.done()
                return await stream, warm, warm_hit, after, after_hit, again, again_hit, in_flight

        old, warm, warm_hit, after, after_hit, again, again_hit, in_flight = asyncio.run(scenario())
        assert in_flight  # the v1 stream (holding v1's blocks) ran through the whole replacement
        assert warm["ids"] == ref1[:N] and warm_hit == 28  # v1's blocks were cached and used before the PUT
        assert after["ids"] == ref2 and after_hit == 0  # the first v2 request got none of v1's blocks
        assert again["ids"] == ref2 and again_hit == 28  # and v2's own blocks are reused
        assert old == ref1  # the stream finished on v1
        assert eng.allocator.num_used == 0


def _ask_new_client(srv, prompt: list[int]) -> dict:
    with srv.client() as c:
        return ask(c, "live", prompt)


def test_no_prefix_caching_flag(base):
    prompt = list(range(40, 70))
    with live_server(model=base, max_model_len=128, kv_cache_blocks=64, block_size=BLOCK,
                     no_prefix_caching=True) as srv, srv.client() as c:
        rec = Recorder()
        srv.state.engine.observers.append(rec)
        a, b = ask(c, None, prompt), ask(c, None, prompt)
        assert a["ids"] == b["ids"] and rec.last().cache_hit_tokens == 0
        assert value(scrape(c), "peftserve_kv_blocks_cached") == 0
