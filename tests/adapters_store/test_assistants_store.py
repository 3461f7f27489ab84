"""The assistants table in the store's SQLite index: writes are durable, names unique, reopen sees them."""

from __future__ import annotations

import sqlite3

import pytest

from adapters_store import AdapterStore
from adapters_store.assistants import AssistantExists, AssistantStore


def test_create_update_delete_persist_across_reopen(tmp_path) -> None:
    index = AdapterStore(tmp_path).index_path  # the adapter store's own index file
    s = AssistantStore(index)
    a = s.create("bot", "lora-a", instructions="Hi.", temperature=0.0, stop=["x"], metadata={"k": "v"})
    b = s.create("bot2", "lora-a")
    c = s.create("other", "base")
    assert a.id.startswith("asst_") and a.seq < b.seq < c.seq
    with pytest.raises(AssistantExists):
        s.create("bot", "base")
    renamed = s.update(a.id, name="bot-renamed", temperature=None)
    assert renamed.id == a.id and renamed.instructions == "Hi." and renamed.temperature is None
    assert s.get("bot") is None and s.get("bot-renamed") == renamed == s.get(a.id)
    with pytest.raises(AssistantExists):
        s.update("bot2", name="other")
    with pytest.raises(KeyError):
        s.update("nobody", temperature=1.0)
    assert [x.name for x in s.using("lora-a")] == ["bot-renamed", "bot2"]
    s.close()

    s = AssistantStore(index)  # a restart reads the rows back
    assert [x.name for x in s.list()] == ["bot-renamed", "bot2", "other"]
    assert s.get("bot-renamed") == renamed
    assert [x.name for x in s.delete_using("lora-a")] == ["bot-renamed", "bot2"]
    assert s.delete("other").name == "other"
    with pytest.raises(KeyError):
        s.delete("other")
    s.close()
    assert AssistantStore(index).list() == []
    # the adapters' table is untouched beside it
    tables = {r[0] for r in sqlite3.connect(index).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"adapters", "assistants"} <= tables


def test_a_second_writer_on_the_same_index_cannot_take_a_name(tmp_path) -> None:
    index = tmp_path / "index.sqlite"
    one, two = AssistantStore(index), AssistantStore(index)
    one.create("bot", "base")
    with pytest.raises(AssistantExists):  # not in two's memory, refused by the UNIQUE constraint
        two.create("bot", "lora")
    assert [a.name for a in AssistantStore(index).list()] == ["bot"]
