"""Assistants: a name (a model id) bound to an adapter or the base model, instructions and sampling defaults.

Rows live in the adapter store's SQLite index (`index.sqlite`, table `assistants`), through a connection of
their own (WAL: the adapter store's writer and this one do not block each other's readers). Every write is
one committed statement or transaction, then mirrored into an in-memory map, so a request resolves an
assistant without touching SQLite and a crash never leaves half an assistant. This module only persists;
what a name may be, and which adapters exist, is checked by the API (server/api/assistants.py).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS assistants (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL
)
"""
# what `body` holds (JSON): everything but the identity columns
BODY_FIELDS = ("description", "instructions", "temperature", "top_p", "max_tokens", "stop", "metadata")


@dataclass(frozen=True)
class Assistant:
    id: str  # "asst_<hex>", stable across renames
    name: str  # the model id clients send
    model: str  # an adapter name or the base model's id
    created_at: int  # unix seconds
    seq: int = 0  # creation order, the list cursor's order
    description: str | None = None
    instructions: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's assistant object (plus the sampling defaults peftserve applies)."""
        d = asdict(self)
        d.pop("seq")
        return {"id": d.pop("id"), "object": "assistant", **d}


class AssistantExists(ValueError):
    """The name is taken by another assistant."""


class AssistantStore:
    """Assistants persisted in SQLite, mirrored in memory; every method is thread-safe."""

    def __init__(self, index_path: str | Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(index_path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.execute(_SCHEMA)
        rows = self._db.execute("SELECT seq, id, name, model, body, created_at FROM assistants").fetchall()
        self._by_name: dict[str, Assistant] = {}
        for seq, aid, name, model, body, created in rows:
            self._by_name[name] = Assistant(id=aid, name=name, model=model, created_at=created, seq=seq,
                                            **json.loads(body))

    # ---- reads (memory) --------------------------------------------------------------------------
    def get(self, key: str) -> Assistant | None:
        """The assistant named `key`, or whose id is `key`."""
        with self._lock:
            a = self._by_name.get(key)
            if a is None and key.startswith("asst_"):
                a = next((x for x in self._by_name.values() if x.id == key), None)
            return a

    def list(self) -> list[Assistant]:
        """Every assistant, oldest first."""
        with self._lock:
            return sorted(self._by_name.values(), key=lambda a: a.seq)

    def using(self, model: str) -> list[Assistant]:
        """The assistants whose model is `model`, oldest first."""
        return [a for a in self.list() if a.model == model]

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._by_name

    # ---- writes (SQLite first, then memory) ------------------------------------------------------
    def create(self, name: str, model: str, **body: Any) -> Assistant:
        """Insert a new assistant; AssistantExists if the name is taken."""
        a = Assistant(id=f"asst_{uuid.uuid4().hex[:24]}", name=name, model=model, created_at=int(time.time()),
                      **_body(body))
        with self._lock:
            if name in self._by_name:
                raise AssistantExists(name)
            try:
                cur = self._db.execute(
                    "INSERT INTO assistants (id, name, model, body, created_at) VALUES (?, ?, ?, ?, ?)",
                    (a.id, a.name, a.model, _dump(a), a.created_at))
            except sqlite3.IntegrityError:  # another process holding the same index
                raise AssistantExists(name) from None
            a = replace(a, seq=cur.lastrowid or 0)
            self._by_name[name] = a
        return a

    def update(self, key: str, **changes: Any) -> Assistant:
        """Change some fields (`name`, `model` or body fields) of the assistant `key`; KeyError if absent,
        AssistantExists if a rename hits another assistant's name."""
        with self._lock:
            old = self._by_name.get(key) or next((x for x in self._by_name.values() if x.id == key), None)
            if old is None:
                raise KeyError(key)
            new = replace(old, **changes)
            if new.name != old.name and new.name in self._by_name:
                raise AssistantExists(new.name)
            try:
                self._db.execute("UPDATE assistants SET name = ?, model = ?, body = ? WHERE id = ?",
                                 (new.name, new.model, _dump(new), new.id))
            except sqlite3.IntegrityError:
                raise AssistantExists(new.name) from None
            del self._by_name[old.name]
            self._by_name[new.name] = new
        return new

    def mirror(self, a: Assistant) -> None:
        """Hold exactly `a` (id, name, seq and body): a Ray replica's copy of the writer's row. Replaces any
        row with its id or its name, in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM assistants WHERE id = ? OR name = ?", (a.id, a.name))
                self._db.execute(
                    "INSERT INTO assistants (seq, id, name, model, body, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (a.seq or None, a.id, a.name, a.model, _dump(a), a.created_at))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            for k in [k for k, v in self._by_name.items() if k == a.name or v.id == a.id]:
                del self._by_name[k]
            self._by_name[a.name] = a

    def delete(self, key: str) -> Assistant:
        """Remove the assistant `key` (name or id); KeyError if absent."""
        with self._lock:
            a = self._by_name.get(key) or next((x for x in self._by_name.values() if x.id == key), None)
            if a is None:
                raise KeyError(key)
            self._db.execute("DELETE FROM assistants WHERE id = ?", (a.id,))
            del self._by_name[a.name]
        return a

    def delete_using(self, model: str) -> list[Assistant]:
        """Remove every assistant whose model is `model` (one transaction); the removed ones."""
        with self._lock:
            gone = [a for a in self._by_name.values() if a.model == model]
            self._db.execute("DELETE FROM assistants WHERE model = ?", (model,))
            for a in gone:
                del self._by_name[a.name]
        return sorted(gone, key=lambda a: a.seq)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _body(body: dict[str, Any]) -> dict[str, Any]:
    unknown = set(body) - set(BODY_FIELDS)
    if unknown:
        raise TypeError(f"unknown assistant fields: {sorted(unknown)}")
    out = dict(body)
    out["metadata"] = dict(out.get("metadata") or {})
    return out


def _dump(a: Assistant) -> str:
    return json.dumps({k: getattr(a, k) for k in BODY_FIELDS})
