"""Chat edge cases: a tokenizer without a chat template, content as a list of parts, max_completion_tokens,
a system message through the template."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from transformers import AutoTokenizer

from tests.adapters import greedy, load_base
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint

CHAT = "/v1/chat/completions"


def _without_chat_template(src: str, dst: str) -> str:
    if not os.path.isdir(dst):
        tmp = dst + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        cfg_path = os.path.join(tmp, "tokenizer_config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg.pop("chat_template", None)
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        for name in ("chat_template.jinja", "chat_template.json"):
            if os.path.exists(os.path.join(tmp, name)):
                os.remove(os.path.join(tmp, name))
        os.rename(tmp, dst)
    return dst


@pytest.fixture(scope="module")
def base(tiny_root: str) -> str:
    return make_tiny_checkpoint(tiny_root, "llama", seed=17)


@pytest.fixture(scope="module")
def srv(base: str):
    with live_server(model=base, max_model_len=96, kv_cache_blocks=64, block_size=8, max_tokens_limit=40) as s:
        yield s


def test_tokenizer_without_chat_template_answers_400(base: str, tiny_root: str) -> None:
    plain = _without_chat_template(base, os.path.join(tiny_root, "tiny-no-chat-template"))
    assert not getattr(AutoTokenizer.from_pretrained(plain), "chat_template", None)  # the fixture has none
    with live_server(model=plain, max_model_len=64, kv_cache_blocks=32, block_size=8) as s, s.client() as c:
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and "chat template" in err["message"]
        assert err["type"] == "invalid_request_error"
        # completions still work on that model
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def _chat_ids(base: str, messages: list[dict]) -> list[int]:
    tok = AutoTokenizer.from_pretrained(base)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_content_as_a_list_of_text_parts(srv, base: str) -> None:
    """Text parts are joined with a newline (as vLLM does for string chat templates), then rendered."""
    parts = [{"type": "text", "text": "first part"}, {"type": "text", "text": "second"}]
    body = {"max_tokens": 5, "temperature": 0, "return_token_ids": True, "ignore_eos": True}
    with srv.client() as c:
        r = c.post(CHAT, json={**body, "messages": [{"role": "user", "content": parts}]})
        assert r.status_code == 200, r.text
        joined = c.post(CHAT, json={**body, "messages": [{"role": "user", "content": "first part\nsecond"}]})
        bad = c.post(CHAT, json={**body, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})
    want_prompt = _chat_ids(base, [{"role": "user", "content": "first part\nsecond"}])
    assert r.json()["prompt_token_ids"] == want_prompt == joined.json()["prompt_token_ids"]
    assert r.json()["choices"][0]["token_ids"] == greedy(load_base(base), want_prompt, 5)
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"].startswith("messages.0.content")


def test_system_message_goes_through_the_template(srv, base: str) -> None:
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"}]
    with srv.client() as c:
        r = c.post(CHAT, json={"messages": msgs, "max_tokens": 4, "temperature": 0, "return_token_ids": True,
                               "ignore_eos": True})
        no_sys = c.post(CHAT, json={"messages": msgs[1:], "max_tokens": 4, "temperature": 0,
                                    "return_token_ids": True, "ignore_eos": True})
    want = _chat_ids(base, msgs)
    assert want != _chat_ids(base, msgs[1:])
    assert r.json()["prompt_token_ids"] == want
    assert no_sys.json()["prompt_token_ids"] != want
    assert r.json()["choices"][0]["token_ids"] == greedy(load_base(base), want, 4)


def test_max_completion_tokens(srv) -> None:
    msgs = [{"role": "user", "content": "count"}]
    base_body = {"messages": msgs, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    with srv.client() as c:
        r = c.post(CHAT, json={**base_body, "max_completion_tokens": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["choices"][0]["token_ids"]) == 3 and body["usage"]["completion_tokens"] == 3
        assert body["choices"][0]["finish_reason"] == "length"
        # max_completion_tokens wins over the deprecated max_tokens
        r = c.post(CHAT, json={**base_body, "max_completion_tokens": 2, "max_tokens": 6})
        assert r.json()["usage"]["completion_tokens"] == 2
        r = c.post(CHAT, json={**base_body, "max_tokens": 6})
        assert r.json()["usage"]["completion_tokens"] == 6
        # neither: up to the context (capped by --max-tokens-limit 40)
        r = c.post(CHAT, json=base_body)
        assert r.json()["usage"]["completion_tokens"] == 40
        # errors name the field the client sent
        for bad in (0, 41):
            r = c.post(CHAT, json={**base_body, "max_completion_tokens": bad})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "max_completion_tokens", err
            assert "max_completion_tokens" in err["message"] and str(bad) in err["message"], err
        r = c.post(CHAT, json={**base_body, "max_completion_tokens": "3"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
