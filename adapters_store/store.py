"""The on-disk adapter store: `root/adapters/<name>/v<version>/` directories plus an SQLite index.

Write order makes a crash harmless: files go to `root/.tmp/<random>/` and are fsynced, the directory
is renamed into place, and only then is the index row committed. On open, temp directories,
version directories without a row and rows without files are removed; a directory whose sha256 no
longer matches its row is moved to `root/.quarantine/` and dropped from the index.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_store.base_info import BaseModelInfo
from adapters_store.errors import AdapterError
from adapters_store.loader import CONFIG_NAME, KNOWN_FILES, WEIGHTS_NAME, WEIGHTS_NAMES, load_adapter
from adapters_store.safetensors_check import refuse_pickles
from adapters_store.spec import validate_name
from server.families import Adapter

log = logging.getLogger(__name__)

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)  # a peft adapter; AdapterHub's carry adapter.safetensors
_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    peft_type TEXT NOT NULL,
    rank INTEGER,
    target_modules TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created REAL NOT NULL,
    path TEXT NOT NULL,
    UNIQUE (name, version)
)
"""
_COLUMNS = "id, name, version, sha256, peft_type, rank, target_modules, size_bytes, created, path"


@dataclass(frozen=True)
class AdapterRecord:
    id: int  # index row id, unique across versions
    name: str
    version: int
    sha256: str
    peft_type: str
    rank: int | None  # LoRA: largest module rank; None for prompt methods
    target_modules: list[str]
    size_bytes: int
    created: float  # unix time
    path: Path

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view for the API (no filesystem path)."""
        return {
            "id": self.id, "name": self.name, "version": self.version, "sha256": self.sha256,
            "peft_type": self.peft_type, "rank": self.rank, "target_modules": list(self.target_modules),
            "size_bytes": self.size_bytes, "created": self.created,
        }


def content_sha256(directory: Path) -> tuple[str, int]:
    """sha256 over the two adapter files (name, length, bytes) and their total size."""
    h, total = hashlib.sha256(), 0
    for name in KNOWN_FILES:
        if not (directory / name).is_file():
            continue
        data = (directory / name).read_bytes()
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
        total += len(data)
    return h.hexdigest(), total


def _write_durably(path: Path, data: bytes) -> None:
    """Create `path` with `data` and fsync it (os-level calls: a short write or ENOSPC raises OSError)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    """Adapters on disk, indexed; every method is thread-safe."""

    def __init__(self, root: str | Path, *, keep_versions: int = 2, max_adapter_bytes: int = 4 << 30) -> None:
        self.root = Path(root)
        self.keep_versions = max(1, keep_versions)
        self.max_adapter_bytes = max_adapter_bytes
        self._dirs = self.root / "adapters"  # apart from index.sqlite*, whatever the adapter names
        self._tmp = self.root / ".tmp"
        self._quarantine = self.root / ".quarantine"
        self._lock = threading.Lock()
        self._dirs.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        with self._lock:
            self._recover()

    @property
    def index_path(self) -> Path:
        """The SQLite index; other tables (assistants) live beside the adapters' in it."""
        return self.root / "index.sqlite"

    # ------------------------------------------------------------------------------------------ reads

    def get(self, name: str) -> AdapterRecord:
        """Latest version of `name`; AdapterError 404 if absent."""
        with self._lock:
            return self._get(name, None)

    def list(self) -> list[AdapterRecord]:
        """Latest version of every adapter, by name."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM adapters a WHERE version = "
                "(SELECT MAX(version) FROM adapters b WHERE b.name = a.name) ORDER BY name"
            ).fetchall()
        return [self._record(r) for r in rows]

    def record(self, name: str, version: int | None = None) -> AdapterRecord:
        """The index row of `name` at `version` (latest when None); AdapterError 404 if absent."""
        with self._lock:
            return self._get(name, version)

    def path(self, name: str, version: int | None = None) -> Path:
        """Directory holding `name` at `version` (latest when None)."""
        with self._lock:
            return self._get(name, version).path

    # ------------------------------------------------------------------------------------------ writes

    def add(
        self,
        name: str,
        source: Mapping[str, bytes] | str | Path,
        base: BaseModelInfo,
        max_rank: int,
        replace: bool = False,
    ) -> AdapterRecord:
        """Validate and store an adapter from file contents or a directory.

        A new name gets version 1; `replace=True` adds the next version of an existing name. Name taken
        without replace → 409; replace of a missing name → 404; invalid adapter → the loader's error.
        """
        validate_name(name)
        files = self._read_source(source)
        self._tmp.mkdir(exist_ok=True)
        tmp = self._tmp / uuid.uuid4().hex
        try:
            tmp.mkdir()
            for fname, data in files.items():
                _write_durably(tmp / fname, data)
            _fsync_dir(tmp)
            loaded = load_adapter(tmp, base, max_rank=max_rank)  # full validation before anything is visible
            sha, size = content_sha256(tmp)
            with self._lock:
                return self._commit(name, tmp, loaded, sha, size, replace)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def delete(self, name: str) -> None:
        """Remove every version of `name`; AdapterError 404 if absent."""
        with self._lock:
            self._get(name, None)
            self._db.execute("DELETE FROM adapters WHERE name = ?", (name,))
            # the rows are gone first: a crash now leaves orphan directories, which open() removes
            shutil.rmtree(self._dirs / name, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------------ internals

    def _read_source(self, source: Mapping[str, bytes] | str | Path) -> dict[str, bytes]:
        if isinstance(source, str | Path):
            src = Path(source)
            if not src.is_dir():
                raise AdapterError(f"adapter directory {str(src)!r} does not exist", field="source", status=404)
            refuse_pickles(p.name for p in src.iterdir())
            source = {n: (src / n).read_bytes() for n in KNOWN_FILES if (src / n).is_file()}
        else:
            refuse_pickles(source)
        missing = [n for n in ADAPTER_FILES if n not in source]
        if CONFIG_NAME in source and any(w in source for w in WEIGHTS_NAMES):
            missing = []
        if missing:
            raise AdapterError(
                f"{missing[0]} is missing; an adapter needs {' and '.join(ADAPTER_FILES)} "
                "(or, saved by AdapterHub's save_adapter, adapter_config.json and adapter.safetensors)",
                field=missing[0],
            )
        kept = [n for n in KNOWN_FILES if n in source]
        total = sum(len(source[n]) for n in kept)
        if total > self.max_adapter_bytes:
            raise AdapterError(
                f"adapter is {total} bytes, over the limit of {self.max_adapter_bytes}", field="files", status=413
            )
        return {n: bytes(source[n]) for n in kept}

    def _commit(
        self, name: str, tmp: Path, loaded: Adapter, sha: str, size: int, replace: bool
    ) -> AdapterRecord:
        (latest,) = self._db.execute("SELECT MAX(version) FROM adapters WHERE name = ?", (name,)).fetchone()
        if latest is not None and not replace:
            raise AdapterError(
                f"adapter {name!r} already exists (version {latest}); pass replace to upload a new version",
                field="name", status=409,
            )
        if latest is None and replace:
            raise AdapterError(f"adapter {name!r} does not exist, nothing to replace", field="name", status=404)
        version = (latest or 0) + 1
        rel = Path("adapters") / name / f"v{version}"
        final = self.root / rel
        final.parent.mkdir(exist_ok=True)
        if final.exists():  # an orphan of a crash between rename and commit
            shutil.rmtree(final)
        spec = loaded.spec
        # Any failure from here (rename, fsync, SQLite) removes the version directory again and rolls the
        # index back, so a failed add leaves the store exactly as it was.
        try:
            os.rename(tmp, final)
            _fsync_dir(final.parent)
            _fsync_dir(self._dirs)
            created = time.time()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT INTO adapters (name, version, sha256, peft_type, rank, target_modules, size_bytes, "
                    "created, path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, version, sha, spec.peft_type, spec.rank, json.dumps(spec.module_names), size,
                     created, str(rel)),
                )
                pruned = self._prune_rows(name, version)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.IntegrityError:  # another process won the same version
            shutil.rmtree(final, ignore_errors=True)
            raise AdapterError(f"adapter {name!r} version {version} already exists", field="name", status=409) from None
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            with contextlib.suppress(OSError):
                final.parent.rmdir()  # only when empty: the name had no other version
            raise
        for rel_old in pruned:  # rows are gone: a crash here leaves orphans, which open() removes
            shutil.rmtree(self.root / rel_old, ignore_errors=True)
        # what was written, not a re-read: a concurrent add may already have pruned this version
        return AdapterRecord(id=cur.lastrowid, name=name, version=version, sha256=sha, peft_type=spec.peft_type,
                             rank=spec.rank, target_modules=list(spec.module_names), size_bytes=size,
                             created=created, path=final)

    def _prune_rows(self, name: str, latest: int) -> list[str]:
        """Drop the index rows of versions older than the newest `keep_versions`; their paths to remove."""
        # old versions stay a while for requests still running on them, then go
        cutoff = latest - self.keep_versions
        old = self._db.execute(
            "SELECT path FROM adapters WHERE name = ? AND version <= ?", (name, cutoff)
        ).fetchall()
        self._db.execute("DELETE FROM adapters WHERE name = ? AND version <= ?", (name, cutoff))
        return [rel for (rel,) in old]

    def _get(self, name: str, version: int | None) -> AdapterRecord:
        if version is None:
            sql, args = "name = ? ORDER BY version DESC LIMIT 1", (name,)
        else:
            sql, args = "name = ? AND version = ?", (name, version)
        try:
            return self._get_row(sql, args)
        except KeyError:
            what = f"adapter {name!r}" + ("" if version is None else f" version {version}")
            raise AdapterError(f"{what} does not exist", field="name", status=404) from None

    def _get_row(self, where: str, args: tuple[Any, ...]) -> AdapterRecord:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM adapters WHERE {where}", args).fetchone()
        if row is None:
            raise KeyError(where)
        return self._record(row)

    def _record(self, row: tuple[Any, ...]) -> AdapterRecord:
        rid, name, version, sha, peft_type, rank, targets, size, created, rel = row
        return AdapterRecord(
            id=rid, name=name, version=version, sha256=sha, peft_type=peft_type, rank=rank,
            target_modules=json.loads(targets), size_bytes=size, created=created, path=self.root / rel,
        )

    def _recover(self) -> None:
        """Undo what an interrupted write or a damaged disk left behind."""
        if self._tmp.exists():
            for leftover in self._tmp.iterdir():
                log.warning("removing %s, left by an interrupted adapter write", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        known: set[str] = set()
        for row in self._db.execute(f"SELECT {_COLUMNS} FROM adapters").fetchall():
            rec = self._record(row)
            if not all((rec.path / n).is_file() for n in ADAPTER_FILES):
                log.warning("adapter %s v%d: files missing, dropping it from the index", rec.name, rec.version)
                self._db.execute("DELETE FROM adapters WHERE id = ?", (rec.id,))
                continue
            sha, _ = content_sha256(rec.path)
            if sha != rec.sha256:
                self._quarantine.mkdir(exist_ok=True)
                dest = self._quarantine / f"{rec.name}-v{rec.version}-{uuid.uuid4().hex[:8]}"
                log.warning(
                    "adapter %s v%d: sha256 %s does not match the index (%s); moved to %s",
                    rec.name, rec.version, sha, rec.sha256, dest,
                )
                os.rename(rec.path, dest)
                self._db.execute("DELETE FROM adapters WHERE id = ?", (rec.id,))
                continue
            known.add(rec.path)
        for name_dir in self._dirs.iterdir():
            if not name_dir.is_dir():
                name_dir.unlink()
                continue
            for vdir in name_dir.iterdir():
                if vdir not in known:
                    log.warning("removing %s: no index row (interrupted write or delete)", vdir)
                    if vdir.is_dir():
                        shutil.rmtree(vdir, ignore_errors=True)
                    else:
                        vdir.unlink()
            if not any(name_dir.iterdir()):
                name_dir.rmdir()
