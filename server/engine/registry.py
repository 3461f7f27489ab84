"""What adapters the server can serve, at which version, and which are loaded in CPU memory.

Tiers: disk (the store, or a local dir given with --adapter) → CPU cache (LRU of loaded tensors,
--max-cpu-adapters) → device slots (the engine's SlotManager). A request resolves its adapter name
to a handle once, at admission; the handle keeps the tensors alive, so a replaced or deleted adapter
still serves the requests that started on it. Loading from disk runs in a worker thread, off the
event loop and off the engine's step loop.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.families import Adapter, family_for

_uids = itertools.count()
Key = tuple[str, int, int]  # (name, version, registration id): a re-uploaded name never reuses a key


@dataclass(eq=False)
class AdapterHandle:
    """A request's reference to one adapter version (its CPU form stays alive while held)."""

    name: str
    version: int
    adapter: Adapter  # the family's CPU form
    uid: int = -1
    held: bool = False  # a reference taken by acquire() and not yet released

    @property
    def key(self) -> Key:
        return (self.name, self.version, self.uid)


@dataclass(frozen=True)
class AdapterEntry:
    """The catalogue's view of one adapter name: its current version and where its files are."""

    name: str
    version: int
    kind: str  # the family's name, for listings
    path: Path | None  # None: exists only in memory (tests, benchmarks)
    stored: bool  # True: lives in the store (upload); False: a local dir given at start-up
    record: dict[str, Any] | None = None  # the store's record, for listings
    uid: int = field(default_factory=lambda: next(_uids))
    # A derived adapter (a per-request composition, server/compose): the source versions it was computed
    # from, and what to list. It lives only in the CPU tier: evicted from it (or a source replaced or
    # removed), it leaves the catalogue and is recomputed on next use.
    sources: tuple[Key, ...] = ()
    derived: dict[str, Any] | None = None

    @property
    def key(self) -> Key:
        return (self.name, self.version, self.uid)


