"""Uploaded files (OpenAI's Files API, purpose fine-tune) beside the adapter store.

`root/files/<id>` holds the bytes; the `files` table in the store's `index.sqlite` indexes them. Same
write order as the adapter store: write to `root/files/.tmp/`, fsync, rename into place, then commit the
row. On open, temp files and files without a row are removed, rows without a file are dropped.
The content is validated by the caller (`server.train.dataset`) before `add`; this module only stores.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_store.errors import AdapterError
from adapters_store.store import _fsync_dir, _write_durably

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    lines INTEGER NOT NULL,
    format TEXT NOT NULL,
    created_at INTEGER NOT NULL
)
"""
_COLUMNS = "id, filename, purpose, bytes, lines, format, created_at"


@dataclass(frozen=True)
class FileRecord:
    id: str
    filename: str
    purpose: str
    bytes: int
    lines: int  # samples (non-blank lines)
    format: str  # "chat" or "prompt_completion"
    created_at: int

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's file object (plus our `lines` and `format`)."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None, "lines": self.lines, "format": self.format}


def open_index(root: Path) -> sqlite3.Connection:
    """A connection of our own to the store's index (WAL: the adapter store's connection works beside it)."""
    db = sqlite3.connect(root / "index.sqlite", check_same_thread=False, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


class FileStore:
    """Uploaded training files; thread-safe."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._dir = self.root / "files"
        self._tmp = self._dir / ".tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = open_index(self.root)
        self._db.execute(_SCHEMA)
        with self._lock:
            self._recover()

    def add(self, data: bytes, *, filename: str, purpose: str, lines: int, fmt: str) -> FileRecord:
        """Store `data` atomically and index it; the returned record is visible only once both are done."""
        fid = "file-" + uuid.uuid4().hex[:24]
        tmp = self._tmp / fid
        final = self._dir / fid
        _write_durably(tmp, data)
        rec = FileRecord(fid, filename, purpose, len(data), lines, fmt, int(time.time()))
        try:
            os.rename(tmp, final)
            _fsync_dir(self._dir)
            with self._lock:
                self._db.execute(f"INSERT INTO files ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (rec.id, rec.filename, rec.purpose, rec.bytes, rec.lines, rec.format,
                                  rec.created_at))
        except BaseException:
            for p in (tmp, final):
                p.unlink(missing_ok=True)
            raise
        return rec

    def get(self, fid: str) -> FileRecord:
        """The file's record; AdapterError 404 naming the id when there is none."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE id = ?", (fid,)).fetchone()
        if row is None:
            raise AdapterError(f"file {fid!r} does not exist; GET /v1/files lists the uploaded files",
                               field="file_id", status=404)
        return FileRecord(*row)

    def content(self, fid: str) -> bytes:
        self.get(fid)
        return (self._dir / fid).read_bytes()

    def list(self, purpose: str | None = None) -> list[FileRecord]:
        with self._lock:
            if purpose is None:
                rows = self._db.execute(f"SELECT {_COLUMNS} FROM files ORDER BY created_at, id").fetchall()
            else:
                rows = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE purpose = ? ORDER BY created_at, id",
                                        (purpose,)).fetchall()
        return [FileRecord(*r) for r in rows]

    def delete(self, fid: str) -> None:
        """Remove the row, then the file (a crash in between leaves an orphan file, removed on open)."""
        self.get(fid)
        with self._lock:
            self._db.execute("DELETE FROM files WHERE id = ?", (fid,))
        (self._dir / fid).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _recover(self) -> None:
        for leftover in self._tmp.iterdir():
            log.warning("removing %s, left by an interrupted file upload", leftover)
            leftover.unlink(missing_ok=True)
        known = set()
        for (fid,) in self._db.execute("SELECT id FROM files").fetchall():
            if not (self._dir / fid).is_file():
                log.warning("file %s: content missing, dropping it from the index", fid)
                self._db.execute("DELETE FROM files WHERE id = ?", (fid,))
            else:
                known.add(fid)
        for p in self._dir.iterdir():
            if p.is_file() and p.name not in known:
                log.warning("removing %s: no index row (interrupted upload or delete)", p)
                p.unlink(missing_ok=True)
