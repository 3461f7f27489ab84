"""Adapter management over REST: upload, replace, list, show, delete, and vLLM's load/unload routes.

Writes go to the store first (validated, atomic); only then does the registry serve the new version.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, StrictStr
from starlette.datastructures import UploadFile

from adapters_store import AdapterError, extract_upload, validate_name
from server.api import assistants
from server.api.errors import APIError
from server.api.state import ServerState
from server.engine.registry import AdapterEntry
from server.families import family_for
from server.tenants import guards

router = APIRouter()
log = logging.getLogger("peftserve.adapters")


def _state(request: Request) -> ServerState:
    return request.app.state.peft


def _adapter_error(e: AdapterError) -> APIError:
    return APIError(e.status, str(e), param=e.field, code="invalid_adapter" if e.status in (400, 422) else None)


def residency(state: ServerState, entry: AdapterEntry) -> str:
    key = entry.key
    if state.engine.is_resident(key):
        return "device"
    if state.registry.in_cpu(key):
        return "cpu"
    return "disk"


def _record(state: ServerState, name: str) -> dict[str, Any]:
    e = state.registry.entry(name)
    if e is None:
        raise APIError(404, f"adapter '{name}' does not exist", param="name", code="adapter_not_found")
    rec = dict(e.record) if e.record else {"id": None, "name": name, "version": e.version, "peft_type": None,
                                            "source": str(e.path) if e.path else None}
    rec.update(type=e.kind, residency=residency(state, e), in_flight=state.registry.in_flight(name),
               stored=e.stored)
    if e.derived is not None:  # a per-request composition (server/compose): CPU tier only
        rec.update(peft_type="LORA", derived=e.derived)
    return rec


async def _read_upload(request: Request, default_name: str | None = None) -> tuple[str, dict[str, bytes]]:
    """The multipart body: `name` plus either `files` (the two adapter files) or one `archive`."""
    limit = _state(request).settings.max_upload_mb << 20
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise APIError(400, f"expected multipart/form-data with fields name and files (or archive), got "
                            f"content-type {ctype or 'none'!r}", param="body")
    try:
        form = await request.form(max_files=8, max_fields=8, max_part_size=limit)
    except OSError as e:  # large parts are spooled to a temp file: its disk can be full
        log.error("receiving an upload failed", exc_info=e)
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise APIError(507 if full else 500, f"could not receive the upload: spooling it to the server's temp "
                                             f"dir failed ({errno.errorcode.get(e.errno or 0, 'OSError')}: "
                                             f"{e.strerror or e}); nothing was stored",
                       code="insufficient_storage" if full else "upload_io_error") from e
    except Exception as e:  # noqa: BLE001 - starlette raises its own types for malformed multipart
        raise APIError(400, f"malformed multipart body: {e}", param="body") from e
    name = form.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise APIError(400, "the form field 'name' is required", param="name")
    files: dict[str, bytes] = {}
    total = 0
    for field in ("files", "archive"):
        for item in form.getlist(field):
            if not isinstance(item, UploadFile):
                raise APIError(400, f"form field '{field}' must be a file", param=field)
            data = await item.read()
            total += len(data)
            if total > limit:
                raise APIError(413, f"upload exceeds --max-upload-mb {limit >> 20}", param=field)
            fname = os.path.basename((item.filename or "").replace("\\", "/"))
            if not fname:
                raise APIError(400, f"a file in '{field}' has no filename", param=field)
            files[fname] = data
    await form.close()
    if not files:
        raise APIError(400, "no adapter files: send adapter_config.json and adapter_model.safetensors as "
                            "'files', or one .tar.gz/.zip as 'archive'", param="files")
    return name, files


def check_name_free(state: ServerState, name: str) -> None:
    """409 when `name` is already the id of something that is not an adapter (today the base model; the
    same check will cover assistant names): `/v1/models` would list it twice and the adapter be
    unreachable."""
    if name == state.base_name:
        raise APIError(409, f"adapter name {name!r} is the base model's id (--served-model-name); choose "
                            "another name", param="name", code="name_taken")
    if assistants.name_taken_by_assistant(state, name):
        raise APIError(409, f"adapter name {name!r} is an assistant's name; choose another name", param="name",
                       code="name_taken")


def _store_failure(e: Exception, name: str, action: str) -> APIError:
    """An I/O or index error of the store, in OpenAI's shape. The store undid its half-done work."""
    log.error("adapter store: %s %r failed", action, name, exc_info=e)
    if isinstance(e, OSError):
        what = f"{errno.errorcode.get(e.errno or 0, 'OSError')}: {e.strerror or e}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return APIError(507, f"could not {action} adapter {name!r}: the adapter store (--adapters-dir) is out "
                                 f"of disk space ({what}); nothing was changed", code="insufficient_storage")
        return APIError(500, f"could not {action} adapter {name!r}: the adapter store (--adapters-dir) failed "
                             f"({what}); nothing was changed", code="store_io_error")
    return APIError(500, f"could not {action} adapter {name!r}: the adapter store's index failed "
                         f"({type(e).__name__}: {e}); nothing was changed", code="store_index_error")


