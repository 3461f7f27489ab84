"""Sampling checked against the reference distribution, and `n > 1`.

The server's first sampled token, over a few hundred seeds, must be distributed as softmax of the HF
model's logits under the same transform (temperature, then top-k, then top-p; written out here, not
imported from the server). The noise bound comes from the reference distribution itself: for N
draws from p, E[TV(empirical, p)] <= 1/2 * sum_i sqrt(p_i (1 - p_i) / N), and TV moves by at most 1/N
per draw, so (McDiarmid) TV exceeds that plus sqrt(ln(1/delta) / 2N) with probability below delta.
Seeds are fixed, so a run is deterministic; the bound says the check is not tuned to those seeds.
Each case first asserts that the transform matters (a sampler ignoring it would be more than the
bound away), then that the server is within the bound.
"""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
import torch

from tests.adapters import load_base
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint

N_SAMPLES = 800
N_PER_REQUEST = 50
DELTA = 1e-4
PROMPT = [72, 101, 108, 108, 111, 32, 119]


@pytest.fixture(scope="module")
def base(tiny_root: str) -> str:
    # init_std 0.3: logits spread far enough that a few hundred samples pin the distribution down
    return make_tiny_checkpoint(tiny_root, "llama", seed=5, init_std=0.3)


@pytest.fixture(scope="module")
def srv(base: str):
    with live_server(model=base, max_model_len=64, kv_cache_blocks=512, block_size=8, max_num_seqs=200,
                     max_batch_tokens=2048, max_n=N_PER_REQUEST,
                     max_queue=2 * N_SAMPLES) as s:  # a draw sends N_SAMPLES sequences at once: none may get a 429
        yield s


@pytest.fixture(scope="module")
def ref_logits(base: str) -> torch.Tensor:
    with torch.inference_mode():
        return load_base(base)(input_ids=torch.tensor([PROMPT])).logits[0, -1].double()


