"""Adapters over REST: upload, replace, delete while serving; persistence; every bad input refused."""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import tarfile
import threading
import time
import zipfile

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tests.adapters import greedy, make_lora, peft_model
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint

CFG = "adapter_config.json"
WTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def base(tiny_root: str) -> str:
    return make_tiny_checkpoint(tiny_root, "llama", seed=11)


@pytest.fixture(scope="module")
def lora_dirs(base: str, tiny_root: str) -> dict[str, str]:
    return {
        "v1": make_lora(base, os.path.join(tiny_root, "store-v1"), r=8, targets=["q_proj", "v_proj"], seed=1),
        "v2": make_lora(base, os.path.join(tiny_root, "store-v2"), r=4, targets=["up_proj", "down_proj"], seed=2),
    }


def files_of(d: str) -> dict[str, bytes]:
    return {n: open(os.path.join(d, n), "rb").read() for n in (CFG, WTS)}


def multipart(files: dict[str, bytes], field: str = "files") -> list:
    return [(field, (n, data)) for n, data in files.items()]


def upload(c: httpx.Client, name: str, files: dict[str, bytes], method: str = "POST", field: str = "files"):
    url = "/v1/adapters" if method == "POST" else f"/v1/adapters/{name}"
    return c.request(method, url, data={"name": name}, files=multipart(files, field))


def complete(c: httpx.Client, model: str, prompt: list[int], n: int = 6) -> httpx.Response:
    return c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n, "min_tokens": n,
                                           "temperature": 0, "return_token_ids": True})


PROMPT = [10, 20, 30, 40, 50, 60, 70]


def snapshot(store_root: str) -> tuple:
    """What is on disk in the store: adapter dirs and the index rows (must not change on bad input)."""
    tree = sorted(os.path.relpath(os.path.join(d, f), store_root) for d, _, fs in os.walk(store_root) for f in fs
                  if "index.sqlite" not in f)
    return tuple(t for t in tree if not t.startswith(".tmp"))


def test_upload_infer_restart_same_tokens(base, lora_dirs, tmp_path):
    ref = greedy(peft_model(base, lora_dirs["v1"]), PROMPT, 6)
    assert ref != greedy(peft_model(base, None), PROMPT, 6)
    store = str(tmp_path / "store")
    with live_server(model=base, adapters_dir=store, max_model_len=128, kv_cache_blocks=64) as srv, srv.client() as c:
        r = upload(c, "cust-a", files_of(lora_dirs["v1"]))
        assert r.status_code == 201, r.text
        rec = r.json()
        assert rec["name"] == "cust-a" and rec["version"] == 1 and rec["peft_type"] == "LORA" and rec["rank"] == 8
        assert len(rec["sha256"]) == 64 and rec["size_bytes"] > 0 and rec["residency"] in ("disk", "cpu")
        assert sorted(rec["target_modules"]) == ["q_proj", "v_proj"]
        assert "cust-a" in [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert complete(c, "cust-a", PROMPT).json()["choices"][0]["token_ids"] == ref
        assert c.get("/v1/adapters/cust-a").json()["residency"] == "device"
        assert upload(c, "cust-a", files_of(lora_dirs["v1"])).status_code == 409
        listed = c.get("/v1/adapters").json()["data"]
        assert [a["name"] for a in listed] == ["cust-a"]
    with live_server(model=base, adapters_dir=store, max_model_len=128, kv_cache_blocks=64) as srv, srv.client() as c:
        assert c.get("/v1/adapters/cust-a").json()["sha256"] == rec["sha256"]
        assert complete(c, "cust-a", PROMPT).json()["choices"][0]["token_ids"] == ref


def _tar(files: dict[str, bytes], folder: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for n, data in files.items():
            info = tarfile.TarInfo(os.path.join(folder, n) if folder else n)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    return buf.getvalue()


def test_archive_uploads_and_vllm_routes(base, lora_dirs, tmp_path):
    ref = greedy(peft_model(base, lora_dirs["v2"]), PROMPT, 6)
    f = files_of(lora_dirs["v2"])
    with live_server(model=base, adapters_dir=str(tmp_path / "s"), max_model_len=128, kv_cache_blocks=64,
                     allowed_adapter_dir=[os.path.dirname(lora_dirs["v2"])]) as srv, srv.client() as c:
        assert c.post("/v1/adapters", data={"name": "tgz"}, files=[("archive", ("a.tar.gz", _tar(f, "inner")))]
                      ).status_code == 201
        assert c.post("/v1/adapters", data={"name": "zip"}, files=[("archive", ("a.zip", _zip(f)))]).status_code == 201
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": lora_dirs["v2"]})
        assert r.status_code == 200, r.text
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": "/etc"})
        assert r.status_code == 403 and "allowed-adapter-dir" in r.json()["error"]["message"]
        for name in ("tgz", "zip", "vl"):
            assert complete(c, name, PROMPT).json()["choices"][0]["token_ids"] == ref
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "vl"}).status_code == 200
        assert complete(c, "vl", PROMPT).status_code == 404
        assert c.delete("/v1/adapters/zip").status_code == 204
        assert c.delete("/v1/adapters/zip").status_code == 404
        assert sorted(m["id"] for m in c.get("/v1/models").json()["data"][1:]) == ["tgz"]


