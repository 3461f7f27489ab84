"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api import assistants
from server.api.context import STATE_KEY, GenerationContext
from server.api.errors import APIError, error_body
from server.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.api.state import ServerState
from server.api.structured import attach_guide, chat_prompt_text, no_template_param, tool_format, tool_mode
from server.engine.async_engine import CapacityError, Delta, EngineDeadError, StepError
from server.engine.prompt_logprobs import PromptLogprob
from server.engine.registry import AdapterHandle
from server.engine.sampler import SampleResult
from server.engine.sequence import SamplingParams
from server.tenants import guards

router = APIRouter()


def get_state(request: Request) -> ServerState:
    return request.app.state.peft


# ---- request → engine inputs ----------------------------------------------------------------------
async def resolve_model(state: ServerState, model: str | None) -> AdapterHandle | None:
    """The base model (None) or the named adapter, referenced until `release_model`; an unknown name is a
    404, never silently the base model. An assistant's name stands for its adapter (or the base)."""
    model = assistants.target(state, model)
    if model is None or model == state.base_name:
        return None
    try:
        handle = await state.registry.acquire(model)
    except Exception as e:  # noqa: BLE001 - files gone or corrupt since upload: say so, don't 500
        raise APIError(503, f"adapter '{model}' could not be loaded: {e}", param="model",
                       code="adapter_load_failed") from e
    if handle is None:
        raise model_not_found(model)
    return handle


def model_not_found(model: str | None) -> APIError:
    return APIError(404, f"The model '{model}' does not exist. GET /v1/models lists the base model "
                         "and every adapter.", param="model", code="model_not_found")


def guard_model(request: Request, body: Any) -> None:
    """Before anything reads the model (an assistant's defaults, a composition): what the key may not use
    is answered exactly as a name that does not exist (server/tenants)."""
    for i, item in enumerate(getattr(body, "adapters", None) or []):
        if not guards.sees_adapter(request, item.name):
            raise APIError(404, f"adapters[{i}].name: adapter {item.name!r} does not exist",
                           param=f"adapters[{i}].name", code="model_not_found")
    if body.adapters is None and not guards.may_use_model(request, body.model):
        raise model_not_found(body.model)


def release_model(state: ServerState, handle: AdapterHandle | None) -> None:
    if handle is not None:
        state.registry.release(handle)


def _num_virtual(adapter: AdapterHandle | None) -> int:
    """KV positions an adapter adds ahead of the prompt (virtual tokens, or a shared KV prefix)."""
    if adapter is None:
        return 0
    return adapter.adapter.virtual_tokens + adapter.adapter.prefix_tokens


def build_params(state: ServerState, body: SamplingFields, prompt_ids: list[int], adapter: AdapterHandle | None,
                 max_tokens: int | None, logprobs: int | None, prompt_param: str,
                 max_tokens_param: str = "max_tokens") -> SamplingParams:
    """Validate a request against the model and limits; errors name the field the client sent
    (`max_tokens_param`: chat's max_completion_tokens when that is what it used)."""
    s = state.settings
    mt = max_tokens_param
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", param=prompt_param)
    vocab = state.model.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param=prompt_param)
    limit = state.model.max_model_len
    virtual = _num_virtual(adapter)
    used = len(prompt_ids) + virtual
    if max_tokens is None:
        max_tokens = min(16 if isinstance(body, CompletionRequest) else limit - used, s.max_tokens_limit)
    echo = isinstance(body, CompletionRequest) and body.echo
    if max_tokens < (0 if echo else 1):  # echo with max_tokens 0 scores the prompt alone
        raise APIError(400, f"{mt} must be at least 1 (0 only with echo), got {max_tokens}", param=mt)
    if max_tokens > s.max_tokens_limit:
        raise APIError(400, f"{mt} {max_tokens} exceeds this server's limit {s.max_tokens_limit} "
                            "(--max-tokens-limit)", param=mt)
    extra = f" ({virtual} of them virtual tokens of adapter '{adapter.name}')" if virtual else ""
    if used >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens; the prompt has {used} "
                            f"tokens{extra}", param=prompt_param, code="context_length_exceeded")
    if used + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens; you requested "
                            f"{used + max_tokens} tokens ({used} in the prompt{extra}, {max_tokens} for the "
                            f"completion, {mt})", param=mt, code="context_length_exceeded")
    if not 1 <= body.n <= s.max_n:
        raise APIError(400, f"n must be between 1 and {s.max_n} (--max-n), got {body.n}", param="n")
    stop = body.stop_list()
    if len(stop) > s.max_stop:
        raise APIError(400, f"{len(stop)} stop strings exceed the limit {s.max_stop} (--max-stop)", param="stop")
    if any(not x for x in stop):
        raise APIError(400, "stop strings must not be empty", param="stop")
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens {body.min_tokens} exceeds {mt} {max_tokens}", param="min_tokens")
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        seed=body.seed, stop=tuple(stop), stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos, min_tokens=body.min_tokens, logprobs=logprobs,
    )


