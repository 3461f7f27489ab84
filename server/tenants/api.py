"""`/v1/keys` (admin: create, list, revoke tenant keys) and `/v1/usage` (the caller's key; an admin's: all)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from adapters_store.keys import LIMITS, SCOPES, TENANT_RE
from server.api.errors import APIError
from server.tenants.principal import Principal, principal_of
from server.tenants.service import Tenants

router = APIRouter()
log = logging.getLogger("peftserve.tenants")

Limit = Annotated[StrictInt, Field(ge=1)] | None


class KeyLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests_per_minute: Limit = None
    tokens_per_minute: Limit = None
    concurrent_requests: Limit = None
    storage_bytes: Limit = None


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: StrictStr
    name: Annotated[StrictStr, Field(max_length=64)] = ""
    scopes: list[StrictStr] = Field(default_factory=lambda: ["infer"])
    adapters: list[Annotated[StrictStr, Field(max_length=128)]] = Field(default_factory=list, max_length=32)
    allow_base: StrictBool = True
    limits: KeyLimits = Field(default_factory=KeyLimits)


def _tenants(request: Request) -> Tenants:
    t = getattr(request.app.state.peft, "tenants", None)
    if t is None:
        raise APIError(404, "tenant keys need the adapter store, which this server runs without", code="not_enabled")
    return t


def _admin(request: Request) -> Principal | None:
    p = principal_of(request)
    if p is not None and not p.admin:
        raise APIError(403, f"{request.method} {request.url.path} manages keys and needs an admin key "
                            "(--admin-key, or a key with the scope 'admin')", code="admin_key_required")
    return p


@router.post("/v1/keys", status_code=201)
async def create_key(body: KeyCreate, request: Request) -> JSONResponse:
    """A new key; the response is the only place the key itself ever appears."""
    tenants = _tenants(request)
    _admin(request)
    if not request.app.state.peft.settings.admin_key:
        raise APIError(400, "tenant keys need --admin-key: without it this server has no authentication, and "
                            "every request would be the admin's", param="admin_key")
    if not TENANT_RE.match(body.tenant):
        raise APIError(400, f"tenant {body.tenant!r} is invalid: 1-32 characters from a-z 0-9 _ -, starting with a "
                            "letter or digit", param="tenant")
    bad = [s for s in body.scopes if s not in SCOPES]
    if bad or not body.scopes:
        raise APIError(400, f"scope {bad[0] if bad else None!r} is not one of {', '.join(SCOPES)}", param="scopes")
    limits = {k: getattr(body.limits, k) for k in LIMITS}
    rec, key = tenants.keys.create(body.tenant, body.name, list(dict.fromkeys(body.scopes)), body.adapters,
                                   body.allow_base, limits)
    log.info("key %s created for tenant %s (scopes %s)", rec.id, rec.tenant, ",".join(rec.scopes))
    return JSONResponse({**rec.to_dict(), "key": key}, status_code=201)


@router.get("/v1/keys")
async def list_keys(request: Request) -> dict[str, Any]:
    tenants = _tenants(request)
    _admin(request)
    return {"object": "list", "data": [r.to_dict() for r in tenants.keys.list()]}


@router.delete("/v1/keys/{key_id}")
async def delete_key(key_id: str, request: Request) -> dict[str, Any]:
    tenants = _tenants(request)
    _admin(request)
    rec = tenants.revoke(key_id)
    if rec is None:
        raise APIError(404, f"key {key_id!r} does not exist; GET /v1/keys lists the keys", param="key_id",
                       code="key_not_found")
    return {"id": key_id, "object": "api_key.deleted", "deleted": True}


@router.get("/v1/usage")
async def usage(request: Request) -> dict[str, Any]:
    tenants = _tenants(request)
    p = principal_of(request)
    if p is None:
        from server.tenants.principal import ANONYMOUS_OPEN

        p = ANONYMOUS_OPEN
    return {"object": "list", "data": tenants.usage(p)}
