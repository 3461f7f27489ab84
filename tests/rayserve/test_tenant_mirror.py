"""server/tenants/mirror.py without Ray: a "writer" and a "replica" process, each with its own store (two SQLite
files), as the Ray app has them. Proves: a key created on the writer is admitted by the replica only once the
request's payload is applied (then with the writer's scopes and limits), with the owners of what it names;
a revoke on the writer refuses the key on the replica at the next request (payload) and, without a request, at
the next metrics push (`prune`, which also cuts an open stream: Admission.revoked); the writer's /v1/usage sums
the replicas' pushed counters."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from adapters_store.keys import KeyStore
from server.tenants import mirror
from server.tenants.service import Tenants


def _tenants(path: Path) -> Tenants:
    t = Tenants(KeyStore(path))
    t.bind(SimpleNamespace(settings=SimpleNamespace(admin_key="adm", api_key=None), store=None))  # no adapter store
    return t


def _admit(t: Tenants, key: str | None, path: str = "/v1/completions") -> Any:
    def bootstrap_error() -> None:
        return None

    return asyncio.run(t.admit({}, "POST", path, key, bootstrap_error, generation=True))


def test_replica_admits_what_the_writer_has(tmp_path: Path) -> None:
    writer, replica = _tenants(tmp_path / "w.sqlite"), _tenants(tmp_path / "r.sqlite")
    rec, key = writer.keys.create("acme", "prod", ["infer"], [], True, {"requests_per_minute": 1})
    writer.keys.own("adapter", "acme.lora", "acme", rec.id)
    auth = f"Bearer {key}"

    assert _admit(replica, key).denied.status == 401, "the replica's own store does not have the key"
    snap = mirror.snapshot(writer)
    p = mirror.payload(snap, auth, ["acme.lora", "other.lora"], [])
    assert p["key"][0] == rec.id and p["owners"] == {("adapter", "acme.lora"): ("acme", rec.id),
                                                     ("adapter", "other.lora"): None}
    mirror.apply(replica, p)
    adm = _admit(replica, key)
    assert adm.denied is None and adm.principal.tenant == "acme"
    assert replica.keys.owner("adapter", "acme.lora") == ("acme", rec.id)  # visibility (sees_adapter) reads these
    assert replica.keys.owner("adapter", "other.lora") is None
    assert _admit(replica, key).denied.status == 429, "the writer's limits came along (rpm 1, per replica)"
    # anonymous requests: the cluster has tenant keys even where the replica holds none of them
    empty = _tenants(tmp_path / "e.sqlite")
    assert _admit(empty, None).denied is None
    mirror.apply(empty, mirror.payload(snap, None, [], []))
    assert _admit(empty, None).denied.status == 401

    # the replicas' counters reach the writer's usage
    adm.finish(3, 4)
    writer.merge_usage("replica-1", replica.usage_rows())
    writer.merge_usage("replica-2", replica.usage_rows())
    row = writer.usage(adm.principal)[0]
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (2, 6, 8)
    assert row["rejected"] == {"requests_per_minute": 2}

    # revoke on the writer: the next request's payload refuses the key on the replica
    writer.revoke(rec.id)
    mirror.apply(replica, mirror.payload(mirror.snapshot(writer), auth, [], []))
    assert _admit(replica, key).denied.status == 401


def test_prune_forgets_revoked_keys_without_a_request(tmp_path: Path) -> None:
    writer, replica = _tenants(tmp_path / "w.sqlite"), _tenants(tmp_path / "r.sqlite")
    rec, key = writer.keys.create("acme", "", ["infer"], [], True, {})
    keep, _ = writer.keys.create("acme", "", ["infer"], [], True, {})
    snap = mirror.snapshot(writer)
    mirror.apply(replica, mirror.payload(snap, f"Bearer {key}", [], []))
    mirror.apply(replica, {"key": (keep.id, snap["keys"][keep.id])})
    adm = _admit(replica, key)
    assert adm.denied is None and not adm.revoked()
    writer.revoke(rec.id)
    mirror.prune(replica, writer.keys.ids())  # what the metrics push answers
    assert adm.revoked(), "an open stream on the key is cut at its next chunk"
    assert replica.keys.ids() == {keep.id}