def _corrupt_header_past_end(w: bytes) -> bytes:
    return struct.pack("<Q", len(w) * 4) + w[8:]


def _overlapping_offsets(w: bytes) -> bytes:
    (n,) = struct.unpack("<Q", w[:8])
    header = json.loads(w[8:8 + n])
    keys = [k for k in header if k != "__metadata__"]
    header[keys[1]]["data_offsets"] = header[keys[0]]["data_offsets"]
    raw = json.dumps(header).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    return struct.pack("<Q", len(raw)) + raw + w[8 + n:]


def _with_tensors(w: bytes, fn) -> bytes:
    t = st_load(w)
    fn(t)
    return st_save(t)


def _nan(t):
    k = next(iter(t))
    t[k][0, 0] = float("nan")


def _wrong_shape(t):
    k = next(k for k in t if "lora_A" in k)
    t[k] = torch.randn(t[k].shape[0], t[k].shape[1] + 3)


def _cfg(f: dict[str, bytes], **changes) -> dict[str, bytes]:
    cfg = json.loads(f[CFG])
    cfg.update(changes)
    return {**f, CFG: json.dumps(cfg).encode()}


def _tar_attack(kind: str, f: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for n, data in f.items():
            info = tarfile.TarInfo(n)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        evil = tarfile.TarInfo({"abs": "/etc/evil", "dotdot": "../evil", "link": "link"}[kind])
        if kind == "link":
            evil.type = tarfile.SYMTYPE
            evil.linkname = "/etc/passwd"
        else:
            evil.size = 1
        t.addfile(evil, io.BytesIO(b"x") if kind != "link" else None)
    return buf.getvalue()


BAD_CASES = {
    # case: (name, files-builder, field, status, message fragment)
    "pickle": ("p1", lambda f: {CFG: f[CFG], "adapter_model.bin": b"\x80\x04K."}, "files", 422, "pickle"),
    "missing-config": ("p2", lambda f: {WTS: f[WTS]}, "files", 400, CFG),
    "config-not-json": ("p3", lambda f: {**f, CFG: b"{not json"}, "files", 400, "JSON"),
    "peft-type": ("p4", lambda f: _cfg(f, peft_type="LOHA"), "files", 422, "PROMPT_TUNING"),
    "header-past-end": ("p5", lambda f: {**f, WTS: _corrupt_header_past_end(f[WTS])}, "files", 400, "header"),
    "overlap": ("p6", lambda f: {**f, WTS: _overlapping_offsets(f[WTS])}, "files", 400, "overlap"),
    "shape": ("p7", lambda f: {**f, WTS: _with_tensors(f[WTS], _wrong_shape)}, "files", 422, "shape"),
    "rank": ("p8", lambda f: _cfg(f, r=128, lora_alpha=16), "files", 422, "128"),
    "target": ("p9", lambda f: _cfg(f, target_modules=["q_proj", "wqkv"]), "files", 422, "wqkv"),
    "nan": ("p10", lambda f: {**f, WTS: _with_tensors(f[WTS], _nan)}, "files", 400, "NaN"),
    "auto-map": ("p11", lambda f: _cfg(f, auto_map={"AutoModel": "evil.Model"}), "files", 422, "auto_map"),
    "remote-base": ("p12", lambda f: _cfg(f, base_model_name_or_path="https://evil.example/model"), None, 201, ""),
    "bad-name": ("../etc", lambda f: f, "files", 400, "name"),
    "dotdot-name": ("a..b", lambda f: f, "files", 400, ".."),
    "long-name": ("x" * 65, lambda f: f, "files", 400, "name"),
    "abs-member": ("p13", lambda f: {"a.tar.gz": _tar_attack("abs", f)}, "archive", 400, "absolute"),
    "dotdot-member": ("p14", lambda f: {"a.tar.gz": _tar_attack("dotdot", f)}, "archive", 400, ".."),
    "link-member": ("p15", lambda f: {"a.tar.gz": _tar_attack("link", f)}, "archive", 400, "link"),
}


def test_bad_uploads_refused_store_unchanged(base, lora_dirs, tmp_path):
    f = files_of(lora_dirs["v1"])
    store = str(tmp_path / "store")
    with live_server(model=base, adapters_dir=store, max_model_len=128, kv_cache_blocks=64,
                     max_rank=64) as srv, srv.client() as c:
        assert upload(c, "good", f).status_code == 201
        before = snapshot(store)
        for case, (name, build, field, status, fragment) in BAD_CASES.items():
            files = build(f)
            r = c.post("/v1/adapters", data={"name": name}, files=multipart(files, field or "files"))
            assert r.status_code == status, (case, r.text)
            if status == 201:  # a remote base_model_name_or_path is recorded, never fetched
                assert c.delete(f"/v1/adapters/{name}").status_code == 204
                continue
            msg = r.json()["error"]["message"]
            assert fragment.lower() in msg.lower(), (case, msg)
            assert snapshot(store) == before, case
            assert not os.listdir(os.path.join(store, ".tmp")) if os.path.isdir(os.path.join(store, ".tmp")) else True
        assert [a["name"] for a in c.get("/v1/adapters").json()["data"]] == ["good"]
        assert complete(c, "good", PROMPT).status_code == 200  # still serving


def test_upload_size_limit_and_concurrent_same_name(base, lora_dirs, tmp_path):
    f = files_of(lora_dirs["v1"])
    with live_server(model=base, adapters_dir=str(tmp_path / "s"), max_model_len=128, kv_cache_blocks=64,
                     max_upload_mb=1) as srv:
        with srv.client() as c:
            big = {**f, WTS: f[WTS] + b"\0" * (2 << 20)}
            r = upload(c, "big", big)
            assert r.status_code == 413 and "max-upload-mb" in r.json()["error"]["message"]

        async def race():
            async with srv.async_client() as ac:
                return await asyncio.gather(*(ac.post("/v1/adapters", data={"name": "same"},
                                                      files=multipart(f)) for _ in range(4)))

        codes = sorted(r.status_code for r in asyncio.run(race()))
        assert codes == [201, 409, 409, 409]


async def _until(cond, what: str, timeout: float = 60.0) -> None:
    """Wait for an engine state change, with a deadline and a message."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.005)


async def _stream_tokens(ac: httpx.AsyncClient, model: str, prompt: list[int], n: int) -> list[int]:
    ids: list[int] = []
    async with ac.stream("POST", "/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": n, "min_tokens": n, "temperature": 0, "stream": True,
            "return_token_ids": True}) as s:
        assert s.status_code == 200
        async for line in s.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ids += json.loads(line[6:])["choices"][0]["token_ids"]
    return ids


def test_replace_and_delete_while_streaming(base, lora_dirs, tmp_path):
    n = 40
    prompts = [[5 + i, 17, 33 + i, 90] for i in range(12)]
    m1, m2 = peft_model(base, lora_dirs["v1"]), peft_model(base, lora_dirs["v2"])
    ref1 = [greedy(m1, p, n) for p in prompts]
    ref2 = [greedy(m2, p, n) for p in prompts]
    assert all(a != b for a, b in zip(ref1, ref2, strict=True))  # v1 and v2 are told apart on every prompt
    with live_server(model=base, adapters_dir=str(tmp_path / "s"), max_model_len=128, kv_cache_blocks=256,
                     block_size=8, max_num_seqs=16, max_batch_tokens=64) as srv:
        with srv.client() as c:
            assert upload(c, "live", files_of(lora_dirs["v1"])).status_code == 201
        eng = srv.state.engine

        async def scenario():
            async with srv.async_client() as ac:
                streams = [asyncio.create_task(_stream_tokens(ac, "live", p, n)) for p in prompts]
                await _until(lambda: eng.num_running == len(prompts), "all streams running")
                gate = threading.Event()  # hold the engine between steps while the PUT runs
                eng.fault_injector = lambda chunks: gate.wait(60)
                try:
                    r = await ac.put("/v1/adapters/live", data={"name": "live"},
                                     files=multipart(files_of(lora_dirs["v2"])))
                    assert r.status_code == 200 and r.json()["version"] == 2
                    assert not any(t.done() for t in streams)  # replaced while they were streaming
                finally:
                    eng.fault_injector = None
                    gate.set()
                after = await ac.post("/v1/completions", json={"model": "live", "prompt": prompts[0], "max_tokens": 6,
                                                                "min_tokens": 6, "temperature": 0,
                                                                "return_token_ids": True})
                old = await asyncio.gather(*streams)
                streams2 = [asyncio.create_task(_stream_tokens(ac, "live", p, n)) for p in prompts]
                await _until(lambda: eng.num_running == len(prompts), "all second streams running")
                d = await ac.delete("/v1/adapters/live")
                assert srv.state.registry.in_flight("live") == 0  # the delete waited for them
                return old, after, await asyncio.wait_for(asyncio.gather(*streams2), 60), d

        old, after, new, d = asyncio.run(scenario())
        assert old == ref1  # every stream finished on the version it started with
        assert after.json()["choices"][0]["token_ids"] == ref2[0][:6]
        assert new == ref2
        assert d.status_code == 204
        with srv.client() as c:
            assert complete(c, "live", prompts[0]).status_code == 404
        assert eng.allocator.num_used == 0 and eng.slots.num_in_use == 0


def test_reuploaded_name_never_serves_the_old_weights(base, lora_dirs, tmp_path):
    """DELETE gives up waiting (short --shutdown-timeout) while a stream still runs on 'x' v1, then a new
    'x' is uploaded (version 1 again): new requests get the new weights, the old stream keeps the old."""
    n = 100
    p = [9, 8, 7, 6]
    ref1 = greedy(peft_model(base, lora_dirs["v1"]), p, n)
    ref2 = greedy(peft_model(base, lora_dirs["v2"]), PROMPT, 6)
    assert ref1 != greedy(peft_model(base, lora_dirs["v2"]), p, n)  # the old stream could tell v2 apart
    assert ref2 != greedy(peft_model(base, lora_dirs["v1"]), PROMPT, 6)  # and the new request v1
    with live_server(model=base, adapters_dir=str(tmp_path / "s"), max_model_len=128, kv_cache_blocks=64,
                     shutdown_timeout=0.2) as srv:
        with srv.client() as c:
            assert upload(c, "x", files_of(lora_dirs["v1"])).status_code == 201
        srv.state.engine.fault_injector = lambda chunks: time.sleep(0.01)  # keep the old stream running ~1 s

        async def scenario():
            async with srv.async_client() as ac:
                old = asyncio.create_task(_stream_tokens(ac, "x", p, n))
                await _until(lambda: srv.state.engine.num_running >= 1, "the old stream running")
                assert (await ac.delete("/v1/adapters/x")).status_code == 204
                r = await ac.post("/v1/adapters", data={"name": "x"}, files=multipart(files_of(lora_dirs["v2"])))
                assert r.status_code == 201 and r.json()["version"] == 1
                new = await ac.post("/v1/completions", json={"model": "x", "prompt": PROMPT, "max_tokens": 6,
                                                              "min_tokens": 6, "temperature": 0,
                                                              "return_token_ids": True})
                return await old, new

        old, new = asyncio.run(scenario())
        assert new.json()["choices"][0]["token_ids"] == ref2
        assert old == ref1


def test_concurrent_puts_of_one_name_all_succeed(base, lora_dirs, tmp_path):
    """8 PUTs of one name in parallel (the store keeps 2 versions, so most are pruned by the time their
    request answers): every one answers 200 with the version it wrote; the newest is served."""
    refs = {k: greedy(peft_model(base, lora_dirs[k]), PROMPT, 6) for k in ("v1", "v2")}
    assert refs["v1"] != refs["v2"]
    with live_server(model=base, adapters_dir=str(tmp_path / "s"), max_model_len=128, kv_cache_blocks=64) as srv:
        with srv.client() as c:
            shas = {}
            for k in ("v1", "v2"):  # the sha256 each file set gets in the store
                r = upload(c, f"probe-{k}", files_of(lora_dirs[k]))
                assert r.status_code == 201, r.text
                shas[r.json()["sha256"]] = k
            assert upload(c, "same", files_of(lora_dirs["v1"])).status_code == 201

        async def race():
            async with srv.async_client() as ac:
                return await asyncio.gather(*(
                    ac.put("/v1/adapters/same", data={"name": "same"},
                           files=multipart(files_of(lora_dirs["v2" if i % 2 else "v1"]))) for i in range(8)))

        answers = asyncio.run(race())
        for r in answers:
            assert r.status_code < 500, (r.status_code, r.text)
            assert r.status_code == 200 or set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
        assert [r.status_code for r in answers] == [200] * 8
        written = sorted((r.json()["version"], shas[r.json()["sha256"]]) for r in answers)
        assert [v for v, _ in written] == list(range(2, 10))
        with srv.client() as c:
            shown = c.get("/v1/adapters/same").json()
            assert shown["version"] == 9 and srv.state.store.get("same").version == 9
            r = complete(c, "same", PROMPT)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == refs[written[-1][1]]


def test_adapter_named_like_the_base_model_is_refused(base, lora_dirs, tmp_path):
    store = str(tmp_path / "s")
    with live_server(model=base, adapters_dir=store, max_model_len=128, kv_cache_blocks=64,
                     allowed_adapter_dir=[os.path.dirname(lora_dirs["v1"])]) as srv, srv.client() as c:
        base_id = c.get("/v1/models").json()["data"][0]["id"]
        r = upload(c, base_id, files_of(lora_dirs["v1"]))
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["param"] == "name" and base_id in err["message"] and "base model" in err["message"]
        r = c.post("/v1/load_lora_adapter", json={"lora_name": base_id, "lora_path": lora_dirs["v1"]})
        assert r.status_code == 409, r.text
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [base_id]
        assert snapshot(store) == ()


def _zip_bomb(mb: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr(CFG, b"{}")
        z.writestr(WTS, bytes(mb << 20))
    return buf.getvalue()


def _tgz_bomb(mb: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=9) as t:
        info = tarfile.TarInfo(CFG)
        info.size = 2
        t.addfile(info, io.BytesIO(b"{}"))
        info = tarfile.TarInfo(WTS)
        info.size = mb << 20
        t.addfile(info, io.BytesIO(bytes(info.size)))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_bomb_refused_off_the_event_loop(base, lora_dirs, tmp_path, monkeypatch, kind):
    """A small archive that unpacks far past --max-upload-mb: 413 naming the flag, the store unchanged, and
    the server answers /health while the archive is being unpacked (in a worker thread, not on the loop)."""
    import server.api.adapters as adapters_api

    bomb = _zip_bomb(48) if kind == "zip" else _tgz_bomb(48)
    assert len(bomb) < 1 << 20  # it passes the upload limit itself
    entered, release = threading.Event(), threading.Event()
    real = adapters_api.extract_upload

    def gated(*args, **kwargs):  # the real unpacking, held until /health has answered
        entered.set()
        assert release.wait(60), "the test never released the unpacking"
        return real(*args, **kwargs)

    store = str(tmp_path / "s")
    with live_server(model=base, adapters_dir=store, max_model_len=128, kv_cache_blocks=64,
                     max_upload_mb=1) as srv, srv.client() as c:
        assert upload(c, "good", files_of(lora_dirs["v1"])).status_code == 201
        before = snapshot(store)
        monkeypatch.setattr(adapters_api, "extract_upload", gated)
        answer: list[httpx.Response] = []
        t = threading.Thread(target=lambda: answer.append(
            c.post("/v1/adapters", data={"name": "bomb"}, files=[("archive", (f"a.{kind}", bomb))])))
        t.start()
        try:
            assert entered.wait(60), "the upload never reached the unpacking"
            with srv.client(timeout=30) as probe:
                assert probe.get("/health").status_code == 200  # the event loop is free meanwhile
        finally:
            release.set()
            t.join(60)
        r = answer[0]
        assert r.status_code == 413, r.text
        assert "--max-upload-mb 1" in r.json()["error"]["message"]
        assert snapshot(store) == before
        assert [a["name"] for a in c.get("/v1/adapters").json()["data"]] == ["good"]
