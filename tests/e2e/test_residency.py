"""Tiered residency: disk -> CPU -> device, and a slow disk load never stalls other requests' decoding."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from tests.adapters import make_lora
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint
from tests.waits import EngineGate, async_wait_for


async def base_stream(ac: Any, tokens: list[int]) -> None:
    """A 100-token base-model stream; appends to `tokens` per streamed chunk (the test watches it grow while an
    adapter load is held)."""
    async with ac.stream("POST", "/v1/completions", json={
            "prompt": [1, 2, 3], "max_tokens": 100, "min_tokens": 100, "temperature": 0, "stream": True}) as s:
        async for line in s.aiter_lines():
            if line.startswith("data: {"):
                tokens.append(1)

FILES = ("adapter_config.json", "adapter_model.safetensors")


def test_disk_load_runs_off_the_engine_loop(tiny_root, tmp_path):
    base = make_tiny_checkpoint(tiny_root, "llama", seed=11)
    d = make_lora(base, os.path.join(tiny_root, "res-lora"), r=8, targets=["q_proj", "down_proj"], seed=9)
    store = str(tmp_path / "store")
    settings = dict(model=base, adapters_dir=store, max_model_len=128, kv_cache_blocks=64, max_cpu_adapters=2)
    with live_server(**settings) as srv, srv.client() as c:
        files = [("files", (f, open(os.path.join(d, f), "rb").read())) for f in FILES]
        assert c.post("/v1/adapters", data={"name": "cold"}, files=files).status_code == 201
    with live_server(**settings) as srv:  # a restart: the adapter is on disk only
        reg = srv.state.registry
        real_loader = reg._loader
        loading, release = threading.Event(), threading.Event()

        def slow_loader(path):  # the real loader, held until the test has seen decoding go on without it
            loading.set()
            assert release.wait(120), "the test never released the disk load"
            return real_loader(path)

        reg._loader = slow_loader
        with srv.client() as c:
            assert c.get("/v1/adapters/cold").json()["residency"] == "disk"

        async def scenario():
            async with srv.async_client() as ac:
                tokens: list[int] = []
                stream = asyncio.create_task(base_stream(ac, tokens))
                cold = None
                try:
                    await async_wait_for(lambda: len(tokens) >= 3, "the base stream to start")
                    gate = EngineGate(srv.state.engine)  # the stream stays mid-way until the load has begun
                    try:
                        cold = asyncio.create_task(ac.post("/v1/completions", json={
                            "model": "cold", "prompt": [4, 5], "max_tokens": 2}))
                        await async_wait_for(loading.is_set, "the cold adapter's disk load to start")
                        at_load = len(tokens)
                    finally:
                        gate.open()
                    # the load is held: the base stream must keep decoding meanwhile
                    await async_wait_for(lambda: len(tokens) >= at_load + 10,
                                         "the base stream to decode 10 tokens while a disk load is in progress")
                    assert not cold.done()  # ... while the cold request really waited for its load
                finally:
                    release.set()
                r = await cold
                await stream
                return r, len(tokens)

        r, n_tokens = asyncio.run(scenario())
        assert r.status_code == 200, r.text
        assert n_tokens == 100
        with srv.client() as c:
            assert c.get("/v1/adapters/cold").json()["residency"] == "device"
        assert reg.cpu_loads == 1
