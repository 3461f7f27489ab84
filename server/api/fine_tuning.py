"""OpenAI's Files (purpose fine-tune) and Fine-tuning jobs routes, over `server.train`."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from adapters_store import AdapterError
from server.api.errors import APIError
from server.tenants import guards
from server.train.dataset import DatasetError, validate_upload
from server.train.manager import FineTuning, JobError, public

router = APIRouter()
PURPOSES = ("fine-tune",)


def _ft(request: Request) -> FineTuning:
    ft = getattr(request.app.state.peft, "finetune", None)
    if ft is None:
        raise APIError(404, "fine-tuning is not enabled on this server", code="not_enabled")
    return ft


def _job_error(e: JobError) -> APIError:
    return APIError(e.status, str(e), param=e.param, code=e.code)


# ---- files --------------------------------------------------------------------------------------
@router.post("/v1/files")
async def upload_file(request: Request) -> JSONResponse:
    """Multipart `file` + `purpose=fine-tune`; the JSONL is checked line by line before anything is stored."""
    ft = _ft(request)
    state = request.app.state.peft
    limit = state.settings.max_upload_mb << 20
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "expected multipart/form-data with fields 'file' and 'purpose'", param="body")
    try:
        form = await request.form(max_files=2, max_fields=4, max_part_size=limit)
    except Exception as e:  # noqa: BLE001 - starlette raises its own types for malformed multipart
        raise APIError(400, f"malformed multipart body: {e}", param="body") from e
    purpose = form.get("purpose")
    item = form.get("file")
    if purpose not in PURPOSES:
        raise APIError(400, f"purpose {purpose!r} is not supported; use one of: {', '.join(PURPOSES)}",
                       param="purpose", code="invalid_purpose")
    if not isinstance(item, UploadFile):
        raise APIError(400, "the form field 'file' (the JSONL training file) is required", param="file")
    data = await item.read()
    await form.close()
    if len(data) > limit:
        raise APIError(413, f"file is {len(data)} bytes, over --max-upload-mb {limit >> 20}", param="file")
    filename = os.path.basename((item.filename or "upload.jsonl").replace("\\", "/")) or "upload.jsonl"
    try:
        with guards.storage(request, len(data)):  # the key's storage_bytes, before anything is written
            parsed, _ = await asyncio.to_thread(validate_upload, data, state.tokenizer,
                                                max_lines=state.settings.max_file_lines,
                                                max_tokens=state.model.max_model_len)
            rec = await asyncio.to_thread(ft.files.add, data, filename=filename, purpose=str(purpose),
                                          lines=len(parsed.samples), fmt=parsed.format)
            guards.own(request, "file", rec.id)
    except DatasetError as e:
        raise APIError(400, f"{filename}: {e}", param="file", code="invalid_file") from e
    return JSONResponse(rec.to_openai())


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None) -> dict[str, Any]:
    return {"object": "list", "data": [r.to_openai() for r in _ft(request).files.list(purpose)
                                       if guards.sees(request, "file", r.id)], "has_more": False}


def _file(ft: FineTuning, file_id: str, request: Request) -> Any:
    try:
        if not guards.sees(request, "file", file_id):  # another tenant's: as if it did not exist
            raise AdapterError(f"file {file_id!r} does not exist; GET /v1/files lists the uploaded files",
                               field="file_id", status=404)
        return ft.files.get(file_id)
    except AdapterError as e:
        raise APIError(404, str(e), param="file_id", code="file_not_found") from e


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request) -> dict[str, Any]:
    return _file(_ft(request), file_id, request).to_openai()


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request) -> Response:
    ft = _ft(request)
    _file(ft, file_id, request)
    return Response(await asyncio.to_thread(ft.files.content, file_id), media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> dict[str, Any]:
    ft = _ft(request)
    _file(ft, file_id, request)
    users = [j["id"] for j in ft.jobs.with_status("validating_files", "queued", "running")
             if file_id in (j["training_file"], j.get("validation_file"))]
    if users:
        raise APIError(409, f"file {file_id} is used by active fine-tuning jobs: {', '.join(users)}; cancel them "
                            "first", param="file_id", code="file_in_use")
    await asyncio.to_thread(ft.files.delete, file_id)
    guards.disown(request, "file", file_id)
    return {"id": file_id, "object": "file", "deleted": True}


# ---- jobs ---------------------------------------------------------------------------------------
@router.post("/v1/fine_tuning/jobs")
async def create_job(request: Request) -> JSONResponse:
    ft = _ft(request)
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}", param="body", code="invalid_json") from e
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", param="body")
    for key in ("training_file", "validation_file"):  # another tenant's file: as if it did not exist
        fid = body.get(key)
        if isinstance(fid, str) and not guards.sees(request, "file", fid):
            raise APIError(404, f"{key} {fid!r} does not exist; upload it with POST /v1/files", param=key,
                           code="file_not_found")
    try:
        job = await asyncio.to_thread(ft.create, body)
    except JobError as e:
        raise _job_error(e) from e
    guards.own(request, "job", job["id"])
    guards.own(request, "jobsfx", job["id"][-8:])  # its fine-tuned models and checkpoints (server/tenants)
    return JSONResponse(job)


def _limit(limit: int) -> int:
    if not 1 <= limit <= 100:
        raise APIError(400, f"limit {limit} must be in [1, 100]", param="limit")
    return limit


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(request: Request, after: str | None = None, limit: int = 20) -> dict[str, Any]:
    ft, limit = _ft(request), _limit(limit)
    everything, _ = ft.jobs.list(None, 1 << 30)
    jobs = [j for j in everything if guards.sees(request, "job", j["id"])]
    ids = [j["id"] for j in jobs]
    start = ids.index(after) + 1 if after in ids else 0
    return {"object": "list", "data": [public(j) for j in jobs[start:start + limit]],
            "has_more": start + limit < len(jobs)}


def _get(ft: FineTuning, job_id: str, request: Request) -> dict[str, Any]:
    try:
        if not guards.sees(request, "job", job_id):  # another tenant's: as if it did not exist
            raise JobError(f"fine-tuning job {job_id!r} does not exist", param="fine_tuning_job_id", status=404,
                           code="job_not_found")
        return ft.get(job_id)
    except JobError as e:
        raise _job_error(e) from e


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> dict[str, Any]:
    return public(_get(_ft(request), job_id, request))


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, after: str | None = None, limit: int = 20) -> dict[str, Any]:
    ft = _ft(request)
    _get(ft, job_id, request)
    data, more = ft.jobs.events(job_id, after, _limit(limit))
    return {"object": "list", "data": data, "has_more": more}


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def job_checkpoints(job_id: str, request: Request, after: str | None = None, limit: int = 10) -> dict[str, Any]:
    ft = _ft(request)
    _get(ft, job_id, request)
    data = ft.jobs.checkpoints(job_id)
    if after is not None:
        ids = [c["id"] for c in data]
        data = data[ids.index(after) + 1:] if after in ids else data
    return {"object": "list", "data": data[:_limit(limit)], "has_more": len(data) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[:limit][-1]["id"] if data else None}


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
    _get(_ft(request), job_id, request)
    try:
        return await asyncio.to_thread(_ft(request).cancel, job_id)
    except JobError as e:
        raise _job_error(e) from e
