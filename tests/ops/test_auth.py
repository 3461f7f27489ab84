"""--api-key on /v1, --admin-key on adapter writes, open probes; 401/403 in OpenAI's error shape."""

from __future__ import annotations

import httpx
import pytest

from tests.ops.conftest import SERVER
from tests.server_utils import LiveServer, live_server

API, ADMIN = "sk-ops-Test-123", "adm-ops-Key-456"
ADMIN_WRITES = [("POST", "/v1/adapters"), ("PUT", "/v1/adapters/x"), ("DELETE", "/v1/adapters/x"),
                ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def srv(tiny_model: str) -> LiveServer:
    with live_server(model=tiny_model, api_key=API, admin_key=ADMIN, **SERVER) as s:
        yield s


def assert_denied(r: httpx.Response, status: int = 401) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == ("authentication_error" if status == 401 else "permission_error")
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("headers", [
    {}, bearer("wrong"), bearer(API.upper()), bearer(API.lower()), bearer(API + "x"), bearer(API[:-1]),
    {"Authorization": API}, {"Authorization": f"Basic {API}"}, {"Authorization": "Bearer"},
], ids=["none", "wrong", "upper", "lower", "longer", "prefix", "no-scheme", "basic", "empty"])
def test_v1_routes_need_the_api_key(srv: LiveServer, headers: dict[str, str]) -> None:
    with srv.client() as c:
        assert_denied(c.get("/v1/models", headers=headers))
        assert_denied(c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=headers))
        assert_denied(c.post("/v1/chat/completions", json={"messages": []}, headers=headers))


def test_api_key_and_admin_key_both_open_v1(srv: LiveServer) -> None:
    with srv.client() as c:
        for headers in (bearer(API), bearer(ADMIN), {"authorization": f"bearer {API}"}):
            assert c.get("/v1/models", headers=headers).status_code == 200
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=bearer(API))
        assert r.status_code == 200, r.text


def test_probes_and_metrics_stay_open(srv: LiveServer) -> None:
    with srv.client() as c:
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 200
        assert c.get("/metrics").status_code == 200
        assert c.get("/health", headers=bearer("wrong")).status_code == 200


@pytest.mark.parametrize("method,path", ADMIN_WRITES)
def test_adapter_writes_need_the_admin_key(srv: LiveServer, method: str, path: str) -> None:
    with srv.client() as c:
        assert_denied(c.request(method, path))
        assert_denied(c.request(method, path, headers=bearer("wrong")))
        assert_denied(c.request(method, path, headers=bearer(ADMIN.upper())))
        assert_denied(c.request(method, path, headers=bearer(API)), 403)
        # past auth: whatever the adapter routes answer, it is not an auth failure
        assert c.request(method, path, headers=bearer(ADMIN)).status_code not in (401, 403)


def test_adapter_reads_take_the_api_key(srv: LiveServer) -> None:
    with srv.client() as c:
        assert_denied(c.get("/v1/adapters"))
        assert c.get("/v1/adapters", headers=bearer(API)).status_code not in (401, 403)


def test_metrics_require_key(tiny_model: str) -> None:
    with live_server(model=tiny_model, api_key=API, metrics_require_key=True, **SERVER) as s, s.client() as c:
        assert_denied(c.get("/metrics"))
        assert_denied(c.get("/metrics", headers=bearer("nope")))
        assert c.get("/metrics", headers=bearer(API)).status_code == 200
        assert c.get("/ready").status_code == 200


def test_no_keys_configured_means_open(tiny_model: str) -> None:
    with live_server(model=tiny_model, **SERVER) as s, s.client() as c:
        assert c.get("/v1/models").status_code == 200
        assert c.post("/v1/unload_lora_adapter").status_code not in (401, 403)


def test_admin_key_alone_guards_only_writes(tiny_model: str) -> None:
    with live_server(model=tiny_model, admin_key=ADMIN, **SERVER) as s, s.client() as c:
        assert c.get("/v1/models").status_code == 200
        assert_denied(c.post("/v1/adapters"))
        assert c.post("/v1/adapters", headers=bearer(ADMIN)).status_code not in (401, 403)


def test_api_key_alone_guards_writes_too(tiny_model: str) -> None:
    with live_server(model=tiny_model, api_key=API, **SERVER) as s, s.client() as c:
        assert_denied(c.delete("/v1/adapters/x"))
        assert c.delete("/v1/adapters/x", headers=bearer(API)).status_code not in (401, 403)
