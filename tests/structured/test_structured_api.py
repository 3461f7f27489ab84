"""Structured output on a tiny random model over HTTP: the bad-input table (400 naming the field), guided
requests through chunked prefill and preemption-by-recompute (same tokens as alone, still valid), tool
messages rendered into the prompt, and the tool-call parsers and stream assembler on their own."""

from __future__ import annotations

import asyncio
import json
import os
import random

import httpx
import jsonschema
import pytest

from server.api.schemas import ChatCompletionRequest
from server.api.structured import ToolStream, chat_prompt_text
from server.engine.async_engine import EngineObserver, RequestStats
from server.structured.tools import ToolMode, parse_auto, parse_tools
from tests.e2e.test_chat_edges import _without_chat_template
from tests.server_utils import LiveServer, live_server
from tests.tiny import make_tiny_checkpoint, tiny_tokenizer
from tests.waits import EngineGate, async_wait_for, engine_settled, wait_for

CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
ENUMS = {"type": "object", "properties": {"a": {"enum": ["x", "yy"]}, "b": {"type": "boolean"},
                                          "c": {"enum": [1, 22]}}, "required": ["a", "b", "c"]}
TOOL = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def base(tiny_root: str) -> str:
    return make_tiny_checkpoint(tiny_root, "llama", seed=31, max_position_embeddings=1024)  # byte-level tool prompts


@pytest.fixture(scope="module")
def srv(base: str):
    with live_server(model=base, max_model_len=1024, kv_cache_blocks=160, block_size=8) as s:  # byte tokens
        yield s