def _unpack_and_add(state: ServerState, name: str, source: Any, replace: bool) -> Any:
    """Worker thread: unpack an archive (bounded by --max-upload-mb), validate, store."""
    if isinstance(source, dict):
        mb = state.settings.max_upload_mb
        source = extract_upload(source, max_total_bytes=mb << 20, limit_name=f"--max-upload-mb {mb}")
    return state.store.add(name, source, state.model.shapes, state.settings.max_rank, replace)


async def _store(state: ServerState, name: str, source: Any, replace: bool) -> dict[str, Any]:
    """Validate and store (in a thread: unpacking and checking every tensor is CPU work that must not stall
    the event loop), then serve the new version."""
    try:
        validate_name(name)
        check_name_free(state, name)
        if not replace and name in state.registry:
            raise AdapterError(f"adapter {name!r} already exists; PUT /v1/adapters/{name} uploads a new version",
                               field="name", status=409)
        t0 = time.monotonic()
        rec = await asyncio.to_thread(_unpack_and_add, state, name, source, replace)
    except AdapterError as e:
        raise _adapter_error(e) from e
    except (OSError, sqlite3.Error) as e:
        raise _store_failure(e, name, "replace" if replace else "store") from e
    # Concurrent PUTs of one name finish in any order: serve the newest version, never step back to an
    # older one (which the store may already have pruned). No await between the check and the register.
    current = state.registry.entry(rec.name)
    if current is None or not current.stored or current.version < rec.version:
        state.registry.register(rec.name, rec.version, rec.path, rec.to_dict())
    log.info("adapter %s v%d stored (%s, %d bytes) in %.0f ms", rec.name, rec.version, rec.peft_type,
             rec.size_bytes, 1000 * (time.monotonic() - t0))
    return _written(state, rec)


def _written(state: ServerState, rec: Any) -> dict[str, Any]:
    """The answer to an upload: the version this request wrote (a newer one may already be current)."""
    current = state.registry.entry(rec.name)
    if current is not None and current.version == rec.version:
        return _record(state, rec.name)
    family = family_for(rec.peft_type)
    kind = family.name if family is not None else rec.peft_type
    return {**rec.to_dict(), "type": kind, "residency": "disk", "in_flight": 0, "stored": True}


async def _delete(state: ServerState, name: str, force: bool = False) -> None:
    """Stop serving `name`, let its requests in flight finish (bounded), then free files and slot. An adapter
    that assistants use is refused (409) unless `force`, which deletes those assistants with it."""
    entry = state.registry.entry(name)
    if entry is None:
        raise APIError(404, f"adapter '{name}' does not exist", param="name", code="adapter_not_found")
    assistants.guard_adapter_delete(state, name, force)
    state.registry.remove(name)
    deadline = time.monotonic() + state.settings.shutdown_timeout
    while state.registry.in_flight(name) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if entry.stored:
        try:
            await asyncio.to_thread(state.store.delete, name)
        except AdapterError as e:
            if e.status != 404:
                raise _adapter_error(e) from e
        except (OSError, sqlite3.Error) as e:
            if name not in state.registry:  # still in the store: keep serving it rather than half-delete it
                state.registry.register(name, entry.version, entry.path, entry.record or {})
            raise _store_failure(e, name, "delete") from e
    assistants.drop_users(state, name)
    log.info("adapter %s deleted", name)


def _not_found(name: str) -> APIError:
    return APIError(404, f"adapter '{name}' does not exist", param="name", code="adapter_not_found")


def _visible(request: Request, name: str) -> None:
    """Another tenant's adapter is answered as one that does not exist (server/tenants)."""
    if not guards.sees_adapter(request, name):
        raise _not_found(name)


