"""`POST /v1/evals` (admin key): an eval run as a background job on this server; `GET /v1/evals/{id}` polls it.

A job, not a synchronous call: a few hundred items on several models take minutes on a CPU, past any
client's read timeout. The POST validates everything first (unknown model, malformed item N, empty set,
over MAX_ITEMS) and answers 400 naming the field, or 202 with the job; GET answers its status
(`running`/`succeeded`/`failed`), progress (`done`/`total` requests) and, once done, the report. The job
sends its requests to this app in-process (no socket) through /v1/completions and /v1/chat/completions,
with the caller's key, so they are validated, batched, logged and counted like any other request. Jobs
live in memory: a restart forgets them; the last MAX_KEPT finished jobs are kept.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from server.api.errors import APIError
from server.evals.items import EvalInputError, Item, parse_item, parse_jsonl
from server.evals.runner import UnknownModelError, check_models, request_count, run_eval

router = APIRouter()
MAX_ITEMS = 5000  # per job
MAX_RUNNING = 2  # jobs at once; more get 429
MAX_KEPT = 32  # finished jobs kept for GET
MAX_CONCURRENCY = 64


class EvalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=1)
    items: list[Any] | None = None  # {prompt, choices, answer} / {messages, ideal} objects
    data: str | None = None  # or the same as JSONL text
    match: Literal["exact", "contains"] = "exact"
    max_tokens: int = Field(default=64, ge=1)
    concurrency: int = Field(default=8, ge=1, le=MAX_CONCURRENCY)


@dataclass
class EvalJob:
    id: str
    models: list[str]
    total: int
    done: int = 0
    status: str = "running"
    report: dict[str, Any] | None = None
    error: str | None = None
    task: asyncio.Task | None = field(default=None, repr=False)

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": "eval", "status": self.status, "models": self.models,
                               "progress": {"done": self.done, "total": self.total}}
        if self.report is not None:
            out["report"] = self.report
        if self.error is not None:
            out["error"] = self.error
        return out


def _jobs(request: Request) -> OrderedDict[str, EvalJob]:
    st = request.app.state
    if not hasattr(st, "peft_evals"):
        st.peft_evals = OrderedDict()
    return st.peft_evals


def _items(body: EvalRequest) -> list[Item]:
    if (body.items is None) == (body.data is None):
        raise EvalInputError("give the eval set as either 'items' (a list of objects) or 'data' (JSONL text)",
                             "items")
    if body.data is not None:
        items = parse_jsonl(body.data, "data", body.match)
    else:
        items = [parse_item(obj, f"items[{n}]", body.match) for n, obj in enumerate(body.items or [])]
        if not items:
            raise EvalInputError("items: no items (the eval set is empty)", "items")
    if len(items) > MAX_ITEMS:
        raise EvalInputError(f"{len(items)} items exceed this server's limit of {MAX_ITEMS} per eval job; split the "
                             "set or use `peftserve eval`", "items")
    return items


def _param(e: EvalInputError) -> str | None:
    p = e.param
    return p.split(": ", 1)[-1] if p else None


@router.post("/v1/evals", status_code=202)
async def create_eval(body: EvalRequest, request: Request) -> JSONResponse:
    jobs = _jobs(request)
    try:
        items = _items(body)
    except EvalInputError as e:
        raise APIError(400, str(e), param=_param(e), code="invalid_eval") from e
    auth = request.headers.get("authorization")
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=request.app), base_url="http://peftserve.local",
                               headers={"Authorization": auth} if auth else {}, timeout=None)
    try:
        await check_models(client, body.models, "models")
    except EvalInputError as e:
        await client.aclose()
        unknown = isinstance(e, UnknownModelError)
        raise APIError(404 if unknown else 400, str(e), param="models",
                       code="model_not_found" if unknown else "invalid_eval") from e
    if sum(j.status == "running" for j in jobs.values()) >= MAX_RUNNING:
        await client.aclose()
        raise APIError(429, f"{MAX_RUNNING} eval jobs are already running; poll GET /v1/evals/{{id}} and retry",
                       code="too_many_evals", headers={"Retry-After": "5"})
    job = EvalJob(f"eval-{uuid.uuid4().hex}", body.models, request_count(items, body.models))

    def progress(done: int, _total: int) -> None:
        job.done = done

    async def go() -> None:
        try:
            job.report = await run_eval(client, items, body.models, concurrency=body.concurrency,
                                        max_tokens=body.max_tokens, progress=progress, source={"api": job.id})
            job.status = "succeeded"
        except Exception as e:  # noqa: BLE001 - the job's outcome, read by GET
            job.status, job.error = "failed", str(e)
        finally:
            await client.aclose()
            _trim(jobs)

    jobs[job.id] = job
    job.task = asyncio.create_task(go())
    return JSONResponse(job.view(), status_code=202)


def _trim(jobs: OrderedDict[str, EvalJob]) -> None:
    finished = [k for k, j in jobs.items() if j.status != "running"]
    for k in finished[:max(0, len(finished) - MAX_KEPT)]:
        del jobs[k]


@router.get("/v1/evals/{eval_id}")
async def get_eval(eval_id: str, request: Request) -> dict[str, Any]:
    job = _jobs(request).get(eval_id)
    if job is None:
        raise APIError(404, f"eval job '{eval_id}' does not exist (jobs live in memory: a restart forgets them)",
                       param="eval_id", code="eval_not_found")
    return job.view()
