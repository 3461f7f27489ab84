"""What adapters the engine can serve right now, by name, at which version.

A request resolves its adapter name to a handle once, at admission; the handle keeps the weights
alive, so a replaced or deleted adapter still serves the requests that started on it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, eq=False)
class AdapterHandle:
    name: str
    version: int
    kind: str  # "lora" | "prefix" | "prompt"
    loaded: Any  # adapters_store LoadedAdapter (CPU tensors)

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)


class AdapterRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, AdapterHandle] = {}

    def put(self, name: str, loaded: Any, version: int = 1) -> AdapterHandle:
        handle = AdapterHandle(name, version, loaded.kind, loaded)
        with self._lock:
            self._by_name[name] = handle
        return handle

    def get(self, name: str) -> AdapterHandle | None:
        with self._lock:
            return self._by_name.get(name)

    def remove(self, name: str) -> AdapterHandle | None:
        with self._lock:
            return self._by_name.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._by_name)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None
