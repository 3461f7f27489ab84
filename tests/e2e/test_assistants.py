"""Assistants end to end on a live server: a name bound to an adapter (or the base), instructions and sampling
defaults, used as a model id; their CRUD, bad inputs, guarded adapter deletes, persistence, metrics and CLI."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from server.api.assistants import AssistantMetrics
from server.cli import main
from tests.adapters import greedy, make_lora, peft_model
from tests.server_utils import LiveServer, live_server
from tests.tiny import make_tiny_checkpoint
from tests.waits import wait_for

CHAT = "/v1/chat/completions"
INSTR = "Answer like a pirate."
USER = [{"role": "user", "content": "Where is the ship?"}]
FILES = ("adapter_config.json", "adapter_model.safetensors")
N = 6


@pytest.fixture(scope="module")
def base(tiny_root: str) -> str:
    return make_tiny_checkpoint(tiny_root, "llama", seed=23)


@pytest.fixture(scope="module")
def loras(base: str, tiny_root: str) -> dict[str, str]:
    t = ["q_proj", "v_proj", "o_proj"]
    return {"v1": make_lora(base, os.path.join(tiny_root, "asst-v1"), r=8, targets=t, seed=5),
            "v2": make_lora(base, os.path.join(tiny_root, "asst-v2"), r=8, targets=t, seed=6)}


def upload(c: httpx.Client, name: str, d: str, method: str = "POST") -> httpx.Response:
    files = [("files", (f, open(os.path.join(d, f), "rb").read())) for f in FILES]
    url = "/v1/adapters" if method == "POST" else f"/v1/adapters/{name}"
    return c.request(method, url, data={"name": name}, files=files)


@pytest.fixture(scope="module")
def srv(base: str, loras: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    store = str(tmp_path_factory.mktemp("asst-store"))
    with live_server(model=base, adapters_dir=store, max_model_len=192, kv_cache_blocks=96, max_tokens_limit=64,
                     max_stop=4) as s, s.client() as c:
        assert upload(c, "pirate-lora", loras["v1"]).status_code == 201
        yield s


def chat(c: httpx.Client, model: str, messages: list[dict], **kw: Any) -> dict[str, Any]:
    r = c.post(CHAT, json={"model": model, "messages": messages, "return_token_ids": True, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def create(c: httpx.Client, **body: Any) -> dict[str, Any]:
    r = c.post("/v1/assistants", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def test_assistant_answers_as_its_adapter_with_the_instructions_first(srv: LiveServer, base: str, loras) -> None:
    with srv.client() as c:
        a = create(c, name="pirate", model="pirate-lora", instructions=INSTR, temperature=0.0, max_tokens=N,
                   metadata={"team": "docs"})
        assert a["object"] == "assistant" and a["id"].startswith("asst_") and a["metadata"] == {"team": "docs"}
        # the adapter visibly changes the answer to the same conversation
        via_adapter = chat(c, "pirate-lora", [system(INSTR), *USER], temperature=0, max_tokens=N, min_tokens=N)
        via_base = chat(c, srv.state.base_name, [system(INSTR), *USER], temperature=0, max_tokens=N, min_tokens=N)
        assert via_adapter["choices"][0]["token_ids"] != via_base["choices"][0]["token_ids"]
        # no temperature, no max_tokens: the assistant's greedy default and its max_tokens apply
        got = chat(c, "pirate", USER, min_tokens=N)
        assert got["model"] == "pirate"
        tok = AutoTokenizer.from_pretrained(base)
        rendered = tok.apply_chat_template([system(INSTR), *USER], tokenize=False, add_generation_prompt=True)
        want_ids = tok(rendered, add_special_tokens=False)["input_ids"]
        assert got["prompt_token_ids"] == want_ids == via_adapter["prompt_token_ids"]
        assert tok.decode(got["prompt_token_ids"]).startswith(f"<|system|>\n{INSTR}\n<|user|>")
        assert got["choices"][0]["token_ids"] == via_adapter["choices"][0]["token_ids"]
        assert got["choices"][0]["message"] == via_adapter["choices"][0]["message"]
        assert len(got["choices"][0]["token_ids"]) == N and got["choices"][0]["finish_reason"] == "length"
        # and PeftModel agrees
        assert got["choices"][0]["token_ids"] == greedy(peft_model(base, loras["v1"]), want_ids, N)
        # a request's own system message follows the instructions
        own = chat(c, "pirate", [system("Be brief."), *USER], min_tokens=N)
        ref = chat(c, "pirate-lora", [system(INSTR), system("Be brief."), *USER], temperature=0, max_tokens=N,
                   min_tokens=N)
        assert own["prompt_token_ids"] == ref["prompt_token_ids"]
        assert tok.decode(own["prompt_token_ids"]).startswith(f"<|system|>\n{INSTR}\n<|system|>\nBe brief.\n")
        assert own["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
        # a stream gets the same
        with c.stream("POST", CHAT, json={"model": "pirate", "messages": USER, "min_tokens": N, "stream": True,
                                          "return_token_ids": True}) as st:
            events = [json.loads(x[6:]) for x in st.iter_lines() if x.startswith("data: {")]
        streamed = [t for e in events for ch in e["choices"] for t in ch.get("token_ids", [])]
        assert streamed == got["choices"][0]["token_ids"] and all(e["model"] == "pirate" for e in events)


def _sampled(c: httpx.Client, model: str, messages: list[dict], seeds: range, **kw: Any) -> list[list[int]]:
    return [chat(c, model, messages, seed=s, max_tokens=N, min_tokens=N, **kw)["choices"][0]["token_ids"]
            for s in seeds]


def test_defaults_apply_where_the_request_is_silent_and_yield_to_its_values(srv: LiveServer) -> None:
    msgs = [system(INSTR), *USER]
    seeds = range(1, 5)
    with srv.client() as c:
        greedy_ids = chat(c, "pirate-lora", msgs, temperature=0, max_tokens=N, min_tokens=N)["choices"][0]["token_ids"]
        hot = _sampled(c, "pirate-lora", msgs, seeds, temperature=1.0)
        assert any(h != greedy_ids for h in hot)  # sampling visibly differs from greedy on this model
        # temperature: the assistant's 0 makes every seed greedy; a request's 1.0 samples as the adapter does
        assert _sampled(c, "pirate", USER, seeds) == [greedy_ids] * len(seeds)
        assert _sampled(c, "pirate", USER, seeds, temperature=1.0) == hot
        # top_p: a tiny default keeps only the likeliest token, even at temperature 1; a request's 1.0 overrides
        create(c, name="narrow", model="pirate-lora", instructions=INSTR, temperature=1.0, top_p=0.01)
        assert _sampled(c, "narrow", USER, seeds) == [greedy_ids] * len(seeds)
        assert _sampled(c, "narrow", USER, seeds, top_p=1.0) == hot
        # max_tokens: the default, then a request's own (max_tokens or max_completion_tokens)
        assert len(chat(c, "pirate", USER, min_tokens=2)["choices"][0]["token_ids"]) == N
        assert len(chat(c, "pirate", USER, max_tokens=3)["choices"][0]["token_ids"]) == 3
        assert len(chat(c, "pirate", USER, max_completion_tokens=2)["choices"][0]["token_ids"]) == 2
        # stop: a default cut at a character of the greedy answer; a request's own stop replaces it
        answer = chat(c, "pirate-lora", msgs, temperature=0, max_tokens=N, min_tokens=N)
        text = answer["choices"][0]["message"]["content"]
        cut = next(i for i, ch in enumerate(text) if i > 0 and ch != "\ufffd" and ch not in text[:i])
        create(c, name="stopper", model="pirate-lora", instructions=INSTR, temperature=0.0, max_tokens=N,
               stop=text[cut])
        stopped = chat(c, "stopper", USER)["choices"][0]
        assert stopped["finish_reason"] == "stop" and stopped["message"]["content"] == text[:cut]
        full = chat(c, "stopper", USER, stop=["\x00never"], min_tokens=N)["choices"][0]
        assert full["finish_reason"] == "length" and full["message"]["content"] == text


def test_completions_refuse_instructions_and_apply_defaults_without(srv: LiveServer) -> None:
    prompt = [10, 20, 30, 40, 50]
    with srv.client() as c:
        r = c.post("/v1/completions", json={"model": "pirate", "prompt": prompt})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        assert r.json()["error"]["code"] == "assistant_requires_chat" and "instructions" in r.json()["error"]["message"]
        create(c, name="plain", model="pirate-lora", temperature=0.0, max_tokens=4)
        got = c.post("/v1/completions", json={"model": "plain", "prompt": prompt, "min_tokens": 4,
                                              "return_token_ids": True}).json()
        ref = c.post("/v1/completions", json={"model": "pirate-lora", "prompt": prompt, "temperature": 0,
                                              "max_tokens": 4, "min_tokens": 4, "return_token_ids": True}).json()
        base = c.post("/v1/completions", json={"prompt": prompt, "temperature": 0, "max_tokens": 4, "min_tokens": 4,
                                               "return_token_ids": True}).json()
        assert got["prompt_token_ids"] == prompt and got["model"] == "plain"
        assert got["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"] != base["choices"][0]["token_ids"]


def test_models_lists_assistants_with_their_parent(srv: LiveServer) -> None:
    with srv.client() as c:
        create(c, name="on-base", model=srv.state.base_name, instructions="Hello.")
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert models["pirate"]["parent"] == "pirate-lora" and models["pirate"]["assistant_id"].startswith("asst_")
        assert models["on-base"]["parent"] == srv.state.base_name
        # an assistant on the base answers as the base does with the instructions
        got = chat(c, "on-base", USER, temperature=0, max_tokens=N, min_tokens=N)
        ref = chat(c, srv.state.base_name, [system("Hello."), *USER], temperature=0, max_tokens=N, min_tokens=N)
        assert got["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
        assert got["prompt_token_ids"] == ref["prompt_token_ids"]


def _snapshot(c: httpx.Client) -> list[dict]:
    return c.get("/v1/assistants", params={"limit": 100}).json()["data"]


BAD = [  # (method, path, body, status, param, words in the message)
    ("POST", "/v1/assistants", {"model": "pirate-lora"}, 400, "name", "required"),
    ("POST", "/v1/assistants", {"name": "x1"}, 400, "model", "required"),
    ("POST", "/v1/assistants", {"name": "x1", "model": "no-such-adapter"}, 400, "model", "neither"),
    ("POST", "/v1/assistants", {"name": "x1", "model": "pirate"}, 400, "model", "is an assistant"),
    ("POST", "/v1/assistants", {"name": "pirate", "model": "pirate-lora"}, 409, "name", "already exists"),
    ("POST", "/v1/assistants", {"name": "pirate-lora", "model": "pirate-lora"}, 409, "name", "adapter"),
    ("POST", "/v1/assistants", {"name": "BASE", "model": "pirate-lora"}, 409, "name", "base model"),
    ("POST", "/v1/assistants", {"name": "../up", "model": "pirate-lora"}, 400, "name", "invalid"),
    ("POST", "/v1/assistants", {"name": "x1", "model": "pirate-lora", "temperature": 2.5}, 400, "temperature", "2"),
    ("POST", "/v1/assistants", {"name": "x1", "model": "pirate-lora", "top_p": 0}, 400, "top_p", "greater"),
    ("POST", "/v1/assistants", {"name": "x1", "model": "pirate-lora", "max_tokens": 0}, 400, "max_tokens", "1"),
    ("POST", "/v1/assistants", {"name": "x1", "model": "pirate-lora", "max_tokens": 65}, 400, "max_tokens",
     "--max-tokens-limit"),
    ("POST", "/v1/assistants", {"name": "x1", "model": "pirate-lora", "stop": ["a", "b", "c", "d", "e"]}, 400,
     "stop", "--max-stop"),
    ("POST", "/v1/assistants", {"name": "x1", "model": "pirate-lora", "stop": [""]}, 400, "stop", "empty"),
    ("POST", "/v1/assistants", {"name": "x1", "model": "pirate-lora", "metadata": {str(i): "v" for i in range(17)}},
     400, "metadata", "16"),
    ("POST", "/v1/assistants", {"name": "x1", "model": "pirate-lora", "metadata": {"k": 1}}, 400, "metadata.k",
     "string"),
    ("POST", "/v1/assistants", {"name": "x1", "model": "pirate-lora", "instructions": "x" * 200}, 400,
     "instructions", "maximum context length"),
    ("POST", "/v1/assistants", {"name": "x1", "model": "pirate-lora", "tool_choice": "auto"}, 400, "tool_choice",
     "Extra inputs"),
    ("POST", "/v1/assistants", {"name": 5, "model": "pirate-lora"}, 400, "name", "string"),
    ("GET", "/v1/assistants/nobody", None, 404, "assistant_id", "does not exist"),
    ("GET", "/v1/assistants?after=asst_nobody", None, 400, "after", "asst_nobody"),
    ("GET", "/v1/assistants?limit=0", None, 400, "limit", "greater"),
    ("GET", "/v1/assistants?order=sideways", None, 400, "order", "pattern"),
    ("POST", "/v1/assistants/pirate", {"model": "no-such-adapter"}, 400, "model", "neither"),
    ("POST", "/v1/assistants/pirate", {"name": None}, 400, "name", "null"),
    ("PATCH", "/v1/assistants/pirate", {"name": "pirate-lora"}, 409, "name", "adapter"),
    ("PATCH", "/v1/assistants/pirate", {"name": "plain"}, 409, "name", "already exists"),
    ("PATCH", "/v1/assistants/nobody", {"temperature": 1.0}, 404, "assistant_id", "does not exist"),
    ("DELETE", "/v1/assistants/nobody", None, 404, "assistant_id", "does not exist"),
    ("DELETE", "/v1/adapters/pirate-lora", None, 409, "name", "'pirate'"),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "pirate-lora"}, 409, "name", "force=true"),
]


@pytest.mark.parametrize("method,path,body,status,param,words", BAD,
                         ids=[f"{m} {p} {s} {pa}" for m, p, _, s, pa, _ in BAD])
def test_bad_inputs_are_refused_naming_the_field(srv: LiveServer, method, path, body, status, param, words) -> None:
    with srv.client() as c:
        create_if_missing(c, "pirate", model="pirate-lora", instructions=INSTR, temperature=0.0, max_tokens=N)
        create_if_missing(c, "plain", model="pirate-lora", temperature=0.0, max_tokens=4)
        if isinstance(body, dict) and body.get("name") == "BASE":
            body = {**body, "name": srv.state.base_name}
        before = _snapshot(c)
        r = c.request(method, path, json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], err
        assert _snapshot(c) == before  # nothing half-written
        assert c.get("/v1/adapters/pirate-lora").status_code == 200


def create_if_missing(c: httpx.Client, name: str, **body: Any) -> None:
    if c.get(f"/v1/assistants/{name}").status_code == 404:
        create(c, name=name, **body)


def test_adapter_upload_under_an_assistants_name_is_refused(srv: LiveServer, loras) -> None:
    with srv.client() as c:
        create_if_missing(c, "pirate", model="pirate-lora", instructions=INSTR, temperature=0.0, max_tokens=N)
        r = upload(c, "pirate", loras["v2"])
        assert r.status_code == 409 and r.json()["error"]["param"] == "name"
        assert "assistant" in r.json()["error"]["message"]
        assert c.get("/v1/adapters/pirate").status_code == 404


def test_list_pages_in_openai_shape(srv: LiveServer) -> None:
    with srv.client() as c:
        for i in range(3):
            create(c, name=f"page-{i}", model="pirate-lora")
        everyone = c.get("/v1/assistants", params={"limit": 100, "order": "asc"}).json()
        names = [a["name"] for a in everyone["data"]]
        assert names.index("page-0") < names.index("page-1") < names.index("page-2")
        seen, after = [], None
        while True:
            page = c.get("/v1/assistants", params={"limit": 2, "order": "asc", **({"after": after} if after else {})})
            body = page.json()
            assert body["object"] == "list" and len(body["data"]) <= 2
            seen += [a["name"] for a in body["data"]]
            if not body["has_more"]:
                break
            after = body["last_id"]
        assert seen == names
        desc = c.get("/v1/assistants", params={"limit": 100}).json()["data"]
        assert [a["name"] for a in desc] == names[::-1]
        before = c.get("/v1/assistants", params={"order": "asc", "before": everyone["data"][2]["id"], "limit": 1})
        assert [a["name"] for a in before.json()["data"]] == [names[1]]
        for i in range(3):
            r = c.delete(f"/v1/assistants/page-{i}")
            assert r.status_code == 200 and r.json()["deleted"] is True
        assert c.get("/v1/assistants/page-0").status_code == 404


def test_update_changes_only_what_it_names(srv: LiveServer) -> None:
    with srv.client() as c:
        a = create(c, name="editable", model="pirate-lora", instructions="One.", temperature=0.5, stop=["x"])
        r = c.patch("/v1/assistants/editable", json={"instructions": "Two.", "stop": None})
        assert r.status_code == 200, r.text
        b = r.json()
        assert (b["instructions"], b["stop"], b["temperature"], b["id"]) == ("Two.", None, 0.5, a["id"])
        r = c.post(f"/v1/assistants/{a['id']}", json={"name": "edited", "model": srv.state.base_name})
        assert r.status_code == 200 and r.json()["name"] == "edited" and r.json()["model"] == srv.state.base_name
        assert c.get("/v1/assistants/editable").status_code == 404
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert "editable" not in models and models["edited"]["parent"] == srv.state.base_name
        assert c.delete("/v1/assistants/edited").status_code == 200


def test_assistant_follows_a_replaced_adapter_and_delete_is_guarded(base, loras, tmp_path) -> None:
    with live_server(model=base, adapters_dir=str(tmp_path / "s"), max_model_len=192, kv_cache_blocks=96) as s, \
            s.client() as c:
        assert upload(c, "swap", loras["v1"]).status_code == 201
        create(c, name="swapper", model="swap", instructions=INSTR, temperature=0.0, max_tokens=N)
        create(c, name="swapper2", model="swap")
        old = chat(c, "swapper", USER, min_tokens=N)["choices"][0]["token_ids"]
        assert upload(c, "swap", loras["v2"], method="PUT").status_code == 200
        new = chat(c, "swapper", USER, min_tokens=N)["choices"][0]["token_ids"]
        ref = chat(c, "swap", [system(INSTR), *USER], temperature=0, max_tokens=N, min_tokens=N)["choices"][0]
        assert new == ref["token_ids"] != old
        r = c.delete("/v1/adapters/swap")
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use"
        assert "'swapper', 'swapper2'" in r.json()["error"]["message"]
        assert chat(c, "swapper", USER, min_tokens=N)["choices"][0]["token_ids"] == new  # still serving
        assert c.delete("/v1/adapters/swap", params={"force": "true"}).status_code == 204
        assert c.get("/v1/adapters/swap").status_code == 404
        assert [c.get(f"/v1/assistants/{n}").status_code for n in ("swapper", "swapper2")] == [404, 404]
        r = c.post(CHAT, json={"model": "swapper", "messages": USER})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        assert {m["id"] for m in c.get("/v1/models").json()["data"]} == {s.state.base_name}


def test_persisted_across_a_restart_with_admin_key_for_writes(base, loras, tmp_path) -> None:
    store = str(tmp_path / "s")
    keys = dict(api_key="user-key", admin_key="admin-key")
    admin = {"Authorization": "Bearer admin-key"}
    user = {"Authorization": "Bearer user-key"}
    with live_server(model=base, adapters_dir=store, max_model_len=192, kv_cache_blocks=96, **keys) as s, \
            s.client(headers=admin) as c:
        assert upload(c, "keep", loras["v1"]).status_code == 201
        a = create(c, name="keeper", model="keep", instructions=INSTR, temperature=0.0, max_tokens=N, stop=["\x00"],
                   description="kept", metadata={"k": "v"})
        first = chat(c, "keeper", USER, min_tokens=N)
        with s.client(headers=user) as u:
            r = u.post("/v1/assistants", json={"name": "nope", "model": "keep"})
            assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
            assert u.delete("/v1/assistants/keeper").status_code == 403
            assert u.get("/v1/assistants/keeper").status_code == 200  # reading needs only the API key
            assert chat(u, "keeper", USER, min_tokens=N)["choices"] == first["choices"]
        with s.client() as anon:
            assert anon.get("/v1/assistants").status_code == 401
    with live_server(model=base, adapters_dir=store, max_model_len=192, kv_cache_blocks=96, **keys) as s, \
            s.client(headers=admin) as c:
        assert c.get("/v1/assistants/keeper").json() == a
        again = chat(c, "keeper", USER, min_tokens=N)
        assert again["choices"] == first["choices"] and again["prompt_token_ids"] == first["prompt_token_ids"]
        assert "keeper" in {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert c.delete("/v1/assistants/keeper").status_code == 200
    with live_server(model=base, adapters_dir=store, max_model_len=192, kv_cache_blocks=96) as s, s.client() as c:
        assert c.get("/v1/assistants").json()["data"] == []  # the delete persisted too


def test_an_assistant_whose_model_is_gone_or_whose_name_is_taken_at_start(base, loras, tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="peftserve.assistants")
    cfg = dict(model=base, adapters_dir=str(tmp_path / "s"), max_model_len=192, kv_cache_blocks=96)
    with live_server(**cfg, adapter=[f"local={loras['v2']}"]) as s, s.client() as c:
        create(c, name="on-local", model="local", temperature=0.0, max_tokens=N)
        assert chat(c, "on-local", USER)["model"] == "on-local"
    with live_server(**cfg) as s, s.client() as c:  # started without --adapter local
        assert c.get("/v1/assistants/on-local").status_code == 200
        assert "on-local" not in {m["id"] for m in c.get("/v1/models").json()["data"]}
        r = c.post(CHAT, json={"model": "on-local", "messages": USER})
        err = r.json()["error"]
        assert r.status_code == 404 and err["param"] == "model" and "'local'" in err["message"]
        assert c.patch("/v1/assistants/on-local", json={"model": s.state.base_name}).status_code == 200
        ref = chat(c, s.state.base_name, USER, temperature=0, max_tokens=N)
        assert chat(c, "on-local", USER)["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
    assert any("uses model 'local', which is not served" in r.getMessage() for r in caplog.records)
    with live_server(**cfg, adapter=[f"on-local={loras['v1']}"]) as s, s.client() as c:  # an adapter takes the name
        listed = [m for m in c.get("/v1/models").json()["data"] if m["id"] == "on-local"]
        assert len(listed) == 1 and listed[0]["parent"] == s.state.base_name and "assistant_id" not in listed[0]
        # the adapter answers (not the assistant, which now runs on the base)
        got = chat(c, "on-local", USER, temperature=0, max_tokens=N, min_tokens=N)["choices"][0]["token_ids"]
        ref = chat(c, s.state.base_name, USER, temperature=0, max_tokens=N, min_tokens=N)["choices"][0]["token_ids"]
        assert got != ref
    assert any("'on-local' is shadowed" in r.getMessage() for r in caplog.records)


def test_metrics_and_request_log_carry_the_assistant(srv: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="peftserve.request")
    with srv.client() as c:
        create_if_missing(c, "pirate", model="pirate-lora", instructions=INSTR, temperature=0.0, max_tokens=N)

        def count() -> float:
            for line in c.get("/metrics").text.splitlines():
                if line.startswith('peftserve_assistant_requests_total{assistant="pirate",status="200"}'):
                    return float(line.split()[-1])
            return 0.0

        before = count()
        got = chat(c, "pirate", USER, min_tokens=N)
        wait_for(lambda: count() == before + 1, "the assistant's request counter to move")

        def logged() -> list[dict]:
            return [json.loads(r.getMessage()) for r in caplog.records if r.name == "peftserve.request"
                    and json.loads(r.getMessage()).get("response_id") == got["id"]]

        wait_for(lambda: bool(logged()), "the request's log line")
        (line,) = logged()
        assert line["assistant"] == "pirate" and line["model"] == "pirate" and line["status"] == 200
        text = c.get("/metrics").text
        assert 'peftserve_assistant_generation_tokens_total{assistant="pirate"}' in text
        # tokens still count under the adapter the assistant runs on
        assert 'peftserve_generation_tokens_total{adapter="pirate-lora"}' in text


def test_assistant_metric_labels_are_bounded() -> None:
    m = AssistantMetrics(CollectorRegistry(), max_labels=2)
    for name in ("a", "b", "c", "d"):
        m.observe(name, 200, 3, 4)
    labels = {s.labels["assistant"] for metric in m.requests.collect() for s in metric.samples}
    assert labels == {"a", "b", "other"}
    for _ in range(10):  # a busy unlabelled assistant takes the quietest one's label
        m.observe("d", 200, 1, 1)
    labels = {s.labels["assistant"] for metric in m.requests.collect() for s in metric.samples}
    assert "d" in labels and len(labels) == 3


def cli(*args: str) -> subprocess.CompletedProcess:
    """`peftserve assistants ARGS`, in this process (the entry point itself is run once as a subprocess below)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["assistants", *args])
        except SystemExit as e:  # argparse refusing a flag
            code = int(e.code or 0)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_cli_create_ls_show_update_rm(srv: LiveServer, tmp_path) -> None:
    url = ("--url", srv.url)
    instr = tmp_path / "instr.txt"
    instr.write_text(INSTR)
    r = cli("create", "cli-bot", "--model", "pirate-lora", "--instructions-file", str(instr), "--temperature", "0",
            "--max-tokens", str(N), "--stop", "zz", "--metadata", "owner=cli", *url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("cli-bot asst_") and "model=pirate-lora" in r.stdout and "max_tokens=6" in r.stdout
    with srv.client() as c:
        got = chat(c, "cli-bot", USER, min_tokens=N)
        ref = chat(c, "pirate-lora", [system(INSTR), *USER], temperature=0, max_tokens=N, min_tokens=N)
        assert got["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
    r = cli("create", "cli-bot", "--model", "pirate-lora", *url)
    assert r.returncode == 1 and "409" in r.stderr and "already exists" in r.stderr
    r = cli("create", "cli-bot2", "--model", "missing-adapter", *url)
    assert r.returncode == 1 and "400" in r.stderr and "missing-adapter" in r.stderr
    r = cli("create", "cli-bot2", "--model", "pirate-lora", "--metadata", "nokey", *url)
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr
    r = cli("ls", *url)
    assert r.returncode == 0
    row = next(line for line in r.stdout.splitlines() if line.startswith("cli-bot "))
    assert "pirate-lora" in row and INSTR in row
    r = cli("ls", "--json", *url)
    assert r.returncode == 0 and "cli-bot" in [a["name"] for a in json.loads(r.stdout)]
    r = cli("show", "cli-bot", *url)
    shown = json.loads(r.stdout)
    assert r.returncode == 0 and shown["metadata"] == {"owner": "cli"} and shown["stop"] == ["zz"]
    r = cli("update", "cli-bot", "--temperature", "0.7", "--clear", "stop", "--rename", "cli-bot-2", *url)
    assert r.returncode == 0 and "cli-bot-2" in r.stdout and "temperature=0.7" in r.stdout and "stop" not in r.stdout
    assert cli("update", "cli-bot-2", *url).returncode == 2
    r = cli("rm", "cli-bot-2", *url)
    assert r.returncode == 0 and "deleted cli-bot-2" in r.stdout
    r = cli("show", "cli-bot-2", *url)
    assert r.returncode == 1 and "404" in r.stderr
    r = subprocess.run([sys.executable, "-m", "server", "assistants", "ls", *url], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("NAME") and "cli-bot" not in r.stdout, r.stderr