async def _store_owned(request: Request, name: str, files: dict[str, bytes], replace: bool) -> dict[str, Any]:
    """_store within the key's storage quota, then the adapter belongs to the key's tenant."""
    with guards.storage(request, sum(len(v) for v in files.values()), replacing=name if replace else None):
        if replace:  # a new version keeps its owner, whoever uploads it
            return await _store(_state(request), name, files, replace=True)
        return await _owned_first(request, name, _store(_state(request), name, files, replace=False))


async def _owned_first(request: Request, name: str, write: Any) -> dict[str, Any]:
    """Own the name before it is served (never visible to the default tenant in between); undo on failure."""
    if name in _state(request).registry:  # taken: _store answers 409, the owner stays
        write.close()
        raise APIError(409, f"adapter {name!r} already exists; PUT /v1/adapters/{name} uploads a new version",
                       param="name", code="invalid_adapter")
    guards.own(request, "adapter", name)
    try:
        return await write
    except BaseException:
        if name not in _state(request).registry:  # not a concurrent create of the same name that won
            guards.disown(request, "adapter", name)
        raise


@router.post("/v1/adapters", status_code=201)
async def upload_adapter(request: Request) -> JSONResponse:
    name, files = await _read_upload(request)
    guards.check_new_name(request, name, "adapter")
    return JSONResponse(await _store_owned(request, name, files, replace=False), status_code=201)


@router.put("/v1/adapters/{name}")
async def replace_adapter(name: str, request: Request) -> JSONResponse:
    state = _state(request)
    entry = state.registry.entry(name) if guards.sees_adapter(request, name) else None
    if entry is None:
        raise APIError(404, f"adapter '{name}' does not exist; POST /v1/adapters creates it", param="name",
                       code="adapter_not_found")
    if not entry.stored:
        raise APIError(409, f"adapter '{name}' was given with --adapter at start-up and is not in the store; "
                            "it cannot be replaced over REST", param="name")
    form_name, files = await _read_upload(request, default_name=name)
    if form_name != name:
        raise APIError(400, f"form field name {form_name!r} does not match the URL's {name!r}", param="name")
    return JSONResponse(await _store_owned(request, name, files, replace=True))


@router.get("/v1/adapters")
async def list_adapters(request: Request) -> dict[str, Any]:
    state = _state(request)
    names = state.registry.names() + state.registry.derived_names()
    return {"object": "list", "data": [_record(state, n) for n in names
                                       if n in state.registry and guards.sees_adapter(request, n)]}


@router.get("/v1/adapters/{name}")
async def show_adapter(name: str, request: Request) -> dict[str, Any]:
    _visible(request, name)
    return _record(_state(request), name)


@router.delete("/v1/adapters/{name}", status_code=204)
async def delete_adapter(name: str, request: Request, force: bool = False) -> Response:
    _visible(request, name)
    await _delete(_state(request), name, force)
    guards.disown(request, "adapter", name)
    return Response(status_code=204)


class LoadLoRARequest(BaseModel):
    lora_name: StrictStr
    lora_path: StrictStr


class UnloadLoRARequest(BaseModel):
    lora_name: StrictStr


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRARequest, request: Request) -> JSONResponse:
    """vLLM-compatible: store the adapter found at a server-side path under --allowed-adapter-dir."""
    state = _state(request)
    allowed = [os.path.realpath(os.path.expanduser(d)) for d in state.settings.allowed_adapter_dir]
    if not allowed:
        raise APIError(403, "loading adapters from server paths is disabled; start the server with "
                            "--allowed-adapter-dir DIR", param="lora_path")
    real = os.path.realpath(body.lora_path)
    if not any(os.path.commonpath([real, d]) == d for d in allowed):
        raise APIError(403, f"lora_path {body.lora_path!r} is not under an --allowed-adapter-dir "
                            f"({', '.join(allowed)})", param="lora_path")
    guards.check_new_name(request, body.lora_name, "adapter")
    return JSONResponse(await _owned_first(request, body.lora_name, _store(state, body.lora_name, real, False)))


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRARequest, request: Request) -> JSONResponse:
    _visible(request, body.lora_name)
    await _delete(_state(request), body.lora_name)
    guards.disown(request, "adapter", body.lora_name)
    return JSONResponse({"status": "ok", "lora_name": body.lora_name})
