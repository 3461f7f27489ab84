"""The store survives SIGKILL mid-upload, and upload/infer/delete cycles leave memory and fds flat."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from tests.adapters import make_lora
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint
from tests.waits import wait_for

CFG, WTS = "adapter_config.json", "adapter_model.safetensors"


def _files(d: str) -> list:
    return [("files", (n, open(os.path.join(d, n), "rb").read())) for n in (CFG, WTS)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigkill_during_uploads_leaves_store_intact(tiny_root, tmp_path):
    base = make_tiny_checkpoint(tiny_root, "llama", seed=11)
    d = make_lora(base, os.path.join(tiny_root, "kill-lora"), r=8, targets=["q_proj", "v_proj", "up_proj"], seed=4)
    files = _files(d)
    store = str(tmp_path / "store")
    stored_ok: set[str] = set()
    for round_ in range(3):
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--model", base, "--adapters-dir", store,
                                 "--port", str(port), "--max-model-len", "128", "--kv-cache-blocks", "32",
                                 "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"

        def ready(url: str = url, proc: subprocess.Popen = proc) -> bool:
            assert proc.poll() is None, f"the server exited with {proc.returncode}"
            try:
                return httpx.get(url + "/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, "the server to become ready", timeout=300, poll=0.1)  # start-up imports torch

        def pump(k: int, url: str = url, round_: int = round_) -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                for j in range(50):
                    try:
                        r = c.post("/v1/adapters", data={"name": f"r{round_}-{k}-{j}"}, files=files)
                    except httpx.HTTPError:
                        return
                    if r.status_code == 201:
                        stored_ok.add(f"r{round_}-{k}-{j}")

        threads = [threading.Thread(target=pump, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        # kill while uploads are in full flow: after this round's first acknowledged upload (an event, so a
        # slow machine still gets one in), then a round-dependent moment later to land in different phases
        wait_for(lambda round_=round_: any(n.startswith(f"r{round_}-") for n in list(stored_ok)),
                 f"an upload of round {round_} to be acknowledged")
        time.sleep(0.05 + 0.37 * round_)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for t in threads:
            t.join(30)
    assert stored_ok, "no upload completed before the kill: the test did not exercise anything"
    with live_server(model=base, adapters_dir=store, max_model_len=128, kv_cache_blocks=32) as srv, srv.client() as c:
        listed = {a["name"]: a for a in c.get("/v1/adapters").json()["data"]}
        # every upload that was acknowledged survived; anything else is either complete or absent
        assert stored_ok <= set(listed)
        tmp = os.path.join(store, ".tmp")
        assert not os.path.isdir(tmp) or not os.listdir(tmp)
        on_disk = set(os.listdir(os.path.join(store, "adapters")))
        assert on_disk == set(listed)  # no partial adapter directories
        ref = None
        for name in sorted(listed)[:: max(1, len(listed) // 8)]:
            r = c.post("/v1/completions", json={"model": name, "prompt": [1, 2, 3], "max_tokens": 4, "min_tokens": 4,
                                                "temperature": 0, "return_token_ids": True})
            assert r.status_code == 200
            ref = ref or r.json()["choices"][0]["token_ids"]
            assert r.json()["choices"][0]["token_ids"] == ref


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_upload_infer_delete_cycles_leave_memory_and_fds_flat(tiny_root, tmp_path):
    base = make_tiny_checkpoint(tiny_root, "llama", seed=11)
    d = make_lora(base, os.path.join(tiny_root, "cycle-lora"), r=8, targets=["q_proj", "down_proj"], seed=5)
    files = _files(d)
    with live_server(model=base, adapters_dir=str(tmp_path / "s"), max_model_len=64, kv_cache_blocks=32,
                     max_adapters=2, max_cpu_adapters=4) as srv, srv.client() as c:

        def cycle(i: int) -> None:
            assert c.post("/v1/adapters", data={"name": f"c{i}"}, files=files).status_code == 201
            r = c.post("/v1/completions", json={"model": f"c{i}", "prompt": [4, 5, 6], "max_tokens": 2})
            assert r.status_code == 200
            assert c.delete(f"/v1/adapters/c{i}").status_code == 204

        for i in range(60):  # warm-up: allocator pools, caches, lazily allocated LoRA buffers
            cycle(i)
        rss0, fds0 = _rss_kb(), len(os.listdir("/proc/self/fd"))
        for i in range(60, 500):
            cycle(i)
        rss1, fds1 = _rss_kb(), len(os.listdir("/proc/self/fd"))
        eng = srv.state.engine
        print(f"rss {rss0} -> {rss1} kB, fds {fds0} -> {fds1}")
        assert rss1 - rss0 < 48 * 1024, (rss0, rss1)
        assert fds1 - fds0 <= 4, (fds0, fds1)
        assert c.get("/v1/adapters").json()["data"] == []
        assert srv.state.registry.num_cpu == 0
        assert eng.allocator.num_used == 0 and eng.slots.num_in_use == 0
        assert not os.listdir(os.path.join(str(tmp_path / "s"), "adapters"))