def _choice_params(params: SamplingParams, i: int) -> SamplingParams:
    if i == 0 or params.seed is None:
        return params
    return replace(params, seed=params.seed + i)


# ---- running choices ----------------------------------------------------------------------------
@dataclass
class ChoiceResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[SampleResult] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[PromptLogprob | None] | None = None
    cached_tokens: int = 0


async def _merge(gens: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave the choices' delta streams; closing this closes (aborts) all of them."""
    if len(gens) == 1:
        try:
            async for d in gens[0]:
                yield 0, d
        finally:  # closing us must abort the sequence now, not when the generator is garbage-collected
            await gens[0].aclose()
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, g: AsyncIterator[Delta]) -> None:
        try:
            async for d in g:
                await q.put((i, d))
        except BaseException as e:  # noqa: BLE001 - hand the failure to the consumer
            await q.put((i, e))
        finally:
            await q.put((i, done))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            i, item = await q.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _start(state: ServerState, prompt_ids: list[int], params: SamplingParams, adapter: AdapterHandle | None,
           n: int, request_id: str) -> list[AsyncIterator[Delta]]:
    return [state.engine.generate(prompt_ids, _choice_params(params, i), adapter, f"{request_id}-{i}")
            for i in range(n)]


def _engine_error(e: BaseException) -> APIError:
    if isinstance(e, CapacityError):
        return APIError(400, str(e), code="kv_cache_too_small")
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), code="engine_dead")
    if isinstance(e, StepError):
        return APIError(500, str(e), code="step_failed")
    return APIError(500, f"internal error: {e!r}", code="internal_error")


async def _collect(gens: list[AsyncIterator[Delta]], results: list[ChoiceResult]) -> list[ChoiceResult]:
    """Fill `results` (one per choice) from the choices' deltas; partial results stay if cancelled."""
    async with contextlib.aclosing(_merge(gens)) as merged:
        async for i, d in merged:
            r = results[i]
            r.text += d.text
            r.token_ids += d.token_ids
            r.logprobs += d.logprobs
            if d.prompt_logprobs is not None:
                r.prompt_logprobs = d.prompt_logprobs
            if d.finished:
                r.finish_reason = d.finish_reason
                r.cached_tokens = d.cached_tokens
    return results


