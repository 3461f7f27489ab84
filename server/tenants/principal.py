"""Who a request is: the key that authenticated it (or the bootstrap keys, or nobody)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapters_store.keys import DEFAULT_TENANT, KeyRecord

STATE_KEY = "principal"  # request.state.principal (scope["state"]["principal"])
ALL_SCOPES = frozenset({"infer", "adapters:write", "finetune", "assistants:write", "admin"})


@dataclass(frozen=True)
class Principal:
    key_id: str  # a tenant key's id, or bootstrap-admin / bootstrap-user / anonymous (never the key itself)
    tenant: str
    admin: bool  # sees and may use every tenant's resources
    scopes: frozenset[str] = ALL_SCOPES
    adapters: tuple[str, ...] = ()  # patterns of the default tenant's adapters/assistants it may use
    allow_base: bool = True
    limits: dict[str, int | None] = field(default_factory=dict)
    bootstrap: bool = True  # --api-key / --admin-key / no key: today's rules, no quotas

    @classmethod
    def of_key(cls, rec: KeyRecord) -> Principal:
        scopes = ALL_SCOPES if rec.admin else frozenset(rec.scopes)
        return cls(key_id=rec.id, tenant=rec.tenant, admin=rec.admin, scopes=scopes, adapters=rec.adapters,
                   allow_base=rec.allow_base, limits=dict(rec.limits), bootstrap=False)


BOOTSTRAP_ADMIN = Principal("bootstrap-admin", DEFAULT_TENANT, admin=True)
BOOTSTRAP_USER = Principal("bootstrap-user", DEFAULT_TENANT, admin=False)
ANONYMOUS_OPEN = Principal("anonymous", DEFAULT_TENANT, admin=True)  # no key configured at all: as open as today
ANONYMOUS_USER = Principal("anonymous", DEFAULT_TENANT, admin=False)  # --admin-key only: user routes are open


def principal_of(request_or_scope: Any) -> Principal | None:
    """The request's principal; None when no tenants layer ran (an app without the middleware)."""
    scope = getattr(request_or_scope, "scope", request_or_scope)
    state = scope.get("state") if isinstance(scope, dict) else None
    p = state.get(STATE_KEY) if isinstance(state, dict) else None
    return p if isinstance(p, Principal) else None
