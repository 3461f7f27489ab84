"""Tenants on one live server (tiny model): keys, the isolation matrix, quotas with recovery, revocation.

Three tenants each own an adapter, an assistant, a training file and a (cancelled) fine-tuning job. Every
route is called with each tenant's key on its own resources (200) and on the other two tenants' (404, and a
body equal to the answer for a name or id that never existed); every body is searched for the other tenants'
names and ids. Quotas run on an injected clock: a test moves time by the Retry-After it was given.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
from typing import Any

import httpx
import pytest

from server.train.manager import adapter_name
from tests.adapters import make_lora
from tests.server_utils import LiveServer, live_server
from tests.tiny import make_tiny_checkpoint
from tests.waits import EngineGate, async_wait_for, wait_for

ADMIN, USER = "admin-secret", "user-secret"
TENANTS = ("alpha", "bravo", "charlie")
WRITE = ["infer", "adapters:write", "finetune", "assistants:write"]
FILES = ("adapter_config.json", "adapter_model.safetensors")
MISSING = "zz-never-existed"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def training_file(n: int = 4) -> bytes:
    rows = [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(n)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def upload(c: httpx.Client, name: str, d: str, method: str = "POST") -> httpx.Response:
    files = [("files", (f, open(os.path.join(d, f), "rb").read())) for f in FILES]
    url = "/v1/adapters" if method == "POST" else f"/v1/adapters/{name}"
    return c.request(method, url, data={"name": name}, files=files)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def base(tiny_root: str) -> str:
    return make_tiny_checkpoint(tiny_root, "llama", seed=31)


@pytest.fixture(scope="module")
def loras(base: str, tiny_root: str) -> list[str]:
    t = ["q_proj", "v_proj"]
    return [make_lora(base, os.path.join(tiny_root, f"tenant-lora-{i}"), r=4, targets=t, seed=40 + i) for i in range(4)]


@pytest.fixture(scope="module")
def srv(base: str, loras: list[str], tmp_path_factory: pytest.TempPathFactory):
    store = str(tmp_path_factory.mktemp("tenant-store"))
    with live_server(model=base, adapters_dir=store, max_model_len=128, kv_cache_blocks=64, max_tokens_limit=32,
                     api_key=USER, admin_key=ADMIN, metrics_require_key=True) as s:
        yield s


@pytest.fixture(scope="module")
def admin(srv: LiveServer):
    with srv.client(headers=bearer(ADMIN)) as c:
        yield c


def new_key(admin: httpx.Client, tenant: str, scopes: list[str] = WRITE, **body: Any) -> dict[str, Any]:
    r = admin.post("/v1/keys", json={"tenant": tenant, "name": f"{tenant}-key", "scopes": scopes, **body})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture(scope="module")
def world(srv: LiveServer, admin: httpx.Client, loras: list[str]) -> dict[str, dict[str, Any]]:
    """Per tenant: its key and everything it created (adapter, assistant, file, job)."""
    out: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(TENANTS):
        k = new_key(admin, t)
        with srv.client(headers=bearer(k["key"])) as c:
            assert upload(c, f"{t}.lora", loras[i]).status_code == 201
            a = c.post("/v1/assistants", json={"name": f"{t}.asst", "model": f"{t}.lora", "instructions": "Hi."})
            assert a.status_code == 200, a.text
            f = c.post("/v1/files", files={"file": ("train.jsonl", training_file())}, data={"purpose": "fine-tune"})
            assert f.status_code == 200, f.text
            j = c.post("/v1/fine_tuning/jobs", json={"model": srv.state.base_name, "training_file": f.json()["id"],
                                                      "suffix": t})
            assert j.status_code == 200, j.text
            assert c.post(f"/v1/fine_tuning/jobs/{j.json()['id']}/cancel").status_code == 200
        out[t] = {"key": k["key"], "key_id": k["id"], "adapter": f"{t}.lora", "assistant": f"{t}.asst",
                  "assistant_id": a.json()["id"], "file": f.json()["id"], "job": j.json()["id"]}
    return out


def secrets_of(w: dict[str, Any]) -> list[str]:
    return [w["adapter"], w["assistant"], w["assistant_id"], w["file"], w["job"], w["key_id"]]


def routes(w: dict[str, Any], srv: LiveServer) -> list[tuple[str, str, dict[str, Any]]]:
    """Every route that names one resource of tenant `w`: (method, path, request kwargs)."""
    a, asst, f, j = w["adapter"], w["assistant_id"], w["file"], w["job"]
    return [
        ("POST", "/v1/completions", {"json": {"model": a, "prompt": "hi", "max_tokens": 2}}),
        ("POST", "/v1/chat/completions", {"json": {"model": w["assistant"], "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "x"}]}}),
        ("POST", "/v1/chat/completions", {"json": {"model": a, "messages": [{"role": "user", "content": "x"}],
                                                   "max_tokens": 2}}),
        ("POST", "/v1/completions", {"json": {"adapters": [{"name": a, "weight": 0.5}], "prompt": "hi",
                                              "max_tokens": 2}}),
        ("GET", f"/v1/adapters/{a}", {}),
        ("PUT", f"/v1/adapters/{a}", {"data": {"name": a}, "files": [("files", ("adapter_config.json", b"{}"))]}),
        ("DELETE", f"/v1/adapters/{a}", {}),
        ("POST", "/v1/unload_lora_adapter", {"json": {"lora_name": a}}),
        ("GET", f"/v1/assistants/{asst}", {}),
        ("POST", f"/v1/assistants/{asst}", {"json": {"description": "mine now"}}),
        ("DELETE", f"/v1/assistants/{asst}", {}),
        ("POST", "/v1/assistants", {"json": {"name": "{me}.stolen", "model": a}}),
        ("GET", f"/v1/files/{f}", {}),
        ("GET", f"/v1/files/{f}/content", {}),
        ("DELETE", f"/v1/files/{f}", {}),
        ("POST", "/v1/fine_tuning/jobs", {"json": {"model": srv.state.base_name, "training_file": f}}),
        ("GET", f"/v1/fine_tuning/jobs/{j}", {}),
        ("GET", f"/v1/fine_tuning/jobs/{j}/events", {}),
        ("GET", f"/v1/fine_tuning/jobs/{j}/checkpoints", {}),
        ("POST", f"/v1/fine_tuning/jobs/{j}/cancel", {}),
    ]


def _fill(kw: dict[str, Any], me: str) -> dict[str, Any]:
    return json.loads(json.dumps(kw).replace("{me}", me)) if "json" in kw else kw


def _missing(w: dict[str, Any]) -> dict[str, Any]:
    """The same resource names, none of which exists."""
    return {**w, "adapter": f"{MISSING}.lora", "assistant": f"{MISSING}.asst", "assistant_id": "asst_" + "0" * 24,
            "file": "file-" + "0" * 24, "job": "ftjob-" + "0" * 24}


def clean(r: httpx.Response, leaked: list[str], what: str) -> None:
    found = [s for s in leaked if s in r.text]
    assert not found, f"{what} leaks {found}: {r.text[:300]}"


def test_isolation_matrix(srv: LiveServer, admin: httpx.Client, world: dict[str, dict[str, Any]]) -> None:
    for me in TENANTS:
        mine = world[me]
        others = [world[o] for o in TENANTS if o != me]
        leaked = [s for o in others for s in secrets_of(o)]
        with srv.client(headers=bearer(mine["key"])) as c:
            # own resources answer (reads; writes are exercised by other tests)
            own_routes = routes(mine, srv)
            for method, path, kw in own_routes[:5] + [own_routes[i] for i in (8, 12, 13, 16, 17, 18)]:
                r = c.request(method, path, **_fill(kw, me))
                assert r.status_code == 200, (me, method, path, r.text)
                clean(r, leaked, f"{me}: {method} {path}")
            # listings: own resources in, nothing of the others
            for path, own in (("/v1/models", mine["adapter"]), ("/v1/adapters", mine["adapter"]),
                              ("/v1/assistants", mine["assistant_id"]), ("/v1/files", mine["file"]),
                              ("/v1/fine_tuning/jobs", mine["job"]), ("/v1/usage", mine["key_id"]),
                              ("/metrics", f'adapter="{mine["adapter"]}"')):
                r = c.get(path)
                assert r.status_code == 200, (me, path, r.text)
                assert own in r.text, (me, path)
                clean(r, leaked, f"{me}: GET {path}")
            assert f'tenant="{me}"' in c.get("/metrics").text
            assert [u["key_id"] for u in c.get("/v1/usage").json()["data"]] == [mine["key_id"]]
            # the others' resources: exactly the answer for a resource that never existed
            gone = routes(_missing(mine), srv)
            for o in others:
                for (method, path, kw), (_, gpath, gkw) in zip(routes(o, srv), gone, strict=True):
                    r = c.request(method, path, **_fill(kw, me))
                    g = c.request(method, gpath, **_fill(gkw, me))
                    assert r.status_code == g.status_code and r.status_code in (400, 404), \
                        (me, method, path, r.status_code, r.text, g.status_code)
                    swap = {o[k]: _missing(mine)[k] for k in ("adapter", "assistant", "assistant_id", "file", "job")}
                    text = r.text
                    for old, new in swap.items():
                        text = text.replace(old, new)
                    assert text == g.text, (me, method, path)
                    sent = path + json.dumps(kw, default=str)  # an error may echo what the client sent, only that
                    clean(r, [x for x in leaked if x not in sent], f"{me}: {method} {path}")
    # admin (bootstrap --admin-key) sees and uses everything; the bootstrap user key sees none of it
    with srv.client(headers=bearer(USER)) as u:
        for t in TENANTS:
            w = world[t]
            for path in ("/v1/models", "/v1/adapters", "/v1/assistants", "/v1/files", "/v1/fine_tuning/jobs"):
                assert all(s not in u.get(path).text for s in secrets_of(w)), path
                assert w["adapter"] in admin.get("/v1/adapters").text
            for method, path, kw in [routes(w, srv)[i] for i in (0, 1, 4, 8, 12, 16)]:
                assert admin.request(method, path, **_fill(kw, "admin")).status_code == 200, (t, path)
            assert u.post("/v1/completions", json={"model": w["adapter"], "prompt": "hi",
                                                   "max_tokens": 2}).status_code == 404
        assert {d["key_id"] for d in admin.get("/v1/usage").json()["data"]} >= {world[t]["key_id"] for t in TENANTS}


def test_names_stay_in_the_tenant_namespace(srv: LiveServer, world: dict[str, Any], loras: list[str]) -> None:
    """A tenant creates names only under '<tenant>.': another tenant's name can never answer 409."""
    with srv.client(headers=bearer(world["alpha"]["key"])) as c:
        r = upload(c, "bravo.lora", loras[3])  # taken by bravo: the answer is the namespace rule, not 409
        assert r.status_code == 400 and "namespace" in r.json()["error"]["message"], r.text
        assert upload(c, "bravo.free", loras[3]).text.replace("free", "lora") == r.text
        r = c.post("/v1/assistants", json={"name": "bravo.asst", "model": "alpha.lora"})
        assert r.status_code == 400 and "namespace" in r.text


