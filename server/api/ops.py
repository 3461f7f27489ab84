"""Operations middleware (pure ASGI, so streaming responses pass through untouched).

Per HTTP request, in order: authentication, body-size limits, the overload gate for generation
routes; then, when the response ends, the request counter and one JSON line on `peftserve.request`.
What only the handler knows (the model asked for, the adapter it resolved to, token counts, the
response id, whether a stream was cut short) it leaves on `request.state` (server.api.context).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api import assistants
from server.api.context import GenerationContext, context_of
from server.api.errors import error_body
from server.api.state import ServerState
from server.metrics import NO_ADAPTER, OTHER

request_log = logging.getLogger("peftserve.request")

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
OPEN_PATHS = frozenset({"/health", "/ready"})
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapes log at DEBUG
ADMIN_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
ADMIN_PREFIXES = ("/v1/adapters", "/v1/assistants")  # writes to these collections need the admin key
RETRY_AFTER_S = 1
CLIENT_CLOSED = 499  # nginx's status for a client that went away before the answer was complete
_MB = 1024 * 1024
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def is_admin_route(method: str, path: str) -> bool:
    """Adapter and assistant writes: POST/PUT/PATCH/DELETE under /v1/adapters or /v1/assistants, the
    vLLM-style load/unload routes; and every /v1/evals route (eval jobs and their reports)."""
    if path == "/v1/evals" or path.startswith("/v1/evals/"):
        return True
    if method not in ADMIN_METHODS:
        return False
    return path in ADMIN_PATHS or any(path == p or path.startswith(p + "/") for p in ADMIN_PREFIXES)


def is_upload_route(method: str, path: str) -> bool:
    """Adapter uploads carry weights, training files data: they get --max-upload-mb instead of --max-body-mb."""
    if method == "POST" and path == "/v1/files":
        return True
    return method in ("POST", "PUT") and (path == "/v1/adapters" or path.startswith("/v1/adapters/"))


class _BodyTooLarge(HTTPException):
    """Raised from receive(); FastAPI re-raises HTTPException from body parsing, the handler renders 413."""


class OpsMiddleware:
    """Auth, limits, overload shedding, request metrics and the structured request log."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.generating = 0  # generation requests admitted here and not yet answered
        self._templates: list[tuple[str, re.Pattern[str]]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await _Exchange(self, scope, receive, send).run()

    # ---- decisions --------------------------------------------------------------------------------
    def auth_error(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str] | None:
        """None when allowed, else (status, message)."""
        s = self.state.settings
        if path in OPEN_PATHS:
            return None
        if path == "/metrics":
            if not s.metrics_require_key:
                return None
        elif not (path == "/v1" or path.startswith("/v1/")):
            return None
        admin = is_admin_route(method, path)
        if admin and s.admin_key:
            wanted = [s.admin_key]
        elif path == "/metrics":
            wanted = [k for k in (s.api_key, s.admin_key) if k]
        else:  # the admin key also opens every route the api key opens
            wanted = [k for k in (s.api_key, s.admin_key) if k] if s.api_key else []
        if not wanted:
            return None
        given = _bearer(headers.get("authorization", ""))
        if given is None:
            return 401, "missing API key: send the header 'Authorization: Bearer <key>'"
        if any(hmac.compare_digest(given.encode(), k.encode()) for k in wanted):
            return None
        if admin and s.api_key and hmac.compare_digest(given.encode(), s.api_key.encode()):
            if path.startswith("/v1/evals"):
                return 403, f"{method} {path} runs evals and needs the admin key (--admin-key)"
            what = "assistants" if path.startswith("/v1/assistants") else "adapters"
            return 403, f"{method} {path} changes {what} and needs the admin key (--admin-key)"
        return 401, "invalid API key"

    def route_template(self, app: Any, path: str) -> str:
        """Match `path` against the app's documented path templates (plus /metrics); else "unmatched"."""
        if self._templates is None:
            paths = list(app.openapi().get("paths", {})) if app is not None else []
            self._templates = [(t, re.compile(re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(t)) + "$"))
                               for t in [*paths, "/metrics"]]
        for template, rx in self._templates:
            if rx.match(path):
                return template
        return "unmatched"

    def overloaded(self) -> bool:
        """More generation requests waiting than --max-queue allows.

        The engine counts a request only once its generator starts, so a burst that has passed this
        gate but not reached the engine is counted here too: whatever exceeds the running batch waits.
        """
        eng = self.state.engine
        waiting = max(eng.num_waiting, self.generating - eng.max_num_seqs)
        return waiting >= self.state.settings.max_queue


