"""AdapterStore: atomic writes, versions, recovery on open, and one winner for concurrent adds."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from adapters_store import AdapterError, AdapterStore, load_adapter


def _files(lora_dir: Path) -> dict[str, bytes]:
    return {n: (lora_dir / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}


def test_add_get_list_path_delete(lora_dir: Path, llama_base, tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    rec = store.add("alpha", lora_dir, llama_base, 64)
    assert (rec.name, rec.version, rec.peft_type, rec.rank) == ("alpha", 1, "LORA", 4)
    assert rec.target_modules == ["q_proj", "v_proj", "down_proj"]
    assert rec.size_bytes == sum(len(v) for v in _files(lora_dir).values())
    d = rec.to_dict()
    assert set(d) == {"id", "name", "version", "sha256", "peft_type", "rank", "target_modules", "size_bytes",
                      "created"}
    json.dumps(d)
    assert store.get("alpha") == rec
    assert store.path("alpha") == tmp_path / "store" / "adapters" / "alpha" / "v1"
    assert sorted(p.name for p in rec.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    store.add("beta", _files(lora_dir), llama_base, 64)
    store.add("index.sqlite", _files(lora_dir), llama_base, 64)  # names never collide with the index
    assert [r.name for r in store.list()] == ["alpha", "beta", "index.sqlite"]
    assert load_adapter(store.path("beta"), llama_base, max_rank=64).kind == "lora"

    store.delete("alpha")
    assert not (tmp_path / "store" / "adapters" / "alpha").exists()
    for call in (lambda: store.get("alpha"), lambda: store.delete("alpha"), lambda: store.path("alpha")):
        with pytest.raises(AdapterError, match="does not exist") as info:
            call()
        assert info.value.status == 404


def test_conflicts_and_versions(lora_dir: Path, llama_base, tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "s", keep_versions=2)
    store.add("a", lora_dir, llama_base, 64)
    with pytest.raises(AdapterError, match="already exists") as info:
        store.add("a", lora_dir, llama_base, 64)
    assert info.value.status == 409
    with pytest.raises(AdapterError, match="nothing to replace") as info:
        store.add("missing", lora_dir, llama_base, 64, replace=True)
    assert info.value.status == 404
    assert store.add("a", lora_dir, llama_base, 64, replace=True).version == 2
    assert store.path("a", 1).is_dir()  # the old version stays for requests still using it
    assert store.add("a", lora_dir, llama_base, 64, replace=True).version == 3
    assert store.get("a").version == 3 and len(store.list()) == 1
    with pytest.raises(AdapterError, match="version 1 does not exist"):
        store.path("a", 1)  # pruned: only keep_versions=2 older ones are kept
    assert not (tmp_path / "s" / "adapters" / "a" / "v1").exists()
    assert store.path("a", 2).is_dir()


def test_invalid_adapters_leave_nothing(lora_dir: Path, llama_base, tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "s")
    files = _files(lora_dir)
    bad_cfg = {**files, "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4, "bias": "all",
                                                           "target_modules": ["q_proj"]}).encode()}
    cases = [
        (bad_cfg, "bias 'all'"),
        ({**files, "adapter_model.safetensors": b"\xff" * 16}, "not a valid safetensors"),
        ({"adapter_config.json": files["adapter_config.json"]}, "adapter_model.safetensors is missing"),
        ({**files, "adapter_model.bin": b"x"}, "pickled"),
    ]
    for source, needle in cases:
        with pytest.raises(AdapterError, match=needle):
            store.add("x", source, llama_base, 64)
    with pytest.raises(AdapterError, match="rank 4 .* exceeds --max-rank 2"):
        store.add("x", files, llama_base, 2)
    with pytest.raises(AdapterError, match="name '../x' is invalid"):
        store.add("../x", files, llama_base, 64)
    small = AdapterStore(tmp_path / "small", max_adapter_bytes=100)
    with pytest.raises(AdapterError, match="over the limit of 100") as info:
        small.add("x", files, llama_base, 64)
    assert info.value.status == 413
    assert store.list() == []
    assert not any((tmp_path / "s" / ".tmp").iterdir())
    assert not (tmp_path / "s" / "adapters" / "x").exists()


def test_recovery_on_open(lora_dir: Path, llama_base, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "s"
    store = AdapterStore(root)
    store.add("good", lora_dir, llama_base, 64)
    store.add("tampered", lora_dir, llama_base, 64)
    store.add("vanished", lora_dir, llama_base, 64)
    store.close()
    # a crash mid-write: a half-written temp dir, and a renamed dir whose index row never committed
    (root / ".tmp" / "deadbeef").mkdir(parents=True)
    (root / ".tmp" / "deadbeef" / "adapter_model.safetensors").write_bytes(b"half")
    (root / "adapters" / "orphan" / "v1").mkdir(parents=True)
    (root / "adapters" / "orphan" / "v1" / "adapter_config.json").write_text("{}")
    # disk damage: one file altered, one adapter's files gone
    w = root / "adapters" / "tampered" / "v1" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + b"\x00")
    (root / "adapters" / "vanished" / "v1" / "adapter_config.json").unlink()

    with caplog.at_level(logging.WARNING, logger="adapters_store.store"):
        store = AdapterStore(root)
    assert [r.name for r in store.list()] == ["good"]
    assert not any((root / ".tmp").iterdir())
    assert not (root / "adapters" / "orphan").exists()
    assert not (root / "adapters" / "tampered").exists()
    assert len(list((root / ".quarantine").iterdir())) == 1
    assert "does not match the index" in caplog.text and "files missing" in caplog.text
    # the names are free again
    assert store.add("tampered", lora_dir, llama_base, 64).version == 1


def test_index_row_is_written_after_files(lora_dir: Path, llama_base, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """If the index write fails after the rename, the directory goes at once; if the process died there
    instead, reopening removes it: no half-adapter is ever listed."""
    root = tmp_path / "s"
    store = AdapterStore(root)

    monkeypatch.setattr(store, "_db", _FailingInsert(store._db))
    with pytest.raises(RuntimeError, match="power cut"):
        store.add("a", lora_dir, llama_base, 64)
    assert not (root / "adapters" / "a").exists() and not any((root / ".tmp").iterdir())
    monkeypatch.undo()
    assert store.list() == []
    # what a crash between rename and commit leaves: a version directory without a row
    shutil.copytree(lora_dir, root / "adapters" / "a" / "v1")
    store.close()
    store = AdapterStore(root)
    assert store.list() == [] and not (root / "adapters" / "a").exists()


class _FailingInsert:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, *args):
        if sql.startswith("INSERT"):
            raise RuntimeError("power cut")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._db, name)


def test_concurrent_adds_one_winner(lora_dir: Path, llama_base, tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "s")
    files = _files(lora_dir)
    barrier = threading.Barrier(6)
    results: list[object] = []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(store.add("same", files, llama_base, 64))
        except AdapterError as e:
            results.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wins = [r for r in results if not isinstance(r, AdapterError)]
    losses = [r for r in results if isinstance(r, AdapterError)]
    assert len(wins) == 1 and len(losses) == 5
    assert all(e.status == 409 for e in losses)
    assert [r.version for r in store.list()] == [1]
    assert not any((tmp_path / "s" / ".tmp").iterdir())