def test_fine_tuned_models_belong_to_the_jobs_tenant(srv: LiveServer, admin: httpx.Client, world: dict[str, Any],
                                                     loras: list[str]) -> None:
    job = world["alpha"]["job"]
    name = adapter_name(srv.state.base_name, "alpha", job[-8:])  # what the job lands (here: an admin upload)
    assert upload(admin, name, loras[3]).status_code == 201
    try:
        with srv.client(headers=bearer(world["alpha"]["key"])) as a, \
                srv.client(headers=bearer(world["bravo"]["key"])) as b:
            assert a.get(f"/v1/adapters/{name}").status_code == 200
            assert name in a.get("/v1/models").text
            assert b.get(f"/v1/adapters/{name}").status_code == 404
            assert name not in b.get("/v1/models").text
    finally:
        assert admin.delete(f"/v1/adapters/{name}").status_code == 204


def test_keys_are_shown_once_stored_hashed_and_need_admin(srv: LiveServer, admin: httpx.Client,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    k = new_key(admin, "delta", ["infer"])
    listed = admin.get("/v1/keys").json()["data"]
    assert k["id"] in [x["id"] for x in listed] and k["key"] not in json.dumps(listed)
    secret = k["key"].split("_", 2)[2]
    db = sqlite3.connect(srv.state.store.index_path)
    dump = "\n".join(db.iterdump())
    db.close()
    assert k["id"] in dump and secret not in dump
    with caplog.at_level(logging.INFO, logger="peftserve.request"), srv.client(headers=bearer(k["key"])) as c:
        assert c.get("/v1/models").status_code == 200
        bad = k["key"][:-4] + ("aaaa" if not k["key"].endswith("aaaa") else "bbbb")
        assert c.get("/v1/models", headers=bearer(bad)).status_code == 401
        # scopes: infer only
        assert c.get("/v1/files").status_code == 403
        assert c.post("/v1/adapters", data={"name": "delta.x"}, files=[("files", ("a", b"x"))]).status_code == 403
        assert c.post("/v1/keys", json={"tenant": "delta"}).status_code == 403
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert k["id"] in logged and secret not in logged
    with srv.client(headers=bearer(USER)) as u:  # the bootstrap user key is no admin
        assert u.get("/v1/keys").status_code == 403
    assert admin.post("/v1/keys", json={"tenant": "Bad Name"}).status_code == 400
    assert admin.post("/v1/keys", json={"tenant": "x", "scopes": ["root"]}).status_code == 400
    assert admin.delete(f"/v1/keys/{k['id']}").status_code == 200
    assert admin.delete(f"/v1/keys/{k['id']}").status_code == 404


@pytest.fixture
def clock(srv: LiveServer):
    c = FakeClock()
    previous = srv.state.tenants.clock
    srv.state.tenants.clock = c
    yield c
    srv.state.tenants.clock = previous


def settled(srv: LiveServer, key_id: str) -> None:
    """Wait until the key's requests have all ended in the middleware (tokens taken, usage counted): a client
    has the whole answer a moment before that."""
    lim = srv.state.tenants._limiters.get(key_id)
    wait_for(lambda: lim is None or lim.in_flight == 0, f"key {key_id}'s requests to end")


def _refused(r: httpx.Response, limit: str) -> int:
    assert r.status_code == 429, r.text
    assert limit in r.json()["error"]["message"]
    return int(r.headers["retry-after"])


def test_requests_per_minute_and_recovery(srv: LiveServer, admin: httpx.Client, clock: FakeClock) -> None:
    k = new_key(admin, "rpm", ["infer"], limits={"requests_per_minute": 2})
    with srv.client(headers=bearer(k["key"])) as c:
        assert [c.get("/v1/models").status_code for _ in range(2)] == [200, 200]
        wait = _refused(c.get("/v1/models"), "requests_per_minute")
        assert wait == 30  # one request of 2/min comes back in 30 s
        clock.now += wait - 1
        _refused(c.get("/v1/models"), "requests_per_minute")
        clock.now += 1
        assert c.get("/v1/models").status_code == 200
        assert c.get("/v1/usage").status_code == 429  # /v1/usage counts too; the refusal is counted
        clock.now += 30
        settled(srv, k["id"])
        u = c.get("/v1/usage").json()["data"][0]
        assert u["rejected"]["requests_per_minute"] == 3 and u["requests"] == 3


def test_tokens_per_minute_and_recovery(srv: LiveServer, admin: httpx.Client, clock: FakeClock) -> None:
    k = new_key(admin, "tpm", ["infer"], limits={"tokens_per_minute": 12})
    body = {"prompt": "hello tenants", "max_tokens": 4, "temperature": 0}
    with srv.client(headers=bearer(k["key"])) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200
        used = r.json()["usage"]["total_tokens"]
        settled(srv, k["id"])
        assert used > 12  # the one request took the bucket below zero
        wait = _refused(c.post("/v1/completions", json=body), "tokens_per_minute")
        assert wait == -(-(used - 12 + 1) * 60 // 12)  # seconds until one token is back at 12/min
        assert c.get("/v1/models").status_code == 200  # non-generation routes do not need tokens
        clock.now += wait - 1
        _refused(c.post("/v1/completions", json=body), "tokens_per_minute")
        clock.now += 1
        assert c.post("/v1/completions", json=body).status_code == 200
        settled(srv, k["id"])
        u = c.get("/v1/usage").json()["data"][0]
        assert u["prompt_tokens"] + u["completion_tokens"] == 2 * used and u["rejected"]["tokens_per_minute"] == 2


def test_concurrent_requests_limit(srv: LiveServer, admin: httpx.Client) -> None:
    k = new_key(admin, "conc", ["infer"], limits={"concurrent_requests": 1})
    body = {"prompt": "hi", "max_tokens": 3, "stream": True}
    eng = srv.state.engine

    async def go() -> None:
        async with srv.async_client(headers=bearer(k["key"])) as c:
            gate = EngineGate(eng)
            try:
                async with c.stream("POST", "/v1/completions", json=body) as first:
                    assert first.status_code == 200
                    await async_wait_for(lambda: gate.entered.is_set(), "the stream's request at the engine gate")
                    r = await c.post("/v1/completions", json={**body, "stream": False})
                    assert r.status_code == 429 and "concurrent_requests" in r.text and r.headers["retry-after"]
                    gate.open()
                    assert "[DONE]" in "".join([x async for x in first.aiter_text()])
            finally:
                gate.open()
            await asyncio.to_thread(settled, srv, k["id"])
            r = await c.post("/v1/completions", json={**body, "stream": False})
            assert r.status_code == 200, r.text

    asyncio.run(go())


def test_storage_quota_before_writing(srv: LiveServer, admin: httpx.Client, loras: list[str]) -> None:
    size = sum(os.path.getsize(os.path.join(loras[0], f)) for f in FILES)
    k = new_key(admin, "store", ["adapters:write", "finetune"], limits={"storage_bytes": size + 200})
    with srv.client(headers=bearer(k["key"])) as c:
        assert upload(c, "store.one", loras[0]).status_code == 201
        wait = _refused(upload(c, "store.two", loras[1]), "storage_bytes")
        assert wait >= 1 and "store.two" not in srv.state.registry
        assert not any(r.name == "store.two" for r in srv.state.store.list())  # nothing was written
        _refused(c.post("/v1/files", files={"file": ("t.jsonl", training_file(40))}, data={"purpose": "fine-tune"}),
                 "storage_bytes")
        assert c.get("/v1/usage").json()["data"][0]["storage_bytes"] == size
        assert c.delete("/v1/adapters/store.one").status_code == 204  # recovery: free the bytes
        assert upload(c, "store.two", loras[1]).status_code == 201
        assert c.delete("/v1/adapters/store.two").status_code == 204


def test_revoked_key_fails_next_request_and_its_open_stream_is_cut(srv: LiveServer, admin: httpx.Client) -> None:
    """The rule: revocation takes effect at once. The next request is 401, and a stream already open is cut at
    its next chunk with an error event (code key_revoked) and no [DONE]."""
    k = new_key(admin, "revoked", ["infer"])
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
    eng = srv.state.engine

    async def go() -> str:
        async with srv.async_client(headers=bearer(k["key"])) as c:
            gate = EngineGate(eng)
            try:
                async with c.stream("POST", "/v1/chat/completions", json=body) as s:
                    assert s.status_code == 200
                    chunks = s.aiter_text()
                    first = await chunks.__anext__()  # the role prelude, sent before any engine step
                    assert '"role": "assistant"' in first
                    await async_wait_for(lambda: gate.entered.is_set(), "the stream at the engine gate")
                    r = await asyncio.to_thread(admin.delete, f"/v1/keys/{k['id']}")
                    assert r.status_code == 200
                    gate.open()
                    rest = "".join([x async for x in chunks])
            finally:
                gate.open()
            assert (await c.get("/v1/models")).status_code == 401
            return rest

    rest = asyncio.run(go())
    assert "key_revoked" in rest and "[DONE]" not in rest
    wait_for(lambda: not eng.num_requests, "the cut stream's request to leave the engine")


def test_per_tenant_metrics_label_is_bounded(srv: LiveServer, admin: httpx.Client) -> None:
    m = srv.state.tenants.metrics
    before = m.max_labels
    m.max_labels = len(m._labels)  # every label slot is taken: a new tenant folds into "other"
    try:
        k = new_key(admin, "overflow", ["infer"])
        with srv.client(headers=bearer(k["key"])) as c:
            assert c.get("/v1/models").status_code == 200
        text = admin.get("/metrics").text
        assert 'tenant="overflow"' not in text and 'peftserve_tenant_requests_total{tenant="other"}' in text
    finally:
        m.max_labels = before


def test_keys_survive_a_restart_and_old_stores_belong_to_default(base: str, loras: list[str],
                                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    store = str(tmp_path_factory.mktemp("tenant-restart"))
    # a store made before tenants: no owners table, an adapter uploaded by the bootstrap admin
    with live_server(model=base, adapters_dir=store, max_model_len=64, kv_cache_blocks=16, admin_key=ADMIN,
                     api_key=USER) as s, s.client(headers=bearer(ADMIN)) as a:
        assert upload(a, "legacy", loras[0]).status_code == 201
    db = sqlite3.connect(os.path.join(store, "index.sqlite"))
    db.execute("DROP TABLE owners")
    db.execute("DROP TABLE api_keys")
    db.commit()
    db.close()
    with live_server(model=base, adapters_dir=store, max_model_len=64, kv_cache_blocks=16, admin_key=ADMIN,
                     api_key=USER) as s, s.client(headers=bearer(ADMIN)) as a:
        k = new_key(a, "echo", ["infer"], adapters=["leg*"])
        shared = new_key(a, "echo", ["infer"])
    with live_server(model=base, adapters_dir=store, max_model_len=64, kv_cache_blocks=16, admin_key=ADMIN,
                     api_key=USER) as s:
        with s.client(headers=bearer(USER)) as u:
            assert u.get("/v1/adapters/legacy").status_code == 200  # the default tenant's
        with s.client(headers=bearer(k["key"])) as c:  # a pattern grants the default tenant's adapter
            assert c.get("/v1/adapters/legacy").status_code == 200
        with s.client(headers=bearer(shared["key"])) as c:
            assert c.get("/v1/adapters/legacy").status_code == 404
            assert c.get("/v1/models").status_code == 200


def test_threads_share_one_key_without_losing_counts(srv: LiveServer, admin: httpx.Client) -> None:
    k = new_key(admin, "many", ["infer"], limits={"concurrent_requests": 64})

    def hit() -> None:
        with srv.client(headers=bearer(k["key"])) as c:
            for _ in range(5):
                assert c.get("/v1/models").status_code == 200

    ts = [threading.Thread(target=hit) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    settled(srv, k["id"])
    with srv.client(headers=bearer(k["key"])) as c:
        assert c.get("/v1/usage").json()["data"][0]["requests"] == 20


def test_cli_keys_create_ls_rm_and_usage(srv: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    conn = ["--url", srv.url, "--key", ADMIN]
    assert main(["keys", "create", "foxtrot", "--name", "ci", "--scope", "infer", "--rpm", "5", *conn]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("psk_")
    kid = key.split("_")[1]
    assert main(["keys", "ls", *conn]) == 0
    out = capsys.readouterr().out
    assert kid in out and "requests_per_minute=5" in out and key not in out
    with srv.client(headers=bearer(key)) as c:
        assert c.get("/v1/models").status_code == 200
    settled(srv, kid)
    assert main(["usage", "--url", srv.url, "--key", key]) == 0
    assert json.loads(capsys.readouterr().out)[0]["requests"] == 1
    assert main(["keys", "rm", kid, *conn]) == 0
    assert main(["keys", "rm", kid, *conn]) == 1
    assert "does not exist" in capsys.readouterr().err
    with srv.client(headers=bearer(key)) as c:
        assert c.get("/v1/models").status_code == 401
