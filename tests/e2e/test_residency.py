"""Tiered residency: disk -> CPU -> device, and a slow disk load never stalls other requests' decoding."""

from __future__ import annotations

import asyncio
import os
import time

from tests.adapters import make_lora
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint

FILES = ("adapter_config.json", "adapter_model.safetensors")
LOAD_DELAY = 1.0


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

        def slow_loader(path):  # the real loader, made slow (a big adapter on a slow disk)
            time.sleep(LOAD_DELAY)
            return real_loader(path)

        reg._loader = slow_loader
        with srv.client() as c:
            assert c.get("/v1/adapters/cold").json()["residency"] == "disk"

        async def scenario():
            async with srv.async_client() as ac:
                arrivals: list[float] = []

                async def base_stream() -> None:
                    async with ac.stream("POST", "/v1/completions", json={
                            "prompt": [1, 2, 3], "max_tokens": 100, "min_tokens": 100, "temperature": 0,
                            "stream": True}) as s:
                        async for line in s.aiter_lines():
                            if line.startswith("data: {"):
                                arrivals.append(time.monotonic())

                stream = asyncio.create_task(base_stream())
                while len(arrivals) < 3:
                    await asyncio.sleep(0.005)
                t0 = time.monotonic()
                r = await ac.post("/v1/completions", json={"model": "cold", "prompt": [4, 5], "max_tokens": 2})
                t1 = time.monotonic()
                await stream
                return r, t0, t1, arrivals

        r, t0, t1, arrivals = asyncio.run(scenario())
        assert r.status_code == 200
        assert t1 - t0 >= LOAD_DELAY  # the request did wait for its adapter's load ...
        during = [t for t in arrivals if t0 < t < t0 + LOAD_DELAY]
        assert len(during) >= 10, len(during)  # ... while the base stream kept decoding
        with srv.client() as c:
            assert c.get("/v1/adapters/cold").json()["residency"] == "device"
        assert reg.cpu_loads == 1