async def _until_disconnect(request: Request, coro: Any) -> Any:
    """Await coro, but cancel it (which aborts its sequences) as soon as the client goes away."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise APIError(499, "client disconnected", code="client_closed")
    finally:
        if not task.done():
            task.cancel()


async def _run(state: ServerState, request: Request, adapter: AdapterHandle | None,
               gens: list[AsyncIterator[Delta]], ctx: GenerationContext) -> list[ChoiceResult]:
    """Collect every choice (aborting on disconnect), then release the adapter reference."""
    results = [ChoiceResult() for _ in gens]
    try:
        await _until_disconnect(request, _collect(gens, results))
        ctx.complete = True
        return results
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _engine_error(e) from e
    finally:
        ctx.completion_tokens = sum(len(r.token_ids) for r in results)
        release_model(state, adapter)


async def _releasing(state: ServerState, adapter: AdapterHandle | None,
                     events: AsyncGenerator[str, None]) -> AsyncIterator[str]:
    """The SSE stream; when it ends or the client goes, abort the sequences first, then release the adapter."""
    try:
        async for e in events:
            yield e
    finally:
        await events.aclose()
        release_model(state, adapter)


# ---- formatting ---------------------------------------------------------------------------------
def _tok_str(tok: Any, tid: int) -> str:
    return tok.decode([tid])


def completion_logprobs(tok: Any, lps: list[SampleResult]) -> dict[str, Any]:
    tokens, offsets, text_len = [], [], 0
    for r in lps:
        s = _tok_str(tok, r.token_id)
        tokens.append(s)
        offsets.append(text_len)
        text_len += len(s)
    return {
        "tokens": tokens,
        "token_logprobs": [r.logprob for r in lps],
        "top_logprobs": [
            {_tok_str(tok, t): lp for t, lp in (r.top_logprobs or [])} if r.top_logprobs is not None else None
            for r in lps
        ],
        "text_offset": offsets,
    }


def chat_logprobs(tok: Any, lps: list[SampleResult]) -> dict[str, Any]:
    def entry(tid: int, lp: float) -> dict[str, Any]:
        s = _tok_str(tok, tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {"content": [
        {**entry(r.token_id, r.logprob or 0.0), "top_logprobs": [entry(t, lp) for t, lp in (r.top_logprobs or [])]}
        for r in lps
    ]}


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens` = prompt tokens the prefix cache served (the most any choice got)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# ---- routes -------------------------------------------------------------------------------------
@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = get_state(request)
    data = [{"id": state.base_name, "object": "model", "created": state.created, "owned_by": "peftserve",
             "root": state.base_name, "parent": None, "max_model_len": state.model.max_model_len}]
    for name in state.registry.names():
        e = state.registry.entry(name)
        if e is None:
            continue
        data.append({"id": name, "object": "model", "created": state.created, "owned_by": "peftserve",
                     "root": name, "parent": state.base_name, "adapter_type": e.kind, "version": e.version})
    data += assistants.models(state)
    return {"object": "list", "data": [d for d in data if guards.may_use_model(request, d["id"])]}


def _encode_prompt(state: ServerState, prompt: Any) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(x, str | list) for x in prompt):
        if len(prompt) != 1:
            raise APIError(400, f"batched prompts are not supported: got {len(prompt)} prompts; send one "
                                "request per prompt", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return state.tokenizer(prompt)["input_ids"]
    return list(prompt)


@dataclass(frozen=True)
class _Format:
    """How one route (completions or chat) shapes its choices; everything else is shared."""

    id_prefix: str
    obj: str  # object of the whole response
    chunk_obj: str  # object of a streamed chunk
    delta_choice: Callable[[int, Delta], dict[str, Any]]
    final_choice: Callable[[int, ChoiceResult], dict[str, Any]]
    prelude: Callable[[int], dict[str, Any]] | None = None  # first streamed chunk of each choice


async def _serve(request: Request, body: SamplingFields, prompt_ids: list[int], max_tokens: int | None,
                 logprobs: int | None, prompt_param: str, fmt: Callable[[Any], _Format],
                 max_tokens_param: str = "max_tokens", prompt_logprobs: int | None = None) -> Any:
    """Resolve the adapter, validate, run the choices, answer as JSON or SSE. The adapter reference is
    held until the last choice ends (for a stream: until the stream closes). What the request log and
    metrics need goes on `request.state` (server.api.context) as it becomes known."""
    state = get_state(request)
    ctx = GenerationContext(model=body.model)
    setattr(request.state, STATE_KEY, ctx)
    adapter = await (state.composer.acquire(body) if body.composes else resolve_model(state, body.model))
    ctx.resolved, ctx.adapter = True, adapter.name if adapter is not None else None
    try:
        params = build_params(state, body, prompt_ids, adapter, max_tokens, logprobs, prompt_param, max_tokens_param)
        if prompt_logprobs is not None:
            params = replace(params, prompt_logprobs=prompt_logprobs)
        params = await attach_guide(state, body, params)  # response_format / guided_* / tool_choice grammar
        f = fmt(state.tokenizer)
        rid = f"{f.id_prefix}-{uuid.uuid4().hex}"
        ctx.response_id, ctx.prompt_tokens, ctx.completion_tokens = rid, len(prompt_ids), 0
        created = int(time.time())
        model = body.model or state.base_name

        def envelope(obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
            return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}

        gens = _start(state, prompt_ids, params, adapter, body.n, rid)
    except BaseException:
        release_model(state, adapter)
        raise

    if body.stream:
        if state.engine.dead is not None:  # answer 503 now rather than a 200 whose stream carries the error
            release_model(state, adapter)
            raise _engine_error(EngineDeadError(f"engine stopped: {state.engine.dead!r}"))

        async def events() -> AsyncGenerator[str, None]:
            completion_tokens = cached_tokens = 0
            ctx.streaming = True
            if f.prelude is not None:
                for i in range(body.n):
                    yield _sse(envelope(f.chunk_obj, [f.prelude(i)]))
            try:
                async with contextlib.aclosing(_merge(gens)) as merged:
                    async for i, d in merged:
                        completion_tokens += len(d.token_ids)
                        cached_tokens = max(cached_tokens, d.cached_tokens)
                        ctx.completion_tokens = completion_tokens
                        choice = f.delta_choice(i, d)
                        if body.return_token_ids:
                            choice["token_ids"] = d.token_ids
                        yield _sse(envelope(f.chunk_obj, [choice]))
            except Exception as e:  # noqa: BLE001 - report in-band, the status line is already sent
                err = _engine_error(e)
                yield _sse(error_body(err.status, err.message, code=err.code))
            ctx.complete = True
            if body.stream_options and body.stream_options.include_usage:
                usage = _usage(len(prompt_ids), completion_tokens, cached_tokens)
                yield _sse({**envelope(f.chunk_obj, []), "usage": usage})
            yield "data: [DONE]\n\n"

        return StreamingResponse(_releasing(state, adapter, events()), media_type="text/event-stream")

    results = await _run(state, request, adapter, gens, ctx)
    choices = []
    for i, r in enumerate(results):
        c = f.final_choice(i, r)
        if body.return_token_ids:
            c["token_ids"] = r.token_ids
        choices.append(c)
    resp = envelope(f.obj, choices)
    resp["usage"] = _usage(len(prompt_ids), sum(len(r.token_ids) for r in results),
                           max(r.cached_tokens for r in results))
    if body.return_token_ids:
        resp["prompt_token_ids"] = prompt_ids
    return JSONResponse(resp)


def _echo_entries(prompt_ids: list[int], scored: list[PromptLogprob | None] | None,
                  top_n: int) -> list[SampleResult]:
    """The prompt's part of an echoed `logprobs`: the first token's logprob is null (no context)."""
    out = [SampleResult(prompt_ids[0])]
    for e in (scored or [None])[1:]:
        if e is not None:
            out.append(SampleResult(e.token_id, e.logprob, (e.top_logprobs or [])[:top_n] if top_n else None))
    return out


def vllm_prompt_logprobs(tok: Any, scored: list[PromptLogprob | None], top_n: int) -> list[Any]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}} holding the prompt token and the top `top_n`."""
    out: list[Any] = []
    for e in scored:
        if e is None:
            out.append(None)
            continue
        d = {str(e.token_id): {"logprob": e.logprob, "rank": e.rank, "decoded_token": _tok_str(tok, e.token_id)}}
        for rank, (t, lp) in enumerate((e.top_logprobs or [])[:top_n], start=1):
            d.setdefault(str(t), {"logprob": lp, "rank": rank, "decoded_token": _tok_str(tok, t)})
        out.append(d)
    return out


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    state = get_state(request)
    guard_model(request, body)
    body = assistants.apply(state, body, request)  # an assistant's defaults (its instructions: chat only)
    prompt_ids = _encode_prompt(state, body.prompt)
    echo, top_n = body.echo, body.logprobs or 0
    def fmt(tok: Any) -> _Format:  # called once the prompt's token ids are validated
        prompt_text = ""
        if echo:  # the prompt as the client sent it (a string), or its tokens decoded
            p = body.prompt[0] if isinstance(body.prompt, list) and body.prompt and not isinstance(
                body.prompt[0], int) else body.prompt
            prompt_text = p if isinstance(p, str) else tok.decode(prompt_ids)
        echoed: set[int] = set()  # streamed choices whose first chunk carried the prompt

        def lp(x: list[SampleResult]) -> dict[str, Any] | None:
            return completion_logprobs(tok, x) if body.logprobs is not None else None

        def choice(i: int, text: str, lps: list[SampleResult], finish: str | None,
                   scored: list[PromptLogprob | None] | None, first: bool) -> dict[str, Any]:
            if echo and first:
                text = prompt_text + text
                lps = _echo_entries(prompt_ids, scored, top_n) + lps
            c = {"index": i, "text": text, "finish_reason": finish, "logprobs": lp(lps)}
            if body.prompt_logprobs is not None and scored is not None:
                c["prompt_logprobs"] = vllm_prompt_logprobs(tok, scored, body.prompt_logprobs)
            return c

        def delta_choice(i: int, d: Delta) -> dict[str, Any]:
            first = i not in echoed
            echoed.add(i)
            return choice(i, d.text, d.logprobs, d.finish_reason, d.prompt_logprobs, first)

        return _Format(
            "cmpl", "text_completion", "text_completion", delta_choice=delta_choice,
            final_choice=lambda i, r: choice(i, r.text, r.logprobs, r.finish_reason, r.prompt_logprobs, True),
        )

    scored_n = max(top_n, body.prompt_logprobs or 0) if body.scores_prompt else None
    return await _serve(request, body, prompt_ids, body.max_tokens, body.logprobs, "prompt", fmt,
                        prompt_logprobs=scored_n)


