"""What route handlers call. Each is a no-op on a server without the tenants layer (no principal on the request).

A handler that finds a resource the key may not see answers exactly as if it did not exist (same status,
same message): a tenant cannot tell another tenant's names or ids from free ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from fastapi import Request

from server.tenants.principal import principal_of


def _tenants(request: Request) -> Any:
    return getattr(request.app.state.peft, "tenants", None)


def sees_adapter(request: Request, name: str) -> bool:
    t = _tenants(request)
    return t is None or t.sees_adapter(principal_of(request), name)


def sees_assistant(request: Request, assistant: Any) -> bool:
    t = _tenants(request)
    return t is None or t.sees_assistant(principal_of(request), assistant)


def sees(request: Request, kind: str, rid: str) -> bool:
    """kind "file" or "job"."""
    t = _tenants(request)
    return t is None or t.sees(principal_of(request), kind, rid)


def may_use_model(request: Request, model: str | None) -> bool:
    t = _tenants(request)
    return t is None or t.may_use_model(principal_of(request), model)


def check_new_name(request: Request, name: str, what: str) -> None:
    t = _tenants(request)
    if t is not None:
        t.check_new_name(principal_of(request), name, what)


def own(request: Request, kind: str, name: str) -> None:
    """Record that the request's tenant (and key) created `kind`/`name`."""
    t = _tenants(request)
    if t is not None:
        t.own(principal_of(request), kind, name)


def disown(request: Request, kind: str, name: str) -> None:
    t = _tenants(request)
    if t is not None:
        t.keys.disown(kind, name)


@contextlib.contextmanager
def storage(request: Request, incoming: int, replacing: str | None = None) -> Iterator[None]:
    """429 (storage_bytes) before a write that would pass the key's quota; the bytes count while it runs."""
    t = _tenants(request)
    if t is None:
        yield
        return
    with t.storage(principal_of(request), incoming, replacing):
        yield
