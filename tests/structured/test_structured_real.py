"""Structured output and tool calling on the real default model (SmolLM2-135M-Instruct) through the official
`openai` client: 50 JSON-schema prompts validate; `required` and named tool choice give valid calls, on the
base model and through a random LoRA; a mixed batch (constrained + free, base + two LoRAs) leaves the free
outputs token for token as they are alone; streamed tool calls assemble with the client's stream helpers.

Every batch is sent concurrently (one engine batch), with small schemas bounded in length (maxLength,
integer ranges, maxItems) so max_tokens always suffices and the set stays cheap on 2 CPU cores."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import jsonschema
import openai
import pytest

from tests.adapters import make_lora
from tests.server_utils import LiveServer, live_server
from tests.waits import EngineGate, async_wait_for

BASE = "SmolLM2-135M-Instruct"
SYSTEM = "You are a helpful assistant that answers in JSON."
S = {"type": "string", "maxLength": 16}

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                      "role": {"enum": ["admin", "user", "guest"]}},
     "required": ["name", "age", "role"]},
    {"type": "object", "properties": {"street": S, "city": S, "geo": {
        "type": "object", "properties": {"lat": {"type": "integer", "minimum": -90, "maximum": 90},
                                         "lon": {"type": "integer", "minimum": -180, "maximum": 180}},
        "required": ["lat", "lon"]}}, "required": ["street", "city", "geo"]},
    {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": {"enum": ["A1", "B2", "C3"]},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"]}}, "express": {"type": "boolean"}}, "required": ["items", "express"]},
    {"type": "object", "properties": {"title": S, "day": {"enum": ["mon", "tue", "wed", "thu", "fri"]},
                                      "attendees": {"type": "array", "items": S, "maxItems": 3}},
     "required": ["title", "day", "attendees"]},
    {"type": "object", "properties": {
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "tags": {"type": "array", "items": {"enum": ["fast", "cheap", "good"]}, "maxItems": 2},
        "author": {"type": "object", "properties": {"name": S, "verified": {"type": "boolean"}},
                   "required": ["name", "verified"]}}, "required": ["rating", "sentiment", "tags", "author"]},
]
SUBJECTS = ["a librarian", "a cafe in Rome", "an order of pens", "a team meeting", "a review of a phone",
            "a pilot", "a bakery in Lyon", "an order of tea", "a birthday party", "a review of a movie"]
MAX_TOKENS = 128

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 24},
                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                      "parameters": {"type": "object", "properties": {
                                          "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                          "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                                          "required": ["a", "b"]}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTIONS = ["What is the weather in Paris?", "Add 2 and 3.", "Is it raining in Tokyo?", "What is 40 plus 2?",
             "Weather in Oslo in fahrenheit, please.", "Sum 7 and 8.", "How warm is Cairo today?",
             "What is 100 plus 250?", "Tell me the weather in Lima.", "Compute 12 + 30."]


@pytest.fixture(scope="module")
def server(real_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    d = tmp_path_factory.mktemp("structured-loras")
    loras = {f"lora{k}": make_lora(real_model_dir, str(d / f"lora{k}"), r=8, targets=["q_proj", "v_proj"],
                                   seed=k + 1, alpha=8) for k in (1, 2)}
    with live_server(model=real_model_dir, max_model_len=1024, kv_cache_blocks=1024, block_size=16,
                     max_adapters=3, max_rank=16, max_num_seqs=64, adapters_dir=str(d / "store"),
                     adapter=[f"{n}={p}" for n, p in loras.items()]) as srv:
        yield srv


def client(srv: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=900, max_retries=0)


def msgs(q: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


def check_call(call: Any) -> None:
    assert call.type == "function" and call.id
    jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_fifty_json_schema_prompts_validate(server: LiveServer) -> None:
    async def one(c: openai.AsyncOpenAI, k: int) -> tuple[dict, Any, str | None]:
        schema, subject = SCHEMAS[k % len(SCHEMAS)], SUBJECTS[k // len(SCHEMAS)]
        rf = {"type": "json_schema", "json_schema": {"name": f"s{k % len(SCHEMAS)}", "schema": schema, "strict": True}}
        q = f"Describe {subject} as a JSON object."
        if k % 5 == 4:  # a fifth of them through /v1/completions (response_format there is an extension)
            r = await c.completions.create(model=BASE, prompt=q + "\n", max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"response_format": rf})
            return schema, r.choices[0].text, r.choices[0].finish_reason
        r = await c.chat.completions.create(model=BASE, messages=msgs(q), max_tokens=MAX_TOKENS, temperature=0,
                                            response_format=rf)
        return schema, r.choices[0].message.content, r.choices[0].finish_reason

    async def run() -> list:
        async with client(server) as c:
            return await asyncio.gather(*(one(c, k) for k in range(50)))

    results = asyncio.run(run())
    for k, (schema, text, finish) in enumerate(results):
        assert finish == "stop", (k, finish, text)
        jsonschema.validate(json.loads(text), schema)
    assert len({t for _, t, _ in results}) > 10, "the prompts did not matter: every answer is the same"


def _tool_requests(model: str) -> list[dict[str, Any]]:
    reqs = []
    for k, q in enumerate(QUESTIONS):
        reqs.append({"model": model, "messages": msgs(q), "tools": TOOLS, "tool_choice": "required",
                     "parallel_tool_calls": False})
        name = TOOLS[k % 2]["function"]["name"]
        reqs.append({"model": model, "messages": msgs(q), "tools": TOOLS,
                     "tool_choice": {"type": "function", "function": {"name": name}}})
    return reqs


def test_required_and_named_tool_calls_base_and_lora(server: LiveServer) -> None:
    """20 on the base model and the same 20 through a random LoRA, in one concurrent batch: all valid calls,
    the named ones to the named function; the LoRA changes what the model writes."""
    reqs = _tool_requests(BASE) + _tool_requests("lora1")

    async def run() -> list:
        async with client(server) as c:
            free = [c.chat.completions.create(model=m, messages=msgs(QUESTIONS[0]), max_tokens=12, temperature=0)
                    for m in (BASE, "lora1")]
            calls = [c.chat.completions.create(max_tokens=64, temperature=0, **r) for r in reqs]
            return await asyncio.gather(*free, *calls)

    out = asyncio.run(run())
    free, resps = out[:2], out[2:]
    assert free[0].choices[0].message.content != free[1].choices[0].message.content, "the LoRA changes nothing"
    for r, resp in zip(reqs, resps, strict=True):
        ch = resp.choices[0]
        assert ch.finish_reason == "tool_calls", (r["tool_choice"], ch)
        assert ch.message.content is None and len(ch.message.tool_calls) == 1
        check_call(ch.message.tool_calls[0])
        if isinstance(r["tool_choice"], dict):
            assert ch.message.tool_calls[0].function.name == r["tool_choice"]["function"]["name"]
    args = {(r["model"], resp.choices[0].message.tool_calls[0].function.arguments)
            for r, resp in zip(reqs, resps, strict=True)}
    assert len(args) > 4


def test_mixed_batch_leaves_free_outputs_unchanged(server: LiveServer) -> None:
    """Free requests (base, lora1, lora2) alone, then in one engine batch with constrained requests of each
    adapter (JSON schema, named tool, regex): the free ones give the same token ids."""
    eng = server.state.engine
    free = [{"model": m, "messages": msgs(q), "max_tokens": 16, "temperature": 0,
             "extra_body": {"return_token_ids": True}}
            for m, q in ((BASE, "Name a fruit."), ("lora1", "Name a color."), ("lora2", "Name a city."))]
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS[0]}}
    constrained = [
        {"model": BASE, "messages": msgs("Describe a nurse."), "response_format": rf},
        {"model": "lora1", "messages": msgs("Add 1 and 2."), "tools": TOOLS,
         "tool_choice": {"type": "function", "function": {"name": "add"}}},
        {"model": "lora2", "messages": msgs("A phone number?"), "extra_body": {"guided_regex": r"\d{3}-\d{4}"}},
    ]

    async def run() -> tuple[list, list]:
        async with client(server) as c:
            alone = [await c.chat.completions.create(**f) for f in free]
            gate = EngineGate(eng)
            try:
                primer = asyncio.create_task(c.completions.create(model=BASE, prompt="Hi", max_tokens=1))
                await async_wait_for(gate.entered.is_set, "the primer's step to reach the gate")
                tasks = []
                for k, r in enumerate([x for pair in zip(free, constrained, strict=True) for x in pair]):
                    tasks.append(asyncio.create_task(c.chat.completions.create(**{"max_tokens": 48, "temperature": 0,
                                                                                   **r})))
                    await async_wait_for(lambda k=k: eng.in_flight == k + 2, f"request {k} to reach the engine")
            finally:
                gate.open()
            await primer
            return alone, await asyncio.gather(*tasks)

    alone, mixed = asyncio.run(run())
    for k, a in enumerate(alone):
        m = mixed[2 * k]
        assert m.choices[0].model_extra["token_ids"] == a.choices[0].model_extra["token_ids"], free[k]["model"]
    assert alone[0].choices[0].message.content != alone[1].choices[0].message.content
    jsonschema.validate(json.loads(mixed[1].choices[0].message.content), SCHEMAS[0])
    check_call(mixed[3].choices[0].message.tool_calls[0])
    assert re.fullmatch(r"\d{3}-\d{4}", mixed[5].choices[0].message.content)


def test_streamed_tool_calls_assemble_with_the_client_helpers(server: LiveServer) -> None:
    """required, named and auto (a Hermes `<tool_call>` and a Llama-3 JSON output, forced with guided_choice so
    the auto parser has something to find) streamed; `chat.completions.stream` assembles the same calls as
    the non-streamed request gives."""
    hermes = '<tool_call>\n{"name": "add", "arguments": {"a": 4, "b": 5}}\n</tool_call>'
    llama = '{"name": "get_weather", "parameters": {"city": "Rome", "unit": "celsius"}}'
    cases = [
        dict(tool_choice="required", parallel_tool_calls=False),
        dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        dict(tool_choice="auto", extra_body={"guided_choice": [hermes]}),
        dict(tool_choice="auto", extra_body={"guided_choice": [llama]}),
    ]

    async def one(c: openai.AsyncOpenAI, case: dict) -> tuple[Any, Any, int]:
        kw = dict(model=BASE, messages=msgs("What is the weather in Rome?"), tools=TOOLS, max_tokens=64,
                  temperature=0, **case)
        plain = await c.chat.completions.create(**kw)
        chunks = 0
        async with c.chat.completions.stream(**kw) as s:
            async for ev in s:
                chunks += ev.type == "chunk"
            final = await s.get_final_completion()
        return plain, final, chunks

    async def run() -> list:
        async with client(server) as c:
            return await asyncio.gather(*(one(c, case) for case in cases))

    for case, (plain, final, chunks) in zip(cases, asyncio.run(run()), strict=True):
        want = plain.choices[0].message.tool_calls
        got = final.choices[0].message.tool_calls
        assert plain.choices[0].finish_reason == final.choices[0].finish_reason == "tool_calls", case
        assert [(t.function.name, json.loads(t.function.arguments)) for t in got] == \
            [(t.function.name, json.loads(t.function.arguments)) for t in want], case
        for t in got:
            check_call(t)
        assert chunks > 2
    assert json.loads(want[0].function.arguments) == {"city": "Rome", "unit": "celsius"}