def render_chat(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    tok = state.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions",
                       param=no_template_param(body))
    text = chat_prompt_text(tok, body)  # tools and tool messages: server/api/structured.py
    return tok(text, add_special_tokens=False)["input_ids"]


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    def fmt(tok: Any) -> _Format:
        def lp(x: list[SampleResult]) -> dict[str, Any] | None:
            return chat_logprobs(tok, x) if body.logprobs else None

        return _Format(
            "chatcmpl", "chat.completion", "chat.completion.chunk",
            delta_choice=lambda i, d: {"index": i, "delta": {"content": d.text} if d.text else {},
                                       "finish_reason": d.finish_reason, "logprobs": lp(d.logprobs)},
            final_choice=lambda i, r: {"index": i, "message": {"role": "assistant", "content": r.text},
                                       "finish_reason": r.finish_reason, "logprobs": lp(r.logprobs)},
            prelude=lambda i: {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                               "logprobs": None},
        )

    guard_model(request, body)
    body = assistants.apply(get_state(request), body, request)  # instructions first, defaults where unset
    prompt_ids = render_chat(get_state(request), body)
    fmt = tool_format(tool_mode(body), fmt)  # tool_calls in choices and stream deltas
    use_mct = body.max_completion_tokens is not None
    max_tokens = body.max_completion_tokens if use_mct else body.max_tokens
    top = body.top_logprobs or 0
    return await _serve(request, body, prompt_ids, max_tokens, top if body.logprobs else None, "messages", fmt,
                        "max_completion_tokens" if use_mct else "max_tokens")