class AdapterRegistry:
    def __init__(self, loader: Callable[[Path], Adapter] | None = None, max_cpu: int = 64) -> None:
        self._loader = loader
        self.max_cpu = max_cpu
        self._lock = threading.Lock()
        self._entries: dict[str, AdapterEntry] = {}
        self._cpu: OrderedDict[Key, Adapter] = OrderedDict()
        self._inflight: Counter[Key] = Counter()
        self._loading: dict[Key, asyncio.Future] = {}
        self.on_stale: Callable[[Key], None] | None = None  # a registration no request will use again
        self.cpu_loads = 0
        self.cpu_evictions = 0

    # ---- catalogue --------------------------------------------------------------------------------
    def put(self, name: str, loaded: Adapter, version: int = 1, path: str | Path | None = None) -> AdapterHandle:
        """Register an adapter whose tensors are already loaded (start-up --adapter, tests, benchmarks)."""
        entry = AdapterEntry(name, version, loaded.kind, Path(path) if path else None, stored=False)
        self._set(entry)
        with self._lock:
            dropped = self._cache(entry.key, loaded)
        self._retire_all(dropped)
        return AdapterHandle(name, version, loaded, entry.uid)

    def put_derived(self, name: str, loaded: Adapter, sources: tuple[Key, ...], info: dict[str, Any]
                    ) -> AdapterHandle:
        """Catalogue a derived adapter computed from `sources` and return it with a reference taken. If a
        source was replaced or removed meanwhile, it is not catalogued: the request that computed it runs on
        it (it started on those versions) and it is dropped when released."""
        entry = AdapterEntry(name, 1, loaded.kind, None, stored=False, sources=sources, derived=info)
        dropped: list[Key] = []
        with self._lock:
            current = all(self._entries.get(k[0]) is not None and self._entries[k[0]].key == k for k in sources)
            if current and name not in self._entries:
                self._entries[name] = entry
                dropped = self._cache(entry.key, loaded)
            self._inflight[entry.key] += 1
        self._retire_all(dropped)
        return AdapterHandle(name, 1, loaded, entry.uid, held=True)

    def register(self, name: str, version: int, path: str | Path, record: dict[str, Any]) -> None:
        """Register a stored adapter version (on disk; loaded on first use). `record` is the store's row."""
        family = family_for(record.get("peft_type"))
        kind = family.name if family is not None else str(record.get("peft_type"))
        self._set(AdapterEntry(name, version, kind, Path(path), stored=True, record=record))

    def _set(self, entry: AdapterEntry) -> None:
        with self._lock:
            old = self._entries.get(entry.name)
            self._entries[entry.name] = entry
        if old is not None:
            self._retire(old.key)

    def remove(self, name: str) -> AdapterEntry | None:
        """Take a name out of service: new requests get 404; requests in flight go on."""
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is not None:
            self._retire(entry.key)
        return entry

    def entry(self, name: str) -> AdapterEntry | None:
        with self._lock:
            return self._entries.get(name)

    def names(self) -> list[str]:
        """Every adapter name but derived ones (per-request compositions: `derived_names`)."""
        with self._lock:
            return sorted(n for n, e in self._entries.items() if e.derived is None)

    def derived_names(self) -> list[str]:
        with self._lock:
            return sorted(n for n, e in self._entries.items() if e.derived is not None)

    def __contains__(self, name: str) -> bool:
        return self.entry(name) is not None

    def in_flight(self, name: str) -> int:
        with self._lock:
            return sum(n for (nm, _, _), n in self._inflight.items() if nm == name)

    def in_cpu(self, key: Key) -> bool:
        with self._lock:
            return key in self._cpu

    @property
    def num_cpu(self) -> int:
        return len(self._cpu)

    # ---- use ----------------------------------------------------------------------------------------
    async def acquire(self, name: str) -> AdapterHandle | None:
        """The current version of `name`, loaded (from disk in a thread if needed), with a reference taken.
        None if the name is unknown. Release with `release(handle)` when the request ends."""
        entry = self.entry(name)
        if entry is None:
            return None
        key = entry.key
        with self._lock:
            loaded = self._cpu.get(key)
            if loaded is not None:
                self._cpu.move_to_end(key)
                self._inflight[key] += 1
                return AdapterHandle(entry.name, entry.version, loaded, entry.uid, held=True)
        task = self._loading.get(key)
        if task is None:  # single flight: concurrent requests for one adapter share one disk load
            task = asyncio.ensure_future(self._load(key, entry))
            self._loading[key] = task
        # shielded: a request cancelled while waiting must not cancel the load the others wait for
        loaded = await asyncio.shield(task)
        with self._lock:
            self._inflight[key] += 1
        return AdapterHandle(entry.name, entry.version, loaded, entry.uid, held=True)

    async def _load(self, key: Key, entry: AdapterEntry) -> Adapter:
        try:
            if self._loader is None or entry.path is None:
                raise RuntimeError(f"adapter {entry.name!r} has no files to load from")
            loaded = await asyncio.to_thread(self._loader, entry.path)
            with self._lock:
                dropped = self._cache(key, loaded)
                self.cpu_loads += 1
            self._retire_all(dropped)
            return loaded
        finally:
            self._loading.pop(key, None)

    def release(self, handle: AdapterHandle) -> None:
        """Give back acquire()'s reference; a second release of the same handle does nothing."""
        if not handle.held:
            return
        handle.held = False
        key = handle.key
        with self._lock:
            self._inflight[key] -= 1
            if self._inflight[key] <= 0:
                del self._inflight[key]
            current = self._entries.get(handle.name)
            stale = key not in self._inflight and (current is None or current.uid != handle.uid)
        if stale:
            self._retire(key)

    def _cache(self, key: Key, loaded: Adapter) -> list[Key]:
        """Insert into the CPU LRU (lock held); evicting drops only the cache's reference, except for a
        derived adapter, whose only tier this is: it leaves the catalogue too. Returns those keys, for
        `_retire_all` once the lock is released."""
        self._cpu[key] = loaded
        self._cpu.move_to_end(key)
        dropped = []
        while len(self._cpu) > self.max_cpu:
            old = next(iter(self._cpu))
            if old == key:
                break
            del self._cpu[old]
            self.cpu_evictions += 1
            entry = self._entries.get(old[0])
            if entry is not None and entry.derived is not None and entry.key == old:
                del self._entries[old[0]]
                dropped.append(old)
        return dropped

    def _retire_all(self, keys: list[Key]) -> None:
        for key in keys:
            self._retire(key)

    def _retire(self, key: Key) -> None:
        """A version that is no longer current: drop it from CPU, and tell the engine once unused. Derived
        adapters computed from it leave the catalogue with it (a new request recomputes from the new version)."""
        with self._lock:
            self._cpu.pop(key, None)
            unused = key not in self._inflight
            derived = [e for e in self._entries.values() if key in e.sources]
            for e in derived:
                del self._entries[e.name]
        if unused and self.on_stale is not None:
            self.on_stale(key)
        for e in derived:
            self._retire(e.key)
