"""Tenant keys and owners on Ray Serve replicas (server/ray): the writer's rows, mirrored before a request.

The writer's store holds the keys and the owners (`adapters_store/keys.py`); a replica has a private store.
The ingress keeps a copy of both tables (`snapshot`, refreshed before any write through it returns, revokes
included) and every request it forwards to a replica carries `payload`: the row of the key in its
Authorization header (None: no such key, or revoked), the owners of the adapters and assistant it names,
and whether the cluster has any tenant key. The replica `apply`s that before the request runs, so its own
`Tenants` decides exactly as the writer would: after a revoke returns, no replica admits the key. A stream
already open on a replica learns of a revocation from `prune` (the writer's key ids, every metrics push).

Quotas stay per process: each replica counts a key's requests_per_minute, tokens_per_minute and
concurrent_requests itself (N replicas allow up to N times them); storage_bytes is checked by the writer,
where every upload lands, so it holds cluster-wide. Usage counters travel to the writer with the metrics
push (`usage_rows` there, `merge_usage` here), so `/v1/usage` through the ingress sums every replica.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from adapters_store.keys import parse_key

_FT_SUFFIX = re.compile(r"^ft:.*:([0-9a-f]{8})(?::ckpt-step-\d+)?$")  # a fine-tuned model: its job's owner


def snapshot(tenants: Any) -> dict[str, Any]:
    """The writer's key rows (salted scrypt hashes, never a key) and owners rows."""
    if tenants is None:
        return {"keys": {}, "owners": {}}
    return {"keys": tenants.keys.rows(), "owners": tenants.keys.owner_rows()}


def key_id(authorization: str | None) -> str | None:
    """The tenant key id in an `Authorization: Bearer psk_<id>_...` header value."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    parsed = parse_key(token.strip())
    return parsed[0] if parsed else None


def payload(snap: dict[str, Any], authorization: str | None, adapters: Iterable[str],
            assistant_ids: Iterable[str]) -> dict[str, Any]:
    """What a replica must mirror before it serves one request (see the module docstring)."""
    keys, owners = snap["keys"], snap["owners"]
    kid = key_id(authorization)
    wanted: list[tuple[str, str]] = []
    for name in adapters:
        wanted.append(("adapter", name))
        m = _FT_SUFFIX.match(name)
        if m is not None:
            wanted.append(("jobsfx", m.group(1)))
    wanted += [("assistant", a) for a in assistant_ids]
    return {"has_keys": bool(keys), "key": None if kid is None else (kid, keys.get(kid)),
            "owners": {w: owners.get(w) for w in wanted}}


def apply(tenants: Any, p: dict[str, Any] | None) -> None:
    """Make this process's keys and owners match `payload` for the request about to run."""
    if tenants is None or not p:
        return
    tenants.cluster_has_keys = bool(p.get("has_keys"))
    if p.get("key") is not None:
        kid, row = p["key"]
        if row is None:
            if tenants.keys.get(kid) is not None:
                tenants.revoke(kid)  # revoked on the writer: this process forgets it too (and its verified hash)
        else:
            tenants.keys.mirror(kid, row)
    for (kind, name), owner in (p.get("owners") or {}).items():
        have = tenants.keys.owner(kind, name)
        if owner is None and have is not None:
            tenants.keys.disown(kind, name)
        elif owner is not None and have != tuple(owner):
            tenants.keys.own(kind, name, owner[0], owner[1])


def prune(tenants: Any, live: Iterable[str]) -> None:
    """Forget every mirrored key the writer no longer has (an open stream on it is cut at its next chunk)."""
    if tenants is None:
        return
    for kid in tenants.keys.ids() - set(live):
        tenants.revoke(kid)
