"""Prefix and prompt adapters through the store: upload, serve, shared prefix blocks, limits, delete."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from tests.adapters import greedy_recompute, make_prompt_learning, peft_model
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint
from tests.waits import async_wait_for, hold_first_step_until

FILES = ("adapter_config.json", "adapter_model.safetensors")


def upload(c, name: str, d: str):
    return c.post("/v1/adapters", data={"name": name},
                  files=[("files", (f, open(os.path.join(d, f), "rb").read())) for f in FILES])


@pytest.fixture(scope="module")
def setup(tiny_root):
    base = make_tiny_checkpoint(tiny_root, "qwen2", seed=21)
    prefix = make_prompt_learning(base, os.path.join(tiny_root, "st-prefix"), "prefix", num_virtual_tokens=9, seed=3)
    prompt = make_prompt_learning(base, os.path.join(tiny_root, "st-prompt"), "prompt", num_virtual_tokens=6, seed=4)
    return base, prefix, prompt


def test_upload_serve_and_prefix_blocks_are_shared(setup, tmp_path):
    base, prefix, prompt = setup
    prompts = [[3 + i, 40, 41, 42 + i, 7] for i in range(6)]
    n = 24
    ref = [greedy_recompute(peft_model(base, prefix), p, n, eos=259) for p in prompts]
    with live_server(model=base, adapters_dir=str(tmp_path / "s"), max_model_len=64, kv_cache_blocks=128,
                     block_size=4, max_num_seqs=8) as srv, srv.client() as c:
        for name, d, kind in (("pfx", prefix, "PREFIX_TUNING"), ("pt", prompt, "PROMPT_TUNING")):
            r = upload(c, name, d)
            assert r.status_code == 201, r.text
            assert r.json()["peft_type"] == kind and r.json()["rank"] is None
        types = {m["id"]: m.get("adapter_type") for m in c.get("/v1/models").json()["data"]}
        assert types["pfx"] == "prefix" and types["pt"] == "prompt"
        eng = srv.state.engine
        seen: dict[str, int] = {}

        async def run() -> list[list[int]]:
            async with srv.async_client() as ac:
                async def one(p: list[int]) -> list[int]:
                    ids: list[int] = []
                    async with ac.stream("POST", "/v1/completions", json={
                            "model": "pfx", "prompt": p, "max_tokens": n, "min_tokens": n, "temperature": 0,
                            "stream": True, "return_token_ids": True}) as s:
                        async for line in s.aiter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                ids += json.loads(line[6:])["choices"][0]["token_ids"]
                    return ids

                # all six in one step (the first step is held until they are in the engine), so all six run at once
                hold_first_step_until(eng, lambda: eng.in_flight == len(prompts), "every request in the engine")
                tasks = [asyncio.create_task(one(p)) for p in prompts]
                await async_wait_for(lambda: eng.num_running == len(prompts), "all six sequences to be running")
                # all six sequences running on one prefix adapter: its blocks are held once, not six times
                running = list(eng.scheduler.running)
                seen["prefix_slots"] = len(eng.scheduler.slot_blocks)
                seen["used"] = eng.allocator.num_used
                seen["own"] = sum(len(s.block_table) for s in running)
                seen["running"] = len(running)
                return await asyncio.gather(*tasks)

        outs = asyncio.run(run())
        assert seen["running"] == len(prompts) and seen["prefix_slots"] == 1
        assert seen["used"] == seen["own"] + 3  # 9 virtual tokens / block_size 4 -> 3 shared blocks
        assert outs == ref
        assert eng.allocator.num_used == 0  # prefix blocks went back when the adapter went idle

        # max_model_len counts virtual tokens: 60 prompt tokens fit the base model, not the prompt adapter
        body = {"prompt": [5] * 56, "max_tokens": 4}
        assert c.post("/v1/completions", json=body).status_code == 200
        r = c.post("/v1/completions", json={**body, "model": "pt"})
        assert r.status_code == 400 and "virtual tokens" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3, "model": "pt",
                                             "return_token_ids": True})
        assert r.json()["usage"]["prompt_tokens"] == 3 and r.json()["prompt_token_ids"] == [5, 6, 7]
        listed = {a["name"]: a for a in c.get("/v1/adapters").json()["data"]}
        assert listed["pt"]["residency"] == "device" and listed["pfx"]["residency"] in ("cpu", "device")
        assert c.delete("/v1/adapters/pfx").status_code == 204
        assert c.post("/v1/completions", json={"prompt": [1], "model": "pfx"}).status_code == 404
