"""Fine-tuning jobs, their events and checkpoints: three tables in the adapter store's `index.sqlite`.

A job row holds the OpenAI job object as JSON (plus its status and creation time as columns for
listing); every state change is one UPDATE, so a crash leaves the job in its last committed state.
`recover()` (on open) fails what a dead process left running: nothing was training it any more.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from adapters_store.files import open_index

ACTIVE = ("validating_files", "queued", "running")
FINAL = ("succeeded", "failed", "cancelled")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS ft_jobs (
        id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, status TEXT NOT NULL, job TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ft_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL,
        created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL,
        data TEXT)""",
    "CREATE INDEX IF NOT EXISTS ft_events_job ON ft_events (job_id, seq)",
    """CREATE TABLE IF NOT EXISTS ft_checkpoints (
        id TEXT PRIMARY KEY, job_id TEXT NOT NULL, created_at INTEGER NOT NULL, step INTEGER NOT NULL,
        model TEXT NOT NULL, metrics TEXT NOT NULL)""",
)


class JobStore:
    """Thread-safe access to the job tables."""

    def __init__(self, root: str | Path) -> None:
        self._db = open_index(Path(root))
        self._lock = threading.Lock()
        for stmt in _SCHEMA:
            self._db.execute(stmt)

    # ---- jobs -----------------------------------------------------------------------------------
    def insert(self, job: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT INTO ft_jobs (id, created_at, status, job) VALUES (?, ?, ?, ?)",
                             (job["id"], job["created_at"], job["status"], json.dumps(job)))

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT job FROM ft_jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def update(self, job_id: str, expect: tuple[str, ...] | None = None, **fields: Any) -> dict[str, Any] | None:
        """Merge `fields` into the job object in one transaction; returns the new object. With `expect`, only
        while the job's status is one of those (else None: another thread moved it first)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (raw,) = self._db.execute("SELECT job FROM ft_jobs WHERE id = ?", (job_id,)).fetchone()
                old = json.loads(raw)
                if expect is not None and old["status"] not in expect:
                    self._db.execute("ROLLBACK")
                    return None
                job = {**old, **fields}
                self._db.execute("UPDATE ft_jobs SET status = ?, job = ? WHERE id = ?",
                                 (job["status"], json.dumps(job), job_id))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return job

    def list(self, after: str | None = None, limit: int = 20) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; `after` a job id: the ones created before it. Returns (page, has_more)."""
        with self._lock:
            rows = self._db.execute("SELECT id, created_at, job FROM ft_jobs ORDER BY created_at DESC, rowid DESC"
                                    ).fetchall()
        ids = [r[0] for r in rows]
        start = ids.index(after) + 1 if after in ids else 0
        page = [json.loads(r[2]) for r in rows[start:start + limit]]
        return page, start + limit < len(rows)

    def with_status(self, *statuses: str) -> list[dict[str, Any]]:
        """Oldest first (the queue order)."""
        marks = ", ".join("?" * len(statuses))
        with self._lock:
            rows = self._db.execute(f"SELECT job FROM ft_jobs WHERE status IN ({marks}) ORDER BY created_at, rowid",
                                    statuses).fetchall()
        return [json.loads(r[0]) for r in rows]

    # ---- events ---------------------------------------------------------------------------------
    def event(self, job_id: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None,
              kind: str = "message") -> dict[str, Any]:
        ev = {"object": "fine_tuning.job.event", "id": "ftevent-" + uuid.uuid4().hex[:24],
              "created_at": int(time.time()), "level": level, "message": message, "data": data or {}, "type": kind}
        with self._lock:
            self._db.execute("INSERT INTO ft_events (id, job_id, created_at, level, message, type, data) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (ev["id"], job_id, ev["created_at"], level, message, kind, json.dumps(ev["data"])))
        return ev

    def events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict[str, Any]], bool]:
        """Newest first, as OpenAI lists them; `after` an event id: the older ones."""
        with self._lock:
            bound = None
            if after is not None:
                row = self._db.execute("SELECT seq FROM ft_events WHERE id = ? AND job_id = ?",
                                       (after, job_id)).fetchone()
                bound = row[0] if row else None
            sql = "SELECT id, created_at, level, message, type, data FROM ft_events WHERE job_id = ?"
            args: tuple[Any, ...] = (job_id,)
            if bound is not None:
                sql, args = sql + " AND seq < ?", (job_id, bound)
            rows = self._db.execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit + 1)).fetchall()
        out = [{"object": "fine_tuning.job.event", "id": r[0], "created_at": r[1], "level": r[2], "message": r[3],
                "type": r[4], "data": json.loads(r[5] or "{}")} for r in rows[:limit]]
        return out, len(rows) > limit

    # ---- checkpoints ----------------------------------------------------------------------------
    def add_checkpoint(self, job_id: str, step: int, model: str, metrics: dict[str, Any]) -> dict[str, Any]:
        ck = {"object": "fine_tuning.job.checkpoint", "id": "ftckpt-" + uuid.uuid4().hex[:24],
              "created_at": int(time.time()), "fine_tuned_model_checkpoint": model, "step_number": step,
              "metrics": metrics, "fine_tuning_job_id": job_id}
        with self._lock:
            self._db.execute("INSERT INTO ft_checkpoints (id, job_id, created_at, step, model, metrics) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             (ck["id"], job_id, ck["created_at"], step, model, json.dumps(metrics)))
        return ck

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """Newest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, created_at, step, model, metrics FROM ft_checkpoints "
                                    "WHERE job_id = ? ORDER BY step DESC", (job_id,)).fetchall()
        return [{"object": "fine_tuning.job.checkpoint", "id": r[0], "created_at": r[1],
                 "fine_tuned_model_checkpoint": r[3], "step_number": r[2], "metrics": json.loads(r[4]),
                 "fine_tuning_job_id": job_id} for r in rows]

    def drop_checkpoints_without(self, exists: Any) -> int:
        """Remove checkpoint rows whose adapter `exists(name)` denies (the store dropped it); how many."""
        with self._lock:
            rows = self._db.execute("SELECT id, model FROM ft_checkpoints").fetchall()
            gone = [r[0] for r in rows if not exists(r[1])]
            for cid in gone:
                self._db.execute("DELETE FROM ft_checkpoints WHERE id = ?", (cid,))
        return len(gone)

    def close(self) -> None:
        with self._lock:
            self._db.close()

