"""The store survives SIGKILL mid-upload, and upload/infer/delete cycles leave memory and fds flat."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx

from tests.adapters import make_lora
from tests.server_utils import live_server, spawn_server
from tests.tiny import make_tiny_checkpoint
from tests.waits import wait_for

CFG, WTS = "adapter_config.json", "adapter_model.safetensors"


def _files(d: str) -> list:
    return [("files", (n, open(os.path.join(d, n), "rb").read())) for n in (CFG, WTS)]


def test_sigkill_during_uploads_leaves_store_intact(tiny_root, tmp_path):
    base = make_tiny_checkpoint(tiny_root, "llama", seed=11)
    d = make_lora(base, os.path.join(tiny_root, "kill-lora"), r=8, targets=["q_proj", "v_proj", "up_proj"], seed=4)
    files = _files(d)
    store = str(tmp_path / "store")
    stored_ok: set[str] = set()
    for round_ in range(3):
        proc, url = spawn_server("--model", base, "--adapters-dir", store, "--max-model-len", "128",
                                 "--kv-cache-blocks", "32", "--log-level", "warning")

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
                 f"an upload of round {round_} to be acknowledged", timeout=300)
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


# ---- faults at the store's boundary (os and SQLite), inside a real store behind a real server ----------------

def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _inject(monkeypatch, fn: str, errnum: int, when) -> list[str]:
    """Make os.<fn> raise OSError(errnum) when `when(path)` holds for the file it touches; the calls that
    failed are recorded (so a test knows its fault fired)."""
    real = getattr(os, fn)
    fired: list[str] = []

    def faulty(*args, **kwargs):
        target = _fd_path(args[0]) if isinstance(args[0], int) else os.fspath(args[0])
        if when(target):
            fired.append(target)
            raise OSError(errnum, os.strerror(errnum), target)
        return real(*args, **kwargs)

    monkeypatch.setattr(os, fn, faulty)
    return fired


def _tree(root: str) -> tuple:
    """Every file and directory of the store but the SQLite files."""
    out = []
    for d, dirs, files in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root) for n in dirs + files if "index.sqlite" not in n]
    return tuple(sorted(out))


def _is_openai_error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, r.text
    return body["error"]


PROMPT = [3, 14, 15, 92, 65]


def _tokens(c: httpx.Client, model: str) -> list[int]:
    r = c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 5, "min_tokens": 5,
                                        "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_store_faults_answer_clearly_and_leave_the_store_unchanged(tiny_root, tmp_path, monkeypatch):
    """ENOSPC on write, EIO on fsync (file and directory), a failed rename, SQLite locked and read-only: each
    upload answers an error in OpenAI's shape naming the problem; the store (files, index, what is served)
    is exactly as before; with the fault gone the same upload succeeds."""
    import errno
    import sqlite3

    from tests.adapters import greedy, peft_model

    base = make_tiny_checkpoint(tiny_root, "llama", seed=11)
    d1 = make_lora(base, os.path.join(tiny_root, "fault-v1"), r=8, targets=["q_proj", "v_proj"], seed=6)
    d2 = make_lora(base, os.path.join(tiny_root, "fault-v2"), r=4, targets=["o_proj"], seed=7)
    ref1, ref2 = greedy(peft_model(base, d1), PROMPT, 5), greedy(peft_model(base, d2), PROMPT, 5)
    assert ref1 != ref2
    root = str(tmp_path / "store")
    tmp_dir = os.path.join(root, ".tmp")
    in_tmp = lambda p: p.startswith(tmp_dir + os.sep)  # noqa: E731
    name_dir = os.path.join(root, "adapters", "a")

    other: list[sqlite3.Connection] = []

    def lock_index() -> None:  # another writer holds the index; the store does not wait for it
        store._db.execute("PRAGMA busy_timeout = 0")
        other.append(sqlite3.connect(os.path.join(root, "index.sqlite"), isolation_level=None))
        other[-1].execute("BEGIN EXCLUSIVE")

    def unlock_index() -> None:
        other.pop().execute("ROLLBACK")
        store._db.execute("PRAGMA busy_timeout = 5000")

    faults = {
        # case: (install the fault, undo it, expected status, expected code, words in the message)
        "write-enospc": (lambda: _inject(monkeypatch, "write", errno.ENOSPC, in_tmp), None, 507,
                         "insufficient_storage", ["out of disk space", "ENOSPC"]),
        "fsync-file-eio": (lambda: _inject(monkeypatch, "fsync", errno.EIO, lambda p: in_tmp(p) and p.endswith(
            ".safetensors")), None, 500, "store_io_error", ["EIO"]),
        "rename-exdev": (lambda: _inject(monkeypatch, "rename", errno.EXDEV, in_tmp), None, 500, "store_io_error",
                         ["EXDEV"]),
        # after the rename: the version directory already exists and must go again
        "fsync-dir-eio": (lambda: _inject(monkeypatch, "fsync", errno.EIO, lambda p: p == name_dir), None, 500,
                          "store_io_error", ["EIO"]),
        "sqlite-locked": (lock_index, unlock_index, 500, "store_index_error", ["index", "locked"]),
        "sqlite-readonly": (lambda: store._db.execute("PRAGMA query_only = ON"),
                            lambda: store._db.execute("PRAGMA query_only = OFF"), 500, "store_index_error",
                            ["index", "readonly"]),
    }
    with live_server(model=base, adapters_dir=root, max_model_len=128, kv_cache_blocks=32) as srv, \
            srv.client() as c:
        store = srv.state.store
        assert c.post("/v1/adapters", data={"name": "a"}, files=_files(d1)).status_code == 201
        assert _tokens(c, "a") == ref1
        before = (_tree(root), [r.to_dict() for r in store.list()])
        for case, (install, undo, status, code, words) in faults.items():
            fired = install()
            r = c.put("/v1/adapters/a", data={"name": "a"}, files=_files(d2))
            if fired is not None:
                assert fired, f"{case}: the fault never fired"
            monkeypatch.undo()
            if undo is not None:
                undo()
            assert r.status_code == status, (case, r.text)
            err = _is_openai_error(r)
            assert err["code"] == code and "'a'" in err["message"] and "nothing was changed" in err["message"], case
            assert all(w.lower() in err["message"].lower() for w in words), (case, err["message"])
            assert (_tree(root), [r.to_dict() for r in store.list()]) == before, case
            assert c.get("/v1/adapters/a").json()["version"] == 1 and _tokens(c, "a") == ref1, case
        r = c.put("/v1/adapters/a", data={"name": "a"}, files=_files(d2))  # the fault is gone: it works
        assert r.status_code == 200 and r.json()["version"] == 2, r.text
        assert _tokens(c, "a") == ref2

        # a DELETE whose index write fails keeps the adapter, served and stored
        store._db.execute("PRAGMA query_only = ON")
        r = c.delete("/v1/adapters/a")
        store._db.execute("PRAGMA query_only = OFF")
        assert r.status_code == 500 and _is_openai_error(r)["code"] == "store_index_error", r.text
        assert [a.name for a in store.list()] == ["a"] and _tokens(c, "a") == ref2
    with live_server(model=base, adapters_dir=root, max_model_len=128, kv_cache_blocks=32) as srv, \
            srv.client() as c:  # and a restart finds the same store
        assert [(a["name"], a["version"]) for a in c.get("/v1/adapters").json()["data"]] == [("a", 2)]
        assert _tokens(c, "a") == ref2


def test_adapter_files_vanishing_after_start_up(tiny_root, tmp_path):
    """Files deleted behind the server's back: a request answers 503 in OpenAI's shape naming the adapter;
    listing still works; a new version can be uploaded and served; DELETE still works."""
    import shutil

    from tests.adapters import greedy, peft_model

    base = make_tiny_checkpoint(tiny_root, "llama", seed=11)
    d1 = make_lora(base, os.path.join(tiny_root, "fault-v1"), r=8, targets=["q_proj", "v_proj"], seed=6)
    ref1 = greedy(peft_model(base, d1), PROMPT, 5)
    assert ref1 != greedy(peft_model(base, None), PROMPT, 5)
    root = str(tmp_path / "store")
    with live_server(model=base, adapters_dir=root, max_model_len=128, kv_cache_blocks=32) as srv, \
            srv.client() as c:
        assert c.post("/v1/adapters", data={"name": "gone"}, files=_files(d1)).status_code == 201
        shutil.rmtree(os.path.join(root, "adapters", "gone"))
        r = c.post("/v1/completions", json={"model": "gone", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 503, r.text
        err = _is_openai_error(r)
        assert err["code"] == "adapter_load_failed" and "'gone'" in err["message"]
        assert [a["name"] for a in c.get("/v1/adapters").json()["data"]] == ["gone"]
        r = c.put("/v1/adapters/gone", data={"name": "gone"}, files=_files(d1))
        assert r.status_code == 200 and r.json()["version"] == 2, r.text
        assert _tokens(c, "gone") == ref1
        assert c.delete("/v1/adapters/gone").status_code == 204
        assert c.get("/v1/adapters").json()["data"] == []


def test_unexpected_exception_answers_in_openai_shape(tiny_root, tmp_path, monkeypatch):
    base = make_tiny_checkpoint(tiny_root, "llama", seed=11)
    with live_server(model=base, adapters_dir=str(tmp_path / "s"), max_model_len=128, kv_cache_blocks=32) as srv, \
            srv.client() as c:
        def broken() -> list[str]:
            raise RuntimeError("registry exploded")

        monkeypatch.setattr(srv.state.registry, "names", broken)
        r = c.get("/v1/adapters")
        assert r.status_code == 500 and r.headers["content-type"].startswith("application/json")
        err = _is_openai_error(r)
        assert err["code"] == "internal_error" and "registry exploded" in err["message"]