BAD = [
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema"),
    (CMPL, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    (CMPL, {"guided_regex": "(unclosed"}, "guided_regex"),
    (CMPL, {"guided_grammar": "root ::= nowhere"}, "guided_grammar"),
    (CMPL, {"guided_json": "{not json"}, "guided_json"),
    (CMPL, {"guided_choice": []}, "guided_choice"),
    (CMPL, {"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].function.parameters"),
    (CHAT, {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    (CHAT, {"tool_choice": "required"}, "tool_choice"),
    (CHAT, {"tools": [TOOL], "tool_choice": "maybe"}, "tool_choice"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "g", "parameters": {"type": "strin"}}}],
            "tool_choice": "required"}, "tools[0].function.parameters"),
    (CHAT, {"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
]


@pytest.mark.parametrize(("route", "extra", "param"), BAD, ids=[b[2] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_field(srv: LiveServer, route: str, extra: dict, param: str) -> None:
    body = {"max_tokens": 4, **({"messages": MSG} if route == CHAT else {"prompt": "hi"}), **extra}
    r = httpx.post(srv.url + route, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param), r.json()


def test_json_mode_without_a_chat_template_names_response_format(base: str, tiny_root: str) -> None:
    plain = _without_chat_template(base, os.path.join(tiny_root, "tiny-structured-no-template"))
    with live_server(model=plain, max_model_len=64, kv_cache_blocks=16, block_size=8) as s:
        r = httpx.post(s.url + CHAT, json={"messages": MSG, "response_format": {"type": "json_object"}}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
        r = httpx.post(s.url + CHAT, json={"messages": MSG, "tools": [TOOL]}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text


def test_guided_outputs_on_both_routes(srv: LiveServer) -> None:
    """A random model writes noise; the grammar makes it a valid document anyway (and EOS ends it)."""
    with srv.client() as c:
        r = c.post(CMPL, json={"prompt": "q", "max_tokens": 40, "temperature": 0, "guided_json": ENUMS})
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), ENUMS)
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        free = c.post(CMPL, json={"prompt": "q", "max_tokens": 20, "temperature": 0}).json()["choices"][0]["text"]
        assert not free.startswith("{"), "the free output already was JSON: the test shows nothing"
        r = c.post(CHAT, json={"messages": MSG, "max_tokens": 20, "temperature": 0.9, "seed": 3,
                               "guided_choice": ["alpha", "beta"], "n": 3})
        assert [ch["message"]["content"] in ("alpha", "beta") for ch in r.json()["choices"]] == [True] * 3
        r = c.post(CMPL, json={"prompt": "q", "max_tokens": 20, "temperature": 0, "guided_regex": "[0-9]{2}-[a-c]"})
        assert r.json()["choices"][0]["text"][:2].isdigit() and len(r.json()["choices"][0]["text"]) == 4


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.preemptions: dict[str, int] = {}

    def on_request_done(self, stats: RequestStats) -> None:
        self.preemptions[stats.request_id] = stats.num_preemptions


def test_guided_requests_survive_chunked_prefill_and_preemption(base: str) -> None:
    """5-token steps (prompts prefilled in chunks) and a 13-block cache: guided sequences are preempted and
    recomputed, and still give the tokens they give alone, greedy and seeded-sampled."""
    rng = random.Random(5)
    jobs = [({"guided_json": ENUMS} if k % 2 == 0 else {"guided_choice": ["yes", "no", "perhaps"]})
            | ({"temperature": 1.0, "seed": 40 + k} if k % 3 == 0 else {"temperature": 0})
            | {"prompt": [rng.randrange(256) for _ in range(rng.randint(4, 10))]} for k in range(8)]
    with live_server(model=base, max_model_len=48, block_size=4, kv_cache_blocks=13, max_batch_tokens=5,
                     max_num_seqs=4) as s:
        eng = s.state.engine
        rec = Recorder()
        eng.observers.append(rec)
        with s.client() as c:
            alone = [c.post(CMPL, json={"max_tokens": 32, "return_token_ids": True, **j}).json() for j in jobs]
        assert not any(rec.preemptions.values())

        async def fire() -> list[httpx.Response]:
            async with s.async_client() as ac:
                gate = EngineGate(eng)
                try:
                    primer = asyncio.create_task(ac.post(CMPL, json={"prompt": [1], "max_tokens": 1}))
                    await async_wait_for(gate.entered.is_set, "the primer's step to reach the gate")
                    tasks = []
                    for k, j in enumerate(jobs):
                        tasks.append(asyncio.create_task(ac.post(CMPL, json={"max_tokens": 32,
                                                                             "return_token_ids": True, **j})))
                        await async_wait_for(lambda k=k: eng.in_flight == k + 2, f"request {k} to reach the engine")
                finally:
                    gate.open()
                assert (await primer).status_code == 200
                return await asyncio.gather(*tasks)

        resps = asyncio.run(fire())
        wait_for(engine_settled(eng), "every KV block to be free again")
    preempted = 0
    for j, a, r in zip(jobs, alone, resps, strict=True):
        got = r.json()
        assert got["choices"][0]["token_ids"] == a["choices"][0]["token_ids"], j
        text = got["choices"][0]["text"]
        if "guided_json" in j:
            jsonschema.validate(json.loads(text), ENUMS)
        else:
            assert text in ("yes", "no", "perhaps")
        preempted += rec.preemptions[got["id"] + "-0"] > 0
    assert preempted >= 2, rec.preemptions


def test_tool_messages_and_tools_are_rendered(srv: LiveServer) -> None:
    """A template without tools (the tiny ChatML-like one) gets the Hermes system block, the assistant's
    call as a <tool_call> block and the result as a <tool_response>; the request is served (200)."""
    conv = [{"role": "user", "content": "add 2 and 3"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = httpx.post(srv.url + CHAT, json={"messages": conv, "tools": [TOOL], "max_tokens": 3, "temperature": 0,
                                         "return_token_ids": True}, timeout=60)
    assert r.status_code == 200, r.text
    prompt = tiny_tokenizer().decode(r.json()["prompt_token_ids"])
    assert "<tools>" in prompt and '"name": "add"' in prompt
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in prompt
    assert "<tool_response>\n5\n</tool_response>" in prompt


def test_a_template_that_renders_tools_gets_them_and_mapping_arguments() -> None:
    tok = tiny_tokenizer()
    tok.chat_template = ("{% if tools %}TOOLS {% for t in tools %}{{ t.function.name }}{% endfor %}\n{% endif %}"
                         "{% for m in messages %}{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %}"
                         "CALL {{ c.function.name }} {{ c.function.arguments.a }}{% endfor %}\n{% endfor %}")
    body = ChatCompletionRequest(messages=[
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "add", "arguments": '{"a": 7}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "7"}], tools=[TOOL])
    text = chat_prompt_text(tok, body)
    assert text.startswith("TOOLS add") and "CALL add 7" in text and "tool: 7" in text


# ---- parsers and the stream assembler ---------------------------------------------------------------------
MODE = parse_tools([TOOL, {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}], "auto", True)


@pytest.mark.parametrize(("text", "content", "calls"), [
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', None, [("add", {"a": 1, "b": 2})]),
    ('Sure.\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n<tool_call>{"name": '
     '"get_weather", "arguments": {"city": "Oslo"}}</tool_call>', "Sure.",
     [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})]),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', None, [("add", {"a": 1, "b": 2})]),  # cut at EOS
    ('{"name": "get_weather", "parameters": {"city": "Rome"}}', None, [("get_weather", {"city": "Rome"})]),
    ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", "parameters": {"a": 3, "b": 4}}',
     None, [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]),
    ('{"name": "unknown_fn", "parameters": {}}', '{"name": "unknown_fn", "parameters": {}}', []),
    ('<tool_call>{"name": "add", "arguments": {"a": 1,', '<tool_call>{"name": "add", "arguments": {"a": 1,', []),
    ("Just text.", "Just text.", []),
])
def test_auto_parser(text: str, content: str | None, calls: list) -> None:
    got_content, got = parse_auto(text, {"add", "get_weather"})
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls


@pytest.mark.parametrize("pieces", [
    ["Let me check. ", "<tool", '_call>{"name": "add", ', '"arguments": {"a": 1, "b": 2}}</tool_call>'],
    ['{"name": "get_', 'weather", "parameters": {"city": "Rome"}}'],
    ["Plain ", "answer <to", "o."],
])
def test_tool_stream_sends_content_before_the_call_and_calls_at_the_end(pieces: list[str]) -> None:
    s = ToolStream(MODE)
    deltas, reason = [], None
    for k, p in enumerate(pieces):
        d, reason = s.feed(p, k == len(pieces) - 1, "stop" if k == len(pieces) - 1 else None)
        deltas.append(d)
    text = "".join(pieces)
    content, calls = MODE.parse(text)
    streamed = "".join(d.get("content", "") for d in deltas)
    assert "<tool" not in streamed and "{" not in streamed
    assert streamed.strip() == (content or "").strip() if calls else streamed == text
    sent = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in sent] == \
        [(c.name, json.loads(c.arguments)) for c in calls]
    assert reason == ("tool_calls" if calls else "stop")


def test_named_stream_sends_the_arguments_as_they_come() -> None:
    mode = ToolMode("named", MODE.tools, "add")
    s = ToolStream(mode)
    d1, _ = s.feed('{"a": 1', False, None)
    d2, r = s.feed(', "b": 2}', True, "stop")
    assert d1["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 1'} and d1["tool_calls"][0]["id"]
    assert d2["tool_calls"][0] == {"index": 0, "function": {"arguments": ', "b": 2}'}} and r == "tool_calls"


def test_required_schema_lists_every_tool_and_bounds_parallel_calls() -> None:
    one = parse_tools([TOOL], "required", False).guide()
    many = MODE.__class__("required", MODE.tools, parallel=True).guide()
    s1, s2 = json.loads(one.value), json.loads(many.value)
    assert s1["maxItems"] == 1 and "maxItems" not in s2
    assert [b["properties"]["name"]["const"] for b in s2["items"]["anyOf"]] == ["add", "get_weather"]
    assert list(s1["items"]["properties"]) == ["name", "arguments"]  # the name is written first


