"""The API side of structured output and tool calling (issue 13): request fields → one grammar, chat
rendering with tools, and tool calls in responses and streams. openai.py calls in at three hooks:
`render_chat` (chat_prompt_text), `_serve` (attach_guide) and the chat format (tool_format)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from server.api.errors import APIError
from server.engine.sequence import SamplingParams
from server.structured.grammar import GrammarError, GuideSpec, compiler_for
from server.structured.tools import (
    HERMES_OPEN,
    PYTHON_TAG,
    ToolError,
    ToolMode,
    new_call_id,
    parse_tools,
    template_messages,
    template_renders_tools,
)


def tool_mode(body: Any) -> ToolMode | None:
    """The request's tools and tool_choice, validated (chat only; None without tools)."""
    if not hasattr(body, "tools"):
        return None
    try:
        return parse_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    except ToolError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_value") from e


def guide_spec(body: Any) -> tuple[GuideSpec, str] | None:
    """The one grammar the request asks for and the field that asked, or None (free text)."""
    found: list[tuple[GuideSpec, str]] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        found.append((GuideSpec("json_object"), "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise APIError(400, "response_format type 'json_schema' needs json_schema.schema (a JSON schema object)",
                           param="response_format.json_schema.schema", code="invalid_value")
        found.append((GuideSpec.json_schema(rf.json_schema.schema_), "response_format.json_schema.schema"))
    if body.guided_json is not None:
        schema = body.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise APIError(400, f"guided_json is not valid JSON: {e}", param="guided_json") from e
        if not isinstance(schema, dict):
            raise APIError(400, "guided_json must be a JSON schema object", param="guided_json")
        found.append((GuideSpec.json_schema(schema), "guided_json"))
    if body.guided_regex is not None:
        found.append((GuideSpec("regex", body.guided_regex), "guided_regex"))
    if body.guided_choice is not None:
        if not body.guided_choice or any(not c for c in body.guided_choice):
            raise APIError(400, "guided_choice must be a non-empty list of non-empty strings", param="guided_choice")
        found.append((GuideSpec.choice(body.guided_choice), "guided_choice"))
    if body.guided_grammar is not None:
        found.append((GuideSpec("grammar", body.guided_grammar), "guided_grammar"))
    mode = tool_mode(body)
    if mode is not None and (g := mode.guide()) is not None:
        found.append((g, "tool_choice"))
    if len(found) > 1:
        raise APIError(400, f"{found[1][1]} cannot be combined with {found[0][1]}: a request takes one output "
                            "constraint", param=found[1][1].split(".")[0], code="invalid_value")
    return found[0] if found else None


async def attach_guide(state: Any, body: Any, params: SamplingParams) -> SamplingParams:
    """`params` with the request's compiled grammar (compiled off the event loop, cached per distinct spec);
    a spec the engine cannot compile is a 400 naming the field."""
    got = guide_spec(body)
    if got is None:
        return params
    spec, param = got
    m = state.model
    compiler = await asyncio.to_thread(compiler_for, state.tokenizer, m.vocab_size, sorted(m.eos_token_ids))
    try:
        guide = await asyncio.to_thread(compiler.compile, spec)
    except GrammarError as e:
        if param == "tool_choice":
            param = await asyncio.to_thread(_bad_tool_param, compiler, tool_mode(body))
        raise APIError(400, f"{param} cannot be compiled into a grammar: {e}", param=param,
                       code="invalid_schema") from e
    return replace(params, guide=guide)


def _bad_tool_param(compiler: Any, mode: ToolMode | None) -> str:
    """The first tool whose parameters schema does not compile alone (for the error's param)."""
    for i, t in enumerate(mode.tools if mode is not None else ()):
        try:
            compiler.compile(GuideSpec.json_schema(t.parameters))
        except GrammarError:
            return f"tools[{i}].function.parameters"
    return "tools"


# ---- chat rendering -------------------------------------------------------------------------------------
def no_template_param(body: Any) -> str:
    """The field to name when a model without a chat template gets a chat request."""
    rf = getattr(body, "response_format", None)
    if rf is not None and rf.type != "text":
        return "response_format"
    return "tools" if getattr(body, "tools", None) else "messages"


def chat_prompt_text(tokenizer: Any, body: Any) -> str:
    """The chat template applied to the messages, with the request's tools (see server.structured.tools)."""
    mode = tool_mode(body)
    msgs = []
    for m in body.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": c.function.arguments}}
                               for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
        msgs.append(d)
    renders = template_renders_tools(tokenizer)
    kw = {"tools": [t.openai() for t in mode.tools]} if mode is not None and renders else {}
    try:
        return tokenizer.apply_chat_template(template_messages(msgs, mode, renders), tokenize=False,
                                             add_generation_prompt=body.add_generation_prompt, **kw)
    except Exception as e:  # noqa: BLE001 - jinja raises its own errors for messages a template refuses
        if type(e).__module__.startswith("jinja2"):
            raise APIError(400, f"the model's chat template refused these messages: {e}", param="messages") from e
        raise


# ---- tool calls in responses ----------------------------------------------------------------------------
def tool_format(mode: ToolMode | None, make_format: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap the chat route's format so choices carry `tool_calls` (and finish_reason tool_calls)."""
    if mode is None or mode.mode == "none":
        return make_format

    def make(tok: Any) -> Any:
        f = make_format(tok)
        streams: dict[int, ToolStream] = {}

        def delta_choice(i: int, d: Any) -> dict[str, Any]:
            c = f.delta_choice(i, d)
            c["delta"], c["finish_reason"] = streams.setdefault(i, ToolStream(mode)).feed(
                d.text, d.finished, d.finish_reason)
            return c

        def final_choice(i: int, r: Any) -> dict[str, Any]:
            c = f.final_choice(i, r)
            content, calls = mode.parse(r.text)
            if calls:
                c["message"] = {"role": "assistant", "content": content,
                                "tool_calls": [tc.openai() for tc in calls]}
                c["finish_reason"] = "tool_calls"
            return c

        return replace(f, delta_choice=delta_choice, final_choice=final_choice)

    return make


class ToolStream:
    """One streamed choice in tool mode. Named choice streams the arguments as they come; `required` and
    `auto` hold back what may be a call (auto streams plain content up to a `<tool_call>` tag, holding a
    tail that could begin one) and send the parsed calls with the last chunk."""

    def __init__(self, mode: ToolMode) -> None:
        self.mode = mode
        self.buf = ""
        self.sent = 0  # chars of buf already sent as content
        self.call_id: str | None = None

    def feed(self, text: str, finished: bool, reason: str | None) -> tuple[dict[str, Any], str | None]:
        self.buf += text
        if self.mode.mode == "named":
            return self._named(text, finished, reason)
        if not finished:
            return self._content(self._safe_upto()), None
        content, calls = self.mode.parse(self.buf)
        if not calls:
            return self._content(len(self.buf)), reason
        cut = self.buf.find(HERMES_OPEN)
        delta = self._content(cut) if cut > 0 else {}
        delta["tool_calls"] = [tc.openai(index=k) for k, tc in enumerate(calls)]
        return delta, "tool_calls"

    def _named(self, text: str, finished: bool, reason: str | None) -> tuple[dict[str, Any], str | None]:
        fn: dict[str, Any] = {"arguments": text}
        call: dict[str, Any] = {"index": 0, "function": fn}
        if self.call_id is None:
            self.call_id = new_call_id()
            call.update(id=self.call_id, type="function")
            fn["name"] = self.mode.name
        elif not text:
            call = {}
        if finished and self.mode.parse(self.buf)[1]:
            reason = "tool_calls"
        return ({"tool_calls": [call]} if call else {}), reason

    def _content(self, upto: int) -> dict[str, Any]:
        if upto <= self.sent:
            return {}
        out, self.sent = self.buf[self.sent:upto], upto
        return {"content": out}

    def _safe_upto(self) -> int:
        """How much of buf can go out as content now (auto); 0 while the output may be one JSON call."""
        if self.mode.mode != "auto":
            return 0
        head = self.buf.lstrip()
        if not head or head.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(head):
            return self.sent
        cut = self.buf.find(HERMES_OPEN)
        if cut >= 0:
            return max(cut, self.sent)
        for k in range(min(len(HERMES_OPEN) - 1, len(self.buf)), 0, -1):  # a tail that may start the tag
            if HERMES_OPEN.startswith(self.buf[-k:]):
                return max(len(self.buf) - k, self.sent)
        return len(self.buf)
