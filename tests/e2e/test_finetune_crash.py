"""SIGKILL during a fine-tuning job: the restarted server finds a consistent store.

The killed job is failed with `server_restarted`; every checkpoint it recorded is a servable adapter; the
training file is intact; no temp file or unindexed adapter directory is left.
"""

from __future__ import annotations

import json
import os
import signal

import httpx

from tests.server_utils import live_server, spawn_server
from tests.tiny import make_tiny_checkpoint
from tests.waits import wait_for


def _data() -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"Aye! {i}"}]}
            for i in range(4)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def test_sigkill_during_a_job_leaves_a_consistent_store(tiny_root: str, tmp_path) -> None:
    base = make_tiny_checkpoint(tiny_root, "llama", seed=5)
    store = str(tmp_path / "store")
    proc, url = spawn_server("--model", base, "--adapters-dir", store, "--max-model-len", "128",
                             "--kv-cache-blocks", "32", "--log-level", "warning")
    try:
        c = httpx.Client(base_url=url, timeout=60)
        fid = c.post("/v1/files", files={"file": ("d.jsonl", _data())}, data={"purpose": "fine-tune"}).json()["id"]
        base_id = c.get("/v1/models").json()["data"][0]["id"]
        job = c.post("/v1/fine_tuning/jobs", json={
            "model": base_id, "training_file": fid, "suffix": "kill",
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}},
        }).json()
        # a checkpoint every epoch (4 steps): kill once two are recorded, so one may be mid-write
        wait_for(lambda: len(c.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]) >= 2,
                 "two checkpoints before the kill", timeout=300)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with live_server(model=base, adapters_dir=store, max_model_len=128, kv_cache_blocks=32) as srv, \
            srv.client() as c:
        got = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert got["status"] == "failed" and got["error"]["code"] == "server_restarted", got
        assert got["fine_tuned_model"] is None
        ckpts = c.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
        assert len(ckpts) >= 2
        adapters = {a["name"] for a in c.get("/v1/adapters").json()["data"]}
        # every recorded checkpoint is a stored, servable adapter; nothing else is in the store
        assert {k["fine_tuned_model_checkpoint"] for k in ckpts} <= adapters
        assert all(a.startswith(f"ft:{base_id}:kill:") for a in adapters)
        for k in ckpts[:2]:
            r = c.post("/v1/completions", json={"model": k["fine_tuned_model_checkpoint"], "prompt": [1, 2, 3],
                                                "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200, r.text
        assert c.get(f"/v1/files/{fid}/content").content == _data()
        assert not os.listdir(os.path.join(store, "files", ".tmp"))
        tmp = os.path.join(store, ".tmp")
        assert not os.path.isdir(tmp) or not os.listdir(tmp)
        assert {n for n in os.listdir(os.path.join(store, "adapters"))} == adapters
        events = [e["message"] for e in c.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]]
        assert "Fine-tuning job started" in events
