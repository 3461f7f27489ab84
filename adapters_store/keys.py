"""Tenant API keys and resource ownership, in two tables of the store's `index.sqlite`.

A key is `psk_<id>_<secret>`: the id (12 hex digits) is stored in clear and finds the row; the secret is
stored only as a salted scrypt hash and compared in constant time (`hmac.compare_digest`). The full key is
returned once, by `create`, and never stored or logged.

`owners` maps a resource (kind, name) to the tenant and key that created it. A resource without a row
belongs to the bootstrap tenant `default`: that is the migration of a store made before tenants existed
(no column is added to the adapters, files, jobs or assistants tables, so their owners stay untouched).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TENANT = "default"
SCOPES = ("infer", "adapters:write", "finetune", "assistants:write", "admin")
LIMITS = ("requests_per_minute", "tokens_per_minute", "concurrent_requests", "storage_bytes")
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_KEY_RE = re.compile(r"^psk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS owners (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);
"""


@dataclass(frozen=True)
class KeyRecord:
    """A key as stored (no secret): who it is, what it may do, its quotas (None: unlimited)."""

    id: str
    tenant: str
    name: str
    scopes: tuple[str, ...]
    adapters: tuple[str, ...] = ()  # fnmatch patterns of the default tenant's adapters/assistants it may use
    allow_base: bool = True
    limits: dict[str, int | None] = field(default_factory=dict)
    created_at: int = 0

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "object": "api_key", "tenant": self.tenant, "name": self.name,
                "scopes": list(self.scopes), "adapters": list(self.adapters), "allow_base": self.allow_base,
                "limits": {k: self.limits.get(k) for k in LIMITS}, "created_at": self.created_at}


def parse_key(token: str) -> tuple[str, str] | None:
    """(id, secret) of a tenant key, or None when `token` does not have a tenant key's shape."""
    m = _KEY_RE.match(token)
    return (m.group(1), m.group(2)) if m else None


def _hash(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)


