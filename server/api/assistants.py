"""Assistants over REST (`/v1/assistants`, OpenAI's shape) and how a request names one.

An assistant is a model id: `name` → (an adapter or the base model, instructions, sampling defaults). A
generation request whose `model` is an assistant runs on the assistant's adapter (its current version:
a replaced adapter is followed), with the instructions as the first system message (chat only; a
request's own system message follows) and the assistant's defaults for every sampling field the request
leaves out. Names are one namespace with adapters and the base model's id. Persistence:
adapters_store/assistants.py.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from adapters_store import AdapterError, validate_name
from adapters_store.assistants import Assistant, AssistantExists, AssistantStore
from server.api.errors import APIError
from server.api.schemas import ChatCompletionRequest, ChatMessage, SamplingFields
from server.api.state import ServerState
from server.metrics import AdapterLabels
from server.tenants import guards

router = APIRouter()
log = logging.getLogger("peftserve.assistants")

STATE_KEY = "assistant"  # request.state: the assistant a generation request named (for the log and metrics)
MAX_METADATA = 16  # OpenAI's limits on metadata
MAX_INSTRUCTIONS_CHARS = 256_000
Number = StrictFloat | StrictInt


class AssistantFields(BaseModel):
    """What a create or update may carry; an update's unset fields stay as they were."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr | None = None
    model: StrictStr | None = None
    description: Annotated[StrictStr, Field(max_length=512)] | None = None
    instructions: Annotated[StrictStr, Field(max_length=MAX_INSTRUCTIONS_CHARS)] | None = None
    temperature: Annotated[Number, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Number, Field(gt=0.0, le=1.0)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    metadata: dict[StrictStr, StrictStr] | None = None


class Assistants:
    """The server's assistants: the persisted rows plus their metrics (set by `install`)."""

    def __init__(self, store: AssistantStore) -> None:
        self.store = store
        self.metrics: AssistantMetrics | None = None


class AssistantMetrics:
    """Requests and tokens per assistant; labels capped at --metrics-max-adapters (the rest: `other`)."""

    def __init__(self, registry: Any, max_labels: int) -> None:
        self.registry = registry
        self.labels = AdapterLabels(max_labels, self._demote)
        self.requests = Counter("peftserve_assistant_requests", "Generation requests naming an assistant",
                                ["assistant", "status"], registry=registry)
        self.prompt_tokens = Counter("peftserve_assistant_prompt_tokens",
                                     "Prompt tokens of requests naming an assistant (instructions included)",
                                     ["assistant"], registry=registry)
        self.generation_tokens = Counter("peftserve_assistant_generation_tokens",
                                         "Tokens generated for requests naming an assistant", ["assistant"],
                                         registry=registry)
        self._statuses: dict[str, set[str]] = {}

    def observe(self, assistant: str, status: int, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        """Count one finished request (event loop only: no other thread touches these series)."""
        self.labels.rebalance()
        label = self.labels.label(assistant, count=True)
        self._statuses.setdefault(label, set()).add(str(status))
        self.requests.labels(label, str(status)).inc()
        self.prompt_tokens.labels(label).inc(prompt_tokens or 0)
        self.generation_tokens.labels(label).inc(completion_tokens or 0)

    def _demote(self, label: str) -> None:
        for status in self._statuses.pop(label, set()):
            self.requests.remove(label, status)
        for metric in (self.prompt_tokens, self.generation_tokens):
            try:
                metric.remove(label)
            except KeyError:
                pass


def open_assistants(index_path: Any) -> Assistants:
    """The assistants kept in the adapter store's index at `index_path`."""
    return Assistants(AssistantStore(index_path))


def install(app: Any, state: ServerState) -> None:
    """Add the routes and the per-assistant metrics to an app."""
    app.include_router(router)
    if state.assistants is not None and state.metrics is not None:
        current = state.assistants.metrics
        if current is None or current.registry is not state.metrics.registry:  # a second app on one state
            state.assistants.metrics = AssistantMetrics(state.metrics.registry, state.settings.metrics_max_adapters)


def check_at_startup(state: ServerState) -> None:
    """Log the assistants that cannot answer: a name now taken by an adapter or the base model (those win),
    or a model that is gone (its requests get 404 until it is back or the assistant is changed)."""
    if state.assistants is None:
        return
    for a in state.assistants.store.list():
        if a.name == state.base_name or a.name in state.registry:
            log.warning("assistant %r is shadowed: an adapter or the base model has the same id", a.name)
        elif not _is_target(state, a.model):
            log.warning("assistant %r uses model %r, which is not served", a.name, a.model)


# ---- resolving a request's model -----------------------------------------------------------------------
def lookup(state: ServerState, model: str | None) -> Assistant | None:
    """The assistant a request's `model` names; None for the base model, an adapter, or no assistant."""
    if model is None or state.assistants is None or model == state.base_name or model in state.registry:
        return None
    return state.assistants.store.get(model) if model in state.assistants.store else None


def target(state: ServerState, model: str | None) -> str | None:
    """A request's `model` with an assistant's name replaced by the adapter (or base id) it runs on."""
    a = lookup(state, model)
    if a is None:
        return model
    if not _is_target(state, a.model):
        raise APIError(404, f"assistant '{a.name}' uses model '{a.model}', which does not exist any more; "
                            f"change it with POST /v1/assistants/{a.name}", param="model", code="model_not_found")
    return a.model


def apply(state: ServerState, body: SamplingFields, request: Request) -> Any:
    """The request as its assistant shapes it (the body unchanged when `model` names none): instructions
    first in a chat's messages, the assistant's defaults for sampling fields the client left out."""
    a = lookup(state, body.model)
    if a is None:
        return body
    setattr(request.state, STATE_KEY, a.name)
    sent = {k for k in body.model_fields_set if getattr(body, k) is not None}
    update: dict[str, Any] = {}
    for f in ("temperature", "top_p", "stop"):
        if getattr(a, f) is not None and f not in sent:
            update[f] = getattr(a, f)
    if a.max_tokens is not None and not sent & {"max_tokens", "max_completion_tokens"}:
        update["max_tokens"] = a.max_tokens
    if isinstance(body, ChatCompletionRequest):
        if a.instructions:
            update["messages"] = [ChatMessage(role="system", content=a.instructions), *body.messages]
    elif a.instructions:
        raise APIError(400, f"assistant '{a.name}' has instructions, which only /v1/chat/completions applies (as "
                            f"the system message); use chat, or name its model '{a.model}' on /v1/completions",
                       param="model", code="assistant_requires_chat")
    return body.model_copy(update=update)


def models(state: ServerState) -> list[dict[str, Any]]:
    """`/v1/models` entries of the assistants that answer (not shadowed, model served)."""
    out = []
    for a in state.assistants.store.list() if state.assistants is not None else []:
        if lookup(state, a.name) is a and _is_target(state, a.model):
            out.append({"id": a.name, "object": "model", "created": a.created_at, "owned_by": "peftserve",
                        "root": a.name, "parent": a.model, "assistant_id": a.id})
    return out


def observe(state: ServerState, scope: dict[str, Any], status: int, record: dict[str, Any]) -> None:
    """At a request's end: its assistant into the request log line and the per-assistant metrics."""
    st = scope.get("state")
    name = st.get(STATE_KEY) if isinstance(st, dict) else None
    if name is None:
        return
    record["assistant"] = name
    if state.assistants is not None and state.assistants.metrics is not None:
        state.assistants.metrics.observe(name, status, record.get("prompt_tokens"), record.get("completion_tokens"))


# ---- adapters and assistants ---------------------------------------------------------------------------
def guard_adapter_delete(state: ServerState, adapter: str, force: bool) -> None:
    """409 naming the assistants that use `adapter`, unless `force` (they are then deleted with it)."""
    if state.assistants is None or force:
        return
    users = state.assistants.store.using(adapter)
    if users:
        names = ", ".join(repr(a.name) for a in users)
        raise APIError(409, f"adapter '{adapter}' is used by assistant(s) {names}; delete or change them first, or "
                            "pass ?force=true to delete the adapter and those assistants", param="name",
                       code="adapter_in_use")


def drop_users(state: ServerState, adapter: str) -> None:
    """After a forced adapter delete: the assistants that used it go too."""
    if state.assistants is not None:
        gone = state.assistants.store.delete_using(adapter)
        if gone:
            log.info("assistants %s deleted with adapter %s", ", ".join(a.name for a in gone), adapter)


def name_taken_by_assistant(state: ServerState, name: str) -> bool:
    return state.assistants is not None and name in state.assistants.store


# ---- validation ---------------------------------------------------------------------------------------
def _is_target(state: ServerState, model: str) -> bool:
    return model == state.base_name or model in state.registry


def _check_name(state: ServerState, name: str, current: Assistant | None = None) -> None:
    try:
        validate_name(name)
    except AdapterError as e:
        raise APIError(400, str(e).replace("adapter name", "assistant name"), param="name") from e
    if name == state.base_name:
        raise APIError(409, f"assistant name {name!r} is the base model's id; choose another name", param="name",
                       code="name_taken")
    if name in state.registry:
        raise APIError(409, f"assistant name {name!r} is an adapter's name; choose another name", param="name",
                       code="name_taken")
    other = state.assistants.store.get(name) if state.assistants is not None else None
    if other is not None and (current is None or other.id != current.id):
        raise APIError(409, f"an assistant named {name!r} already exists ({other.id})", param="name",
                       code="name_taken")


def _check_model(state: ServerState, model: str) -> None:
    if _is_target(state, model):
        return
    if state.assistants is not None and model in state.assistants.store:
        raise APIError(400, f"model {model!r} is an assistant; an assistant's model is an adapter or the base "
                            f"model '{state.base_name}'", param="model", code="invalid_value")
    raise _unknown_model(state, model)


def _unknown_model(state: ServerState, model: str) -> APIError:
    return APIError(400, f"model {model!r} is neither the base model '{state.base_name}' nor an adapter; "
                         "GET /v1/adapters lists the adapters", param="model", code="model_not_found")


def _check_model_for(request: Request, model: str) -> None:
    """_check_model, where a model the key may not use is answered as one that does not exist."""
    state = _state(request)
    if not guards.may_use_model(request, model):
        raise _unknown_model(state, model)
    _check_model(state, model)


def _get_visible(request: Request, key: str) -> Assistant:
    a = _get(_state(request), key)
    if not guards.sees_assistant(request, a):
        raise APIError(404, f"assistant '{key}' does not exist; GET /v1/assistants lists them",
                       param="assistant_id", code="assistant_not_found")
    return a


def _check_body(state: ServerState, f: AssistantFields, sent: set[str]) -> dict[str, Any]:
    """The body fields of `f` that were sent, validated against this server's limits."""
    s = state.settings
    out: dict[str, Any] = {k: getattr(f, k) for k in sent if k not in ("name", "model")}
    for k in ("temperature", "top_p"):
        if out.get(k) is not None:
            out[k] = float(out[k])
    if f.max_tokens is not None and f.max_tokens > s.max_tokens_limit:
        raise APIError(400, f"max_tokens {f.max_tokens} exceeds this server's limit {s.max_tokens_limit} "
                            "(--max-tokens-limit)", param="max_tokens")
    if "stop" in out and out["stop"] is not None:
        stop = [out["stop"]] if isinstance(out["stop"], str) else list(out["stop"])
        if len(stop) > s.max_stop:
            raise APIError(400, f"{len(stop)} stop strings exceed the limit {s.max_stop} (--max-stop)", param="stop")
        if any(not x for x in stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        out["stop"] = stop
    if f.metadata is not None:
        if len(f.metadata) > MAX_METADATA:
            raise APIError(400, f"metadata has {len(f.metadata)} keys; at most {MAX_METADATA}", param="metadata")
        for k, v in f.metadata.items():
            if len(k) > 64 or len(v) > 512:
                raise APIError(400, f"metadata key {k[:70]!r}: keys are at most 64 characters, values 512",
                               param="metadata")
    if f.instructions:
        n = len(state.tokenizer(f.instructions, add_special_tokens=False)["input_ids"])
        limit = state.model.max_model_len
        if n >= limit:
            raise APIError(400, f"instructions are {n} tokens; this model's maximum context length is {limit}",
                           param="instructions", code="context_length_exceeded")
    return out


def _store(state: ServerState) -> AssistantStore:
    if state.assistants is None:
        raise APIError(503, "assistants need the adapter store, which this server runs without", code="no_store")
    return state.assistants.store


def _get(state: ServerState, key: str) -> Assistant:
    a = _store(state).get(key)
    if a is None:
        raise APIError(404, f"assistant '{key}' does not exist; GET /v1/assistants lists them",
                       param="assistant_id", code="assistant_not_found")
    return a


# ---- routes --------------------------------------------------------------------------------------------
def _state(request: Request) -> ServerState:
    return request.app.state.peft


@router.post("/v1/assistants")
async def create_assistant(body: AssistantFields, request: Request) -> dict[str, Any]:
    state = _state(request)
    store = _store(state)
    for f in ("name", "model"):
        if getattr(body, f) is None:
            raise APIError(400, f"{f} is required", param=f)
    assert body.name is not None and body.model is not None
    guards.check_new_name(request, body.name, "assistant")
    _check_name(state, body.name)
    _check_model_for(request, body.model)
    fields = _check_body(state, body, set(body.model_fields_set))
    # no await from the checks to the insert: no adapter can take the name or vanish in between
    try:
        a = store.create(body.name, body.model, **fields)
    except AssistantExists:
        raise APIError(409, f"an assistant named {body.name!r} already exists", param="name",
                       code="name_taken") from None
    guards.own(request, "assistant", a.id)
    log.info("assistant %s (%s) created on %s", a.name, a.id, a.model)
    return a.to_dict()


@router.get("/v1/assistants")
async def list_assistants(request: Request, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                          order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
                          after: str | None = None, before: str | None = None) -> dict[str, Any]:
    rows = [a for a in _store(_state(request)).list() if guards.sees_assistant(request, a)]
    if order == "desc":
        rows.reverse()
    for param, cursor in (("after", after), ("before", before)):
        if cursor is None:
            continue
        at = next((i for i, a in enumerate(rows) if cursor in (a.id, a.name)), None)
        if at is None:
            raise APIError(400, f"{param} {cursor!r} is not an assistant's id", param=param)
        rows = rows[at + 1:] if param == "after" else rows[:at]
        if param == "before":  # OpenAI: the page just before the cursor
            rows = rows[-limit:]
    page = rows[:limit]
    return {"object": "list", "data": [a.to_dict() for a in page],
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
            "has_more": len(rows) > limit}


@router.get("/v1/assistants/{assistant_id}")
async def show_assistant(assistant_id: str, request: Request) -> dict[str, Any]:
    return _get_visible(request, assistant_id).to_dict()


async def _modify(assistant_id: str, body: AssistantFields, request: Request) -> dict[str, Any]:
    state = _state(request)
    a = _get_visible(request, assistant_id)
    sent = set(body.model_fields_set)
    for f in ("name", "model"):
        if f in sent and getattr(body, f) is None:
            raise APIError(400, f"{f} cannot be null", param=f)
    if "name" in sent and body.name != a.name:
        assert body.name is not None
        guards.check_new_name(request, body.name, "assistant")
        _check_name(state, body.name, current=a)
    if "model" in sent:
        assert body.model is not None
        _check_model_for(request, body.model)
    changes = _check_body(state, body, sent)
    if "metadata" in changes and changes["metadata"] is None:
        changes["metadata"] = {}
    for f in ("name", "model"):
        if f in sent:
            changes[f] = getattr(body, f)
    try:
        new = _store(state).update(a.id, **changes)
    except KeyError:
        raise APIError(404, f"assistant '{assistant_id}' does not exist", param="assistant_id",
                       code="assistant_not_found") from None
    except AssistantExists:
        raise APIError(409, f"an assistant named {body.name!r} already exists", param="name",
                       code="name_taken") from None
    log.info("assistant %s (%s) updated: %s", new.name, new.id, ", ".join(sorted(changes)))
    return new.to_dict()


@router.post("/v1/assistants/{assistant_id}")
async def modify_assistant(assistant_id: str, body: AssistantFields, request: Request) -> dict[str, Any]:
    """OpenAI's modify (the `openai` client POSTs); PATCH does the same."""
    return await _modify(assistant_id, body, request)


@router.patch("/v1/assistants/{assistant_id}")
async def patch_assistant(assistant_id: str, body: AssistantFields, request: Request) -> dict[str, Any]:
    return await _modify(assistant_id, body, request)


@router.delete("/v1/assistants/{assistant_id}")
async def delete_assistant(assistant_id: str, request: Request) -> dict[str, Any]:
    state = _state(request)
    a = _get_visible(request, assistant_id)
    try:
        _store(state).delete(a.id)
    except KeyError:
        raise APIError(404, f"assistant '{assistant_id}' does not exist", param="assistant_id",
                       code="assistant_not_found") from None
    guards.disown(request, "assistant", a.id)
    log.info("assistant %s (%s) deleted", a.name, a.id)
    return {"id": a.id, "object": "assistant.deleted", "deleted": True, "name": a.name}

