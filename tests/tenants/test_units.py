"""Tenants' parts without a server: token buckets on a fake clock, the key store's hashing, scopes, labels."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from adapters_store.keys import KeyStore, parse_key
from server.tenants.metrics import TenantMetrics
from server.tenants.quotas import KeyLimiter, TokenBucket
from server.tenants.service import required_scope


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_bucket_bursts_a_minute_then_refills_at_the_steady_rate() -> None:
    c = Clock()
    b = TokenBucket(6, c)  # 6/min: one every 10 s
    for _ in range(6):
        assert b.wait_for(1) == 0
        b.take(1)
    assert b.wait_for(1) == 10
    c.t = 9
    assert b.wait_for(1) == pytest.approx(1)
    c.t = 10
    assert b.wait_for(1) == 0
    c.t = 10_000  # never more than one minute's worth
    b.take(6)
    assert b.wait_for(1) == 10


def test_limiter_refuses_without_taking_and_names_the_limit() -> None:
    c = Clock()
    lim = KeyLimiter("k1", {"requests_per_minute": 2, "tokens_per_minute": 60, "concurrent_requests": 1}, c)
    assert lim.admit(generation=True) is None
    r = lim.admit(generation=True)
    assert r is not None and r.limit == "concurrent_requests" and "concurrent_requests is 1" in r.message
    lim.done(90)  # 90 tokens: the bucket of 60/min is 30 below zero
    r = lim.admit(generation=True)
    assert r is not None and r.limit == "tokens_per_minute" and r.retry_after == 31
    assert lim.admit(generation=False) is None  # other routes need no tokens
    lim.done(0)
    r = lim.admit(generation=False)
    assert r is not None and r.limit == "requests_per_minute" and r.retry_after == 30
    c.t = 31
    assert lim.admit(generation=True) is None  # 31 s: one token and one request are back


def test_key_store_hashes_with_a_salt_and_verifies_in_constant_time(tmp_path: Path) -> None:
    ks = KeyStore(tmp_path / "index.sqlite")
    a, key_a = ks.create("acme", "a", ["infer"], [], True, {"requests_per_minute": 5})
    b, key_b = ks.create("acme", "b", ["infer"], [], True, {})
    kid, secret = parse_key(key_a)  # type: ignore[misc]
    assert kid == a.id and ks.verify(kid, secret) == a
    assert ks.verify(kid, secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert ks.verify(b.id, secret) is None and ks.verify("0" * 12, secret) is None
    rows = sqlite3.connect(tmp_path / "index.sqlite").execute("SELECT id, salt, hash FROM api_keys").fetchall()
    assert len({r[1] for r in rows}) == 2 and all(secret.encode() not in r[2] for r in rows)
    ks.close()
    again = KeyStore(tmp_path / "index.sqlite")  # survives a restart; revocation deletes
    assert again.verify(kid, secret) == a
    assert again.delete(kid) == a and again.verify(kid, secret) is None and again.get(b.id) == b
    assert parse_key("sk-not-a-tenant-key") is None


@pytest.mark.parametrize("method,path,scope", [
    ("POST", "/v1/completions", "infer"), ("POST", "/v1/chat/completions", "infer"),
    ("GET", "/v1/models", None), ("GET", "/v1/adapters", None), ("POST", "/v1/adapters", "adapters:write"),
    ("DELETE", "/v1/adapters/x", "adapters:write"), ("POST", "/v1/unload_lora_adapter", "adapters:write"),
    ("POST", "/v1/load_lora_adapter", "admin"), ("GET", "/v1/files", "finetune"),
    ("POST", "/v1/fine_tuning/jobs", "finetune"), ("GET", "/v1/assistants", None),
    ("PATCH", "/v1/assistants/a", "assistants:write"), ("GET", "/v1/keys", "admin"), ("POST", "/v1/evals", "admin"),
    ("GET", "/v1/usage", None),
])
def test_scopes_per_route(method: str, path: str, scope: str | None) -> None:
    assert required_scope(method, path) == scope


def test_tenant_label_is_bounded() -> None:
    m = TenantMetrics(CollectorRegistry(), max_labels=2)
    assert [m.label(t) for t in ("a", "b", "c", "a")] == ["a", "b", "other", "a"]


def test_two_processes_on_one_store_agree_on_keys(tmp_path: Path) -> None:
    """Ray replicas (or any two servers) on one store: a key made or revoked by one is seen by the other."""
    one, two = KeyStore(tmp_path / "index.sqlite"), KeyStore(tmp_path / "index.sqlite")
    rec, key = one.create("acme", "a", ["infer"], [], True, {})
    kid, secret = parse_key(key)  # type: ignore[misc]
    assert two.verify(kid, secret) == rec and len(two) == 1
    assert two.delete(kid) == rec
    assert one.get(kid) is None and one.verify(kid, secret) is None and len(one) == 0
