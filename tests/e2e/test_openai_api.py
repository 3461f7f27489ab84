"""The base model through HTTP: exact tokens vs transformers, continuous batching, streaming, errors."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint
from tests.waits import async_wait_for, engine_settled, hold_first_step_until, wait_for


@pytest.fixture(scope="module")
def ckpt(tiny_root: str) -> str:
    return make_tiny_checkpoint(tiny_root, "llama", seed=3)


@pytest.fixture(scope="module")
def srv(ckpt: str):
    with live_server(model=ckpt, max_model_len=256, kv_cache_blocks=128, block_size=8, max_num_seqs=16,
                     max_batch_tokens=96) as s:
        yield s


@pytest.fixture(scope="module")
def hf(ckpt: str):
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def hf_greedy(hf, prompt_ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def prompts(k: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(3, 40))] for _ in range(k)]


def completion(ids: list[int], n: int, **kw) -> dict:
    return {"prompt": ids, "max_tokens": n, "min_tokens": n, "temperature": 0, "return_token_ids": True, **kw}


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))


def free_blocks_settle(srv) -> int:
    eng = srv.state.engine
    wait_for(engine_settled(eng), "every request to leave the engine and free its blocks")
    return eng.allocator.num_free


def test_concurrent_greedy_equals_transformers(srv, hf):
    ps = prompts(10)
    lens = [6 + (i % 4) * 3 for i in range(len(ps))]
    resps = asyncio.run(post_all(srv.url, [completion(p, n) for p, n in zip(ps, lens, strict=True)]))
    for p, n, r in zip(ps, lens, resps, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["prompt_token_ids"] == p
        assert body["choices"][0]["token_ids"] == hf_greedy(hf, p, n)
        assert body["usage"] == {"prompt_tokens": len(p), "completion_tokens": n, "total_tokens": len(p) + n,
                                 "prompt_tokens_details": {"cached_tokens": 0}}  # distinct prompts: no hits


def test_late_arrival_does_not_change_running_requests(srv, hf):
    ps = prompts(6, seed=1)

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            eng = srv.state.engine
            # the five go into one step (held until all are in the engine); then, while they decode, one more
            hold_first_step_until(eng, lambda: eng.in_flight == 5, "the first five requests in the engine")
            first = [asyncio.create_task(c.post("/v1/completions", json=completion(p, 24))) for p in ps[:5]]
            await async_wait_for(lambda: eng.num_running == 5 and all(s.output_ids for s in eng.scheduler.running),
                                 "the first five requests to be decoding")
            # hold the next step until the late request is in the engine: it joins the running five
            hold_first_step_until(eng, lambda: eng.in_flight == 6, "the late request in the engine")
            late = await c.post("/v1/completions", json=completion(ps[5], 8))
            return [await t for t in first], late

    first, late = asyncio.run(scenario())
    assert late.status_code == 200
    assert late.json()["choices"][0]["token_ids"] == hf_greedy(hf, ps[5], 8)
    for p, r in zip(ps[:5], first, strict=True):
        assert r.json()["choices"][0]["token_ids"] == hf_greedy(hf, p, 24)


def test_hundred_requests_return_every_block(srv):
    eng = srv.state.engine
    total = eng.allocator.num_blocks
    bodies = [completion(p, 1 + i % 5) for i, p in enumerate(prompts(100, seed=2))]
    resps = asyncio.run(post_all(srv.url, bodies))
    assert all(r.status_code == 200 for r in resps)
    assert free_blocks_settle(srv) == total


def test_stream_equals_non_stream_and_seed_repeats(srv):
    p = prompts(1, seed=4)[0]
    with srv.client() as c:
        body = {"prompt": p, "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 1234,
                "return_token_ids": True}
        a = c.post("/v1/completions", json=body).json()
        b = c.post("/v1/completions", json=body).json()
        assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
        other = c.post("/v1/completions", json={**body, "seed": 99}).json()
        texts, ids, done = [], [], False
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            for line in s.iter_lines():
                if not line:
                    continue
                assert line.startswith("data: ")
                if line == "data: [DONE]":
                    done = True
                    break
                ch = json.loads(line[6:])["choices"][0]
                texts.append(ch["text"])
                ids += ch["token_ids"]
        assert done
        assert ids == a["choices"][0]["token_ids"]
        assert "".join(texts) == a["choices"][0]["text"]
    # A different seed should sample differently somewhere in 12 tokens at this temperature.
    assert other["choices"][0]["token_ids"] != a["choices"][0]["token_ids"]


def test_chat_and_stream_chat(srv, hf):
    tok = srv.state.tokenizer
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    with srv.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 6, "min_tokens": 6,
                                                  "temperature": 0, "return_token_ids": True, "logprobs": True,
                                                  "top_logprobs": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["prompt_token_ids"] == ids
        assert body["choices"][0]["token_ids"] == hf_greedy(hf, ids, 6)
        lp = body["choices"][0]["logprobs"]["content"]
        assert len(lp) == 6 and all(len(e["top_logprobs"]) == 2 for e in lp)
        # greedy: the chosen token is the most likely one
        assert all(abs(e["logprob"] - e["top_logprobs"][0]["logprob"]) < 1e-6 for e in lp)
        chunks = []
        with c.stream("POST", "/v1/chat/completions", json={"messages": msgs, "max_tokens": 6, "temperature": 0,
                                                            "min_tokens": 6, "stream": True,
                                                            "stream_options": {"include_usage": True}}) as s:
            for line in s.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["usage"]["completion_tokens"] == 6
        streamed = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
        assert streamed == body["choices"][0]["message"]["content"]


def test_logprobs_match_transformers(srv, hf):
    p = prompts(1, seed=5)[0]
    with srv.client() as c:
        body = c.post("/v1/completions", json=completion(p, 4, logprobs=3)).json()
    toks = body["choices"][0]["token_ids"]
    lps = body["choices"][0]["logprobs"]["token_logprobs"]
    with torch.inference_mode():
        logits = hf(torch.tensor([p + toks])).logits[0].float()
    ref = torch.log_softmax(logits, -1)
    for i, (t, lp) in enumerate(zip(toks, lps, strict=True)):
        assert abs(ref[len(p) - 1 + i, t].item() - lp) < 1e-3


def test_stop_strings_and_stop_tokens(srv, hf):
    p = prompts(1, seed=6)[0]
    ref = hf_greedy(hf, p, 12)
    tok = srv.state.tokenizer
    text = tok.decode(ref, skip_special_tokens=True)
    with srv.client() as c:
        # stop token: generation ends right after it, and it is included in token_ids
        r = c.post("/v1/completions", json=completion(p, 12, min_tokens=0, stop_token_ids=[ref[3]])).json()
        first = ref.index(ref[3])
        assert r["choices"][0]["token_ids"] == ref[: first + 1]
        assert r["choices"][0]["finish_reason"] == "stop"
        stop = text[5:7]
        if stop:
            r = c.post("/v1/completions", json=completion(p, 12, min_tokens=0, stop=[stop])).json()
            assert r["choices"][0]["text"] == text[: text.index(stop)]
            assert r["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 300}, 400, "max_tokens"),
        ({"prompt": [5] * 260, "max_tokens": 1}, 400, "prompt"),
        ({"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
        ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "hi", "temperature": 5}, 400, "temperature"),
        ({"max_tokens": 3}, 400, "prompt"),
        ({"prompt": "hi", "model": "no-such-adapter"}, 404, "model"),
        ({"prompt": [999999], "max_tokens": 1}, 400, "prompt"),
        ({"prompt": "", "max_tokens": 1}, 400, "prompt"),
    ],
)
def test_errors_have_openai_shape_and_server_keeps_serving(srv, body, status, param):
    with srv.client() as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and err["type"]
        ok = c.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2})
        assert ok.status_code == 200


def test_malformed_json_and_chat_errors(srv):
    with srv.client() as c:
        r = c.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = c.post("/v1/chat/completions", json={"messages": [], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
        assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["param"]


def test_bad_request_does_not_disturb_requests_in_flight(srv, hf):
    p = prompts(1, seed=7)[0]

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            good = asyncio.create_task(c.post("/v1/completions", json=completion(p, 16)))
            bad = await asyncio.gather(*(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
                                         for _ in range(5)))
            return await good, bad

    good, bad = asyncio.run(scenario())
    assert all(b.status_code == 400 for b in bad)
    assert good.json()["choices"][0]["token_ids"] == hf_greedy(hf, p, 16)


def test_models_and_health(srv):
    with srv.client() as c:
        models = c.get("/v1/models").json()["data"]
        assert models[0]["id"] == srv.state.base_name and models[0]["parent"] is None
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/ready").status_code == 200