def reference_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """vLLM/OpenAI semantics: scale by 1/temperature, keep the top_k most likely, then the smallest set of
    most likely tokens whose mass reaches top_p; renormalise."""
    p = torch.softmax(logits / temperature, -1)
    order = torch.argsort(p, descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    if top_k > 0:
        order = order[:top_k]
    mass = p[order] / p[order].sum()
    n_keep = int((torch.cumsum(mass, 0) < top_p).sum()) + 1  # first prefix whose mass reaches top_p
    keep[order[:n_keep]] = True
    q = torch.where(keep, p, torch.zeros_like(p))
    return q / q.sum()


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def tv_bound(p: torch.Tensor, n: int, delta: float = DELTA) -> float:
    """TV(empirical of n draws from p, p) stays below this with probability >= 1 - delta."""
    return 0.5 * float(torch.sqrt(p * (1 - p) / n).sum()) + math.sqrt(math.log(1 / delta) / (2 * n))


async def _draw(url: str, body: dict, n_samples: int, seed0: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        resps = await asyncio.gather(*(
            c.post("/v1/completions", json={**body, "prompt": PROMPT, "max_tokens": 1, "n": N_PER_REQUEST,
                                            "seed": seed0 + j * N_PER_REQUEST, "return_token_ids": True})
            for j in range(n_samples // N_PER_REQUEST)))
    toks = []
    for r in resps:
        assert r.status_code == 200, r.text
        toks += [ch["token_ids"][0] for ch in r.json()["choices"]]
    return toks


CASES = {
    "temperature": dict(temperature=0.5),
    "top_k": dict(top_k=4),
    "top_p": dict(top_p=0.5),
    "all": dict(temperature=0.8, top_k=12, top_p=0.8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_distribution_matches_reference(srv, ref_logits: torch.Tensor, case: str) -> None:
    params = CASES[case]
    want = reference_probs(ref_logits, **params)
    bound = tv_bound(want, N_SAMPLES)
    # The transform matters: a sampler that ignored it (plain softmax) would draw a distribution 2x the
    # bound away from the reference, so its own empirical one would land more than the bound away.
    plain = reference_probs(ref_logits)
    assert tv(want, plain) > 2 * bound, (case, tv(want, plain), bound)

    toks = asyncio.run(_draw(srv.url, params, N_SAMPLES, seed0=1000 * (list(CASES).index(case) + 1)))
    assert len(toks) == N_SAMPLES
    outside = sorted({t for t in toks if want[t] == 0})
    assert not outside, f"sampled tokens outside the top-k/top-p support: {outside}"
    emp = torch.bincount(torch.tensor(toks), minlength=want.numel()).double() / N_SAMPLES
    assert tv(emp, want) < bound, (case, tv(emp, want), bound)


def test_seeded_sampling_repeats_and_seeds_matter(srv) -> None:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "return_token_ids": True}
    with srv.client() as c:
        a = [c.post("/v1/completions", json={**body, "seed": s}).json()["choices"][0]["token_ids"] for s in (3, 3, 4)]
    assert a[0] == a[1]
    assert a[0] != a[2]


# ---- n > 1 ----------------------------------------------------------------------------------------
def _sse_events(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def test_n_choices_indices_seeds_and_usage(srv) -> None:
    n, seed = 4, 77
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": seed, "return_token_ids": True,
            "ignore_eos": True}
    with srv.client() as c:
        r = c.post("/v1/completions", json={**body, "n": n})
        assert r.status_code == 200, r.text
        got = r.json()
        # choice i is the request's seed + i: the same tokens as a one-choice request with that seed
        singles = [c.post("/v1/completions", json={**body, "seed": seed + i}).json()["choices"][0] for i in range(n)]
    choices = got["choices"]
    assert [ch["index"] for ch in choices] == list(range(n))
    assert len({tuple(ch["token_ids"]) for ch in choices}) > 1, "every choice drew the same tokens"
    for ch, one in zip(choices, singles, strict=True):
        assert ch["token_ids"] == one["token_ids"] and ch["text"] == one["text"]
        assert ch["finish_reason"] == "length"
    cached = got["usage"].pop("prompt_tokens_details")["cached_tokens"]
    assert 0 <= cached < len(PROMPT)  # what the prefix cache served (tests/e2e/test_prefix_cache.py pins it)
    assert got["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 6 * n,
                            "total_tokens": len(PROMPT) + 6 * n}


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_n_streamed_choices_equal_non_streamed(srv, route: str) -> None:
    n = 3
    body = {"max_tokens": 7, "temperature": 1.0, "seed": 5, "n": n, "return_token_ids": True, "ignore_eos": True}
    body |= {"prompt": PROMPT} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    with srv.client() as c:
        plain = c.post(route, json=body)
        assert plain.status_code == 200, plain.text
        plain = plain.json()
        with c.stream("POST", route, json={**body, "stream": True,
                                           "stream_options": {"include_usage": True}}) as s:
            assert s.status_code == 200
            lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = _sse_events(lines)
    usage = [e for e in events if not e["choices"]]
    assert len(usage) == 1 and events[-1] is usage[0], "usage must come once, last"
    for u in (usage[0]["usage"], plain["usage"]):  # the streamed request may find the plain one's prompt cached
        u.pop("prompt_tokens_details")
    assert usage[0]["usage"] == plain["usage"]
    text = {i: "" for i in range(n)}
    ids: dict[int, list[int]] = {i: [] for i in range(n)}
    finish: dict[int, list[str]] = {i: [] for i in range(n)}
    for e in events[:-1]:
        (ch,) = e["choices"]
        i = ch["index"]
        text[i] += ch["text"] if "text" in ch else ch["delta"].get("content", "")
        ids[i] += ch.get("token_ids", [])
        if ch["finish_reason"] is not None:
            finish[i].append(ch["finish_reason"])
    for i, want in enumerate(plain["choices"]):
        assert want["index"] == i
        assert ids[i] == want["token_ids"]
        assert text[i] == (want["text"] if "text" in want else want["message"]["content"])
        assert finish[i] == [want["finish_reason"]], "each choice ends exactly once"