class KeyStore:
    """Keys and owners; thread-safe. Every lookup reads the row (a primary-key read), so several processes on
    one store agree on which keys exist; parsed records are cached."""

    def __init__(self, index_path: str | Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(index_path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        self._keys: dict[str, tuple[KeyRecord, bytes, bytes]] = {}
        for kid, tenant, name, salt, h, body, created in self._db.execute(
                "SELECT id, tenant, name, salt, hash, body, created_at FROM api_keys").fetchall():
            self._keys[kid] = (_record(kid, tenant, name, json.loads(body), created), salt, h)

    # ---- keys -----------------------------------------------------------------------------------
    def create(self, tenant: str, name: str, scopes: list[str], adapters: list[str], allow_base: bool,
               limits: dict[str, int | None]) -> tuple[KeyRecord, str]:
        """Store a new key; returns its record and the full key (the only time it exists outside the caller)."""
        kid = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        body = {"scopes": scopes, "adapters": adapters, "allow_base": allow_base, "limits": limits}
        created = int(time.time())
        h = _hash(secret, salt)
        with self._lock:
            self._db.execute("INSERT INTO api_keys (id, tenant, name, salt, hash, body, created_at) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", (kid, tenant, name, salt, h, json.dumps(body), created))
            rec = _record(kid, tenant, name, body, created)
            self._keys[kid] = (rec, salt, h)
        return rec, f"psk_{kid}_{secret}"

    def _row(self, kid: str) -> tuple[KeyRecord, bytes, bytes] | None:
        """The key's row, read from SQLite every time (another process, e.g. a Ray replica on the same store,
        may have created or revoked it); the parsed record is reused while the row is unchanged."""
        with self._lock:
            row = self._db.execute("SELECT tenant, name, salt, hash, body, created_at FROM api_keys WHERE id = ?",
                                   (kid,)).fetchone()
            if row is None:
                self._keys.pop(kid, None)
                return None
            tenant, name, salt, h, body, created = row
            found = self._keys.get(kid)
            if found is None or found[2] != h:
                found = self._keys[kid] = (_record(kid, tenant, name, json.loads(body), created), salt, h)
            return found

    def verify(self, kid: str, secret: str) -> KeyRecord | None:
        """The key's record when `secret` matches its hash (scrypt, constant-time compare), else None."""
        found = self._row(kid)
        if found is None:
            _hash(secret, b"\0" * 16)  # the same work for an unknown id as for a wrong secret
            return None
        rec, salt, h = found
        return rec if hmac.compare_digest(_hash(secret, salt), h) else None

    def get(self, kid: str) -> KeyRecord | None:
        """The key's record, None once revoked (here or by another process on the same store)."""
        found = self._row(kid)
        return found[0] if found is not None else None

    def list(self) -> list[KeyRecord]:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM api_keys").fetchall()]
        recs = [r for r in (self.get(k) for k in ids) if r is not None]
        return sorted(recs, key=lambda r: (r.created_at, r.id))

    def delete(self, kid: str) -> KeyRecord | None:
        """Revoke: the row and the memory entry go together; the next lookup fails."""
        found = self._row(kid)
        with self._lock:
            self._keys.pop(kid, None)
            self._db.execute("DELETE FROM api_keys WHERE id = ?", (kid,))
        return found[0] if found is not None else None

    # ---- replication (Ray Serve replicas mirror the writer's rows: server/tenants/mirror.py) ------------
    def rows(self) -> dict[str, dict[str, Any]]:
        """Every key's stored row (salt and scrypt hash, never a secret), to copy to another process's store."""
        with self._lock:
            got = self._db.execute("SELECT id, tenant, name, salt, hash, body, created_at FROM api_keys").fetchall()
        return {kid: {"tenant": t, "name": n, "salt": salt, "hash": h, "body": body, "created_at": c}
                for kid, t, n, salt, h, body, c in got}

    def mirror(self, kid: str, row: dict[str, Any] | None) -> None:
        """Make key `kid` the given row (from `rows()` of the writer's store); None: the key no longer exists."""
        if row is None:
            if self._row(kid) is not None:
                self.delete(kid)
            return
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO api_keys (id, tenant, name, salt, hash, body, created_at) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", (kid, row["tenant"], row["name"], row["salt"],
                                                              row["hash"], row["body"], row["created_at"]))

    def ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT id FROM api_keys").fetchall()}

    def owner_rows(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(kind, name) -> (tenant, key_id) of every owners row."""
        with self._lock:
            got = self._db.execute("SELECT kind, name, tenant, key_id FROM owners").fetchall()
        return {(k, n): (t, kid) for k, n, t, kid in got}

    def __len__(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM api_keys").fetchone()
        return n

    # ---- owners ---------------------------------------------------------------------------------
    def own(self, kind: str, name: str, tenant: str, key_id: str) -> None:
        """Record (or re-record, e.g. a replaced adapter) who owns `kind`/`name`."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO owners (kind, name, tenant, key_id) VALUES (?, ?, ?, ?)",
                             (kind, name, tenant, key_id))

    def owner(self, kind: str, name: str) -> tuple[str, str] | None:
        """(tenant, key_id) of `kind`/`name`; None: no row (the default tenant's, made before tenants)."""
        with self._lock:
            row = self._db.execute("SELECT tenant, key_id FROM owners WHERE kind = ? AND name = ?",
                                   (kind, name)).fetchone()
        return (row[0], row[1]) if row else None

    def owned_by(self, kind: str, key_id: str) -> list[str]:
        """Names of `kind` the key created."""
        with self._lock:
            rows = self._db.execute("SELECT name FROM owners WHERE kind = ? AND key_id = ?", (kind, key_id))
            return [r[0] for r in rows.fetchall()]

    def disown(self, kind: str, name: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM owners WHERE kind = ? AND name = ?", (kind, name))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _record(kid: str, tenant: str, name: str, body: dict[str, Any], created: int) -> KeyRecord:
    return KeyRecord(id=kid, tenant=tenant, name=name, scopes=tuple(body.get("scopes", ())),
                     adapters=tuple(body.get("adapters", ())), allow_base=bool(body.get("allow_base", True)),
                     limits=dict(body.get("limits") or {}), created_at=created)
