"""Stop strings through the server (byte-level tokenizer: every character of 2+ bytes spans tokens), streamed
and not, and min_tokens holding them off as vLLM does."""

from __future__ import annotations

import json

import pytest

from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint, tiny_tokenizer

PROMPT = [87, 104, 121, 32, 116, 104, 101]
N = 40


@pytest.fixture(scope="module")
def srv(tiny_root: str):
    with live_server(model=make_tiny_checkpoint(tiny_root, "llama", seed=8), max_model_len=96, kv_cache_blocks=64,
                     block_size=8) as s:
        yield s


def _complete(c, **kw) -> dict:
    body = {"prompt": PROMPT, "max_tokens": N, "temperature": 0, "ignore_eos": True, "return_token_ids": True, **kw}
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _stream_text(c, **kw) -> tuple[str, list[int], str]:
    body = {"prompt": PROMPT, "max_tokens": N, "temperature": 0, "ignore_eos": True, "return_token_ids": True,
            "stream": True, **kw}
    text, ids, finish = "", [], None
    with c.stream("POST", "/v1/completions", json=body) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                ch = json.loads(line[6:])["choices"][0]
                text += ch["text"]
                ids += ch["token_ids"]
                finish = ch["finish_reason"] or finish
    return text, ids, finish


def test_stop_string_spanning_tokens_cuts_the_text(srv) -> None:
    tok = tiny_tokenizer()
    with srv.client() as c:
        full = _complete(c)
        ids = full["token_ids"]
        text = full["text"]
        assert text == tok.decode(ids, skip_special_tokens=True) or text.endswith("\ufffd")
        # a stop string from the middle of the greedy text, 3 characters long: it spans 3+ byte tokens
        start = next(i for i in range(len(text) // 2, len(text) - 3) if "\ufffd" not in text[i:i + 3])
        stop = text[start:start + 3]
        first = text.index(stop)
        got = _complete(c, stop=[stop])
        streamed, streamed_ids, finish = _stream_text(c, stop=[stop])
    assert got["text"] == text[:first] == streamed
    assert got["finish_reason"] == "stop" == finish
    # generation stopped at the token that completed the stop string
    done = next(i for i in range(1, len(ids) + 1) if stop in tok.decode(ids[:i]))
    assert got["token_ids"] == ids[:done] == streamed_ids


def test_stop_string_before_min_tokens_is_not_honoured(srv) -> None:
    tok = tiny_tokenizer()
    with srv.client() as c:
        full = _complete(c)
        ids, text = full["token_ids"], full["text"]
        # the stop string is the first (valid) output character: completed within the first tokens
        stop = next(ch for ch in text if ch != "\ufffd")
        first = text.index(stop)
        done = next(i for i in range(1, len(ids) + 1) if stop in tok.decode(ids[:i]))
        early = _complete(c, stop=[stop])
        late = _complete(c, stop=[stop], min_tokens=done + 1)
    assert early["text"] == text[:first] and early["token_ids"] == ids[:done]
    # with min_tokens past it, the first occurrence stays in the text; a later one (if any) stops it
    later = [i for i in range(done + 1, len(ids) + 1)
             if tok.decode(ids[:i]).count(stop) > tok.decode(ids[:i - 1]).count(stop)]
    if later:
        assert late["token_ids"] == ids[:later[0]] and late["finish_reason"] == "stop"
        assert late["text"] == text[:text.index(stop, first + 1)]
    else:
        assert late["token_ids"] == ids and late["finish_reason"] == "length"
    assert late["text"][first:].startswith(stop)
