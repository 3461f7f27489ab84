"""Tool calling: rendering tools into the prompt, the grammars for `required`/named choice, and parsing
the model's tool-call syntax into OpenAI `tool_calls`.

Families parsed for `tool_choice: auto` (tried in this order on the whole output):
- Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, text before the
  first one is the message content (an unterminated last block at the end of the output is accepted);
- Llama-3 JSON: the whole output (optionally after `<|python_tag|>`) is `{"name": ..., "parameters": {...}}`
  or several such objects separated by `;`.
A call is only recognised for a function the request offered. Anything else is plain content.

A chat template that does not render `tools` itself (SmolLM2's ChatML, for one) gets them in the system
message in the Hermes syntax, assistant tool calls rendered back as `<tool_call>` blocks and tool results as
`<tool_response>` user turns, so one parser reads what such a model was told to write.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from server.structured.grammar import GuideSpec

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_HERMES_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class ToolError(ValueError):
    """A bad tools / tool_choice value; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        f: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            f["description"] = self.description
        return {"type": "function", "function": f}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def openai(self, index: int | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"id": new_call_id(), "type": "function",
                             "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            d = {"index": index, **d}
        return d


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolMode:
    """What the request asked of tools: mode none | auto | required | named (then `name`)."""

    mode: str
    tools: tuple[Tool, ...]
    name: str | None = None
    parallel: bool = True

    def guide(self) -> GuideSpec | None:
        """The grammar that forces a valid call (required / named), None for auto and none."""
        if self.mode == "named":
            tool = next(t for t in self.tools if t.name == self.name)
            return GuideSpec.json_schema(tool.parameters)
        if self.mode == "required":
            calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                      "required": ["name", "arguments"]} for t in self.tools]
            schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                                      "minItems": 1}
            if not self.parallel:
                schema["maxItems"] = 1
            return GuideSpec.json_schema(schema)
        return None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished output; no calls when the output is not a complete call."""
        if self.mode == "named":
            obj = _loads(text)
            return (None, [ToolCall(self.name or "", _dumps(obj))]) if isinstance(obj, dict) else (text, [])
        if self.mode == "required":
            arr = _loads(text)
            if isinstance(arr, list) and arr and all(isinstance(c, dict) and "name" in c for c in arr):
                return None, [ToolCall(c["name"], _dumps(c.get("arguments", {}))) for c in arr]
            return text, []
        if self.mode == "auto":
            return parse_auto(text, {t.name for t in self.tools})
        return text, []


def parse_tools(raw: list[Any] | None, tool_choice: Any, parallel: bool) -> ToolMode | None:
    """Validate the request's tools and tool_choice (pydantic-parsed objects or plain dicts)."""
    if not raw:
        if tool_choice not in (None, "none"):
            raise ToolError(f"tool_choice {_choice_str(tool_choice)} needs tools; none were given", "tool_choice")
        return None
    tools: list[Tool] = []
    for i, t in enumerate(raw):
        f = _get(t, "function")
        name, params = _get(f, "name"), _get(f, "parameters")
        if not isinstance(params, dict):
            raise ToolError(f"tool '{name}' has no parameters JSON schema (an object schema is required, "
                            "e.g. {\"type\": \"object\", \"properties\": {}})", f"tools[{i}].function.parameters")
        if any(x.name == name for x in tools):
            raise ToolError(f"two tools are named '{name}'", f"tools[{i}].function.name")
        tools.append(Tool(name, _get(f, "description"), params))
    if tool_choice is None or isinstance(tool_choice, str):
        return ToolMode(tool_choice or "auto", tuple(tools), parallel=parallel)
    name = _get(_get(tool_choice, "function"), "name")
    if name not in {t.name for t in tools}:
        raise ToolError(f"tool_choice names function '{name}', which is not among the tools "
                        f"({', '.join(t.name for t in tools)})", "tool_choice")
    return ToolMode("named", tuple(tools), name, parallel)


def parse_auto(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """Hermes/Qwen `<tool_call>` blocks, else Llama-3 JSON; (content, calls)."""
    if HERMES_OPEN in text:
        calls = []
        for body in _HERMES_RE.findall(text):
            obj = _loads(body)
            call = _as_call(obj, names)
            if call is None:
                return text, []
            calls.append(call)
        if calls:
            content = text[:text.index(HERMES_OPEN)].strip()
            return content or None, calls
        return text, []
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    if body.startswith("{"):
        objs = [_loads(body)] if _loads(body) is not None else [_loads(p) for p in body.split(";")]
        calls = [_as_call(o, names) for o in objs]
        if calls and all(c is not None for c in calls):
            return None, [c for c in calls if c is not None]
    return text, []


def _as_call(obj: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        args = _loads(args)
    return ToolCall(obj["name"], _dumps(args)) if isinstance(args, dict) else None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _choice_str(choice: Any) -> str:
    return repr(choice) if isinstance(choice, str) else f"{{function: {_get(_get(choice, 'function'), 'name')}}}"


# ---- rendering ------------------------------------------------------------------------------------------
def template_renders_tools(tokenizer: Any) -> bool:
    tpl = getattr(tokenizer, "chat_template", None)
    return isinstance(tpl, str) and "tools" in tpl


def hermes_system_block(tools: tuple[Tool, ...]) -> str:
    defs = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to assist with the user query. The function signatures are "
            f"within <tools></tools> XML tags:\n<tools>\n{defs}\n</tools>\nFor each function call, return a "
            "json object with the function name and arguments within <tool_call></tool_call> XML tags:\n"
            "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")


def template_messages(messages: list[dict[str, Any]], mode: ToolMode | None,
                      renders_tools: bool) -> list[dict[str, Any]]:
    """Messages as the chat template gets them. `messages` are dicts with role, content (text) and, where
    given, tool_calls ([{id, function: {name, arguments (JSON text)}}]), tool_call_id, name."""
    if renders_tools:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):  # templates index arguments as a mapping (Qwen, Llama 3 `| tojson`)
                m["tool_calls"] = [{"id": c.get("id"), "type": "function", "function": {
                    "name": c["function"]["name"],
                    "arguments": _loads(c["function"]["arguments"]) or {}}} for c in m["tool_calls"]]
            out.append(m)
        return out
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if m.get("tool_calls"):
            blocks = [f"{HERMES_OPEN}\n" + _dumps({"name": c["function"]["name"],
                                                   "arguments": _loads(c["function"]["arguments"])})
                      + f"\n{HERMES_CLOSE}" for c in m["tool_calls"]]
            content = "\n".join(([content] if content else []) + blocks)
        if role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": role, "content": content})
    if mode is not None:
        block = hermes_system_block(mode.tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out