def _bearer(value: str) -> str | None:
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class _Exchange:
    """One HTTP request passing through OpsMiddleware."""

    def __init__(self, mw: OpsMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
        self.mw = mw
        self.scope = scope
        self._receive = receive
        self._send = send
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given_id = self.headers.get("x-request-id", "")
        self.request_id = given_id if _SAFE_REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex
        self.start = time.perf_counter()
        self.status = 0
        self.started = False
        self.body_seen = 0
        self.generation = self.method == "POST" and self.path in GENERATION_PATHS
        s = mw.state.settings
        mb = s.max_upload_mb if is_upload_route(self.method, self.path) else s.max_body_mb
        self.body_limit = mb * _MB
        self.body_flag = "--max-upload-mb" if is_upload_route(self.method, self.path) else "--max-body-mb"
        self.too_large = False
        self.swallow = False  # drop the app's own response: a 413 went out instead
        self.error: str | None = None
        self.admission: Any = None  # server.tenants.service.Admission, when the server has tenants
        self.cut = False  # a stream cut because its key was revoked
        self._cut_event: asyncio.Event | None = None

    async def run(self) -> None:
        mw = self.mw
        tenants = getattr(mw.state, "tenants", None)
        if tenants is not None:  # tenant keys, scopes and quotas; bootstrap keys through auth_error as before
            self.admission = await tenants.admit(
                self.scope, self.method, self.path, _bearer(self.headers.get("authorization", "")),
                lambda: mw.auth_error(self.method, self.path, self.headers), self.generation)
            d = self.admission.denied
            if d is not None:
                await self._reply(d.status, d.message, d.code, d.headers or None)
                return
        else:
            denied = mw.auth_error(self.method, self.path, self.headers)
            if denied is not None:
                status, msg = denied
                code = "invalid_api_key" if status == 401 else "admin_key_required"
                await self._reply(status, msg, code, {"www-authenticate": "Bearer"} if status == 401 else None)
                return
        length = self._content_length()
        if length is not None and length > self.body_limit:
            await self._reply(413, self._too_large_msg(f"{length} bytes"), "request_too_large",
                              {"connection": "close"})
            return
        gen = self.generation
        if gen and mw.overloaded():
            await self._reply(429, f"the server is overloaded: {mw.state.settings.max_queue} requests are "
                                   "already waiting (--max-queue); retry later", "overloaded",
                              {"retry-after": str(RETRY_AFTER_S)})
            return
        if gen:
            mw.generating += 1
        try:
            await mw.app(self.scope, self.receive, self.send)
        except _BodyTooLarge:
            if self.started:
                raise
            await self._reply(413, self._too_large_msg(f"more than {self.body_limit} bytes"), "request_too_large",
                              {"connection": "close"}, log=False)
        except BaseException as e:
            self.error = repr(e)
            if not self.status:
                self.status = 500
            raise
        finally:
            if gen:
                mw.generating -= 1
            self._finish()

    # ---- wrapped ASGI channels --------------------------------------------------------------------
    async def receive(self) -> Message:
        if self.too_large:
            raise self._too_large_exc()
        msg = await self._receive_or_cut()
        if msg["type"] == "http.request":
            chunk = msg.get("body", b"")
            self.body_seen += len(chunk)
            if self.body_seen > self.body_limit:
                self.too_large = True
                raise self._too_large_exc()
        return msg

    async def _receive_or_cut(self) -> Message:
        """The client's next message; for a tenant key's request, a revocation cut also ends the wait (as a
        disconnect, which stops a streaming response's generation)."""
        adm = self.admission
        if adm is None or adm.principal is None or adm.principal.bootstrap:
            return await self._receive()
        if self.cut:
            return {"type": "http.disconnect"}
        if self._cut_event is None:
            self._cut_event = asyncio.Event()
        recv = asyncio.ensure_future(self._receive())
        cut = asyncio.ensure_future(self._cut_event.wait())
        try:
            await asyncio.wait({recv, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
            if not recv.done():
                recv.cancel()
        return recv.result() if recv.done() and not recv.cancelled() else {"type": "http.disconnect"}

    async def send(self, msg: Message) -> None:
        if self.too_large and not self.started:
            # The app caught our exception and answered something else (e.g. "malformed multipart"): the
            # body was too large, so that is the answer.
            await self._reply(413, self._too_large_msg(f"more than {self.body_limit} bytes"), "request_too_large",
                              {"connection": "close"}, log=False)
            self.swallow = True
        if self.admission is not None and msg["type"] == "http.response.body" and msg.get("more_body") \
                and not self.swallow and self.admission.revoked():
            await self._cut_revoked()
        if not self.swallow:
            await self._forward(msg)

    async def _cut_revoked(self) -> None:
        """A stream whose key was revoked ends at its next chunk: one error event, no [DONE], and the
        generation stops (receive() tells the app the client is gone)."""
        err = error_body(401, f"key {self.admission.key_id} was revoked; the stream ends here", code="key_revoked")
        await self._forward({"type": "http.response.body", "body": f"data: {json.dumps(err)}\n\n".encode(),
                             "more_body": False})
        self.swallow = self.cut = True
        self.error = "key revoked while streaming"
        if self._cut_event is not None:
            self._cut_event.set()

    async def _forward(self, msg: Message) -> None:
        if msg["type"] == "http.response.start":
            self.started = True
            self.status = msg["status"]
            msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", self.request_id.encode())]}
        await self._send(msg)

    # ---- helpers ----------------------------------------------------------------------------------
    def _content_length(self) -> int | None:
        raw = self.headers.get("content-length")
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            return None

    def _too_large_msg(self, size: str) -> str:
        return f"request body of {size} exceeds the limit of {self.body_limit // _MB} MB ({self.body_flag})"

    def _too_large_exc(self) -> _BodyTooLarge:
        return _BodyTooLarge(413, self._too_large_msg(f"more than {self.body_limit} bytes"))

    async def _reply(self, status: int, message: str, code: str, headers: dict[str, str] | None = None,
                     log: bool = True) -> None:
        body = json.dumps(error_body(status, message, code=code)).encode()
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await self._forward({"type": "http.response.start", "status": status, "headers": hdrs})
        await self._forward({"type": "http.response.body", "body": body})
        if log:
            self._finish()

    def _route(self) -> str:
        """The matched route template, a bounded label value."""
        route = getattr(self.scope.get("route"), "path", None)
        if route is None:  # answered here, before the router ran
            route = self.mw.route_template(self.scope.get("app"), self.path)
        return route

    def _adapter_label(self, ctx: GenerationContext | None) -> str:
        metrics = self.mw.state.metrics
        if ctx is None:  # the handler never saw the body (refused before, or not a generation route)
            return NO_ADAPTER
        if ctx.resolved:  # the adapter the request ran on, even if it was deleted since
            return metrics.adapter_label(ctx.adapter, count=ctx.adapter is not None)
        return OTHER  # a name that resolved to nothing is client input: never a label of its own

    def _finish(self) -> None:
        state = self.mw.state
        ctx = context_of(self.scope)
        status = self.status
        if ctx is not None and ctx.streaming and not ctx.complete and status == 200:
            status = CLIENT_CLOSED  # the stream was cut before its end: the client went away
        if state.metrics is not None:
            with state.metrics.lock:
                state.metrics.observe_request(self._route(), status, self._adapter_label(ctx))
        record: dict[str, Any] = {
            "id": self.request_id, "method": self.method, "path": self.path,
            "model": ctx.model if ctx is not None else None, "status": status,
            "prompt_tokens": ctx.prompt_tokens if ctx is not None else None,
            "completion_tokens": ctx.completion_tokens if ctx is not None else None,
            "latency_ms": round((time.perf_counter() - self.start) * 1000, 2),
        }
        if ctx is not None and ctx.response_id:
            record["response_id"] = ctx.response_id
        if self.error:
            record["error"] = self.error
        if self.admission is not None:  # the key's id, never the key
            record["key_id"] = self.admission.key_id
            self.admission.finish(ctx.prompt_tokens if ctx is not None else None,
                                  ctx.completion_tokens if ctx is not None else None)
        assistants.observe(state, self.scope, status, record)
        level = logging.DEBUG if self.path in QUIET_PATHS else logging.INFO
        request_log.log(level, json.dumps(record))
