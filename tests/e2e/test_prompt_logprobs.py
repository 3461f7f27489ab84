"""echo + logprobs and vLLM's prompt_logprobs on /v1/completions: the prompt's log-probabilities are the
model's (log_softmax of the same forward, fp32, 1e-4), for the base and every adapter family (LoRA, prefix,
prompt, IA3, DoRA, AdapterHub bottleneck), mixed in one concurrent batch, with prompts prefilled across
several chunks.

References: transformers/peft for the base and the peft families; for the bottleneck adapters, AdapterHub's
`adapters` library itself, through the committed fixtures (tests/fixtures/bottleneck): its greedy tokens and
their log-probabilities came from one full forward over prompt + tokens, so echoing prompt + tokens must give
those log-probabilities at the tokens' positions."""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import httpx
import pytest
import torch

from tests.adapters import make_dora, make_ia3, make_lora, make_prompt_learning, peft_model
from tests.families.bottleneck_fixtures import adapter_dir, base_copy, expected
from tests.server_utils import live_server
from tests.tiny import tiny_tokenizer

TOL = 1e-4
TOP = 3
BOTTLENECK = ("seqbn-r16", "dseqbn-r8", "parbn-r2")  # one per AdapterHub bottleneck kind
BN_PROMPTS = (1, 3)  # fixture prompts (11 and 20 tokens, + 8 generated): several prefill chunks each


@pytest.fixture(scope="module")
def models(tiny_root: str) -> tuple[str, dict[str, str]]:
    base = base_copy(tiny_root, "llama")  # the bottleneck fixtures' base: every family on one base
    root = os.path.join(tiny_root, "pl-fam")
    adapters = {
        "lora": make_lora(base, os.path.join(root, "lora"), r=8, targets=["q_proj", "v_proj", "down_proj"], seed=3),
        "prefix": make_prompt_learning(base, os.path.join(root, "prefix"), "prefix", seed=4, num_virtual_tokens=5,
                                       prefix_projection=False),
        "prompt": make_prompt_learning(base, os.path.join(root, "prompt"), "prompt", seed=5, num_virtual_tokens=6),
        "ia3": make_ia3(base, os.path.join(root, "ia3"), seed=6),
        "dora": make_dora(base, os.path.join(root, "dora"), r=4, targets=["q_proj", "v_proj", "o_proj", "up_proj"],
                          seed=7),
    }
    for name in BOTTLENECK:
        adapters[name] = adapter_dir("llama", name)
    return base, adapters


def reference(model: Any, prompt: list[int]) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """log_softmax of the forward's logits at each prompt position (the last len(prompt) rows: a prompt-
    tuning model puts its virtual tokens ahead): logprob of token j given tokens < j, and the top-TOP."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -len(prompt):].float()
    lp = torch.log_softmax(logits, -1)
    chosen = [lp[j - 1, t].item() for j, t in enumerate(prompt) if j > 0]
    top = torch.topk(lp[:-1], TOP, -1)
    tops = [list(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(top.indices, top.values, strict=True)]
    return chosen, tops


def bottleneck_reference(name: str, base_model: Any) -> tuple[list[list[int]], list[Any]]:
    """The fixture prompts + the `adapters` library's greedy tokens for adapter `name`, and per prompt the
    reference logprob at each position (None where the fixture has none: the prompt's own tokens). The
    adapter must move those logprobs away from the base's."""
    exp = expected()["archs"]["llama"]
    prompts, refs, diff = [], [], 0.0
    for k in BN_PROMPTS:
        p, (gen, lps) = exp["prompts"][k], exp[name][k]
        want: list[float | None] = [None] * (len(p) - 1) + list(lps)
        base_lp = reference(base_model, p + gen)[0]
        diff = max(diff, *(abs(a - b) for a, b in zip(base_lp[len(p) - 1:], lps, strict=True)))
        prompts.append(p + gen)
        refs.append((want, None))
    assert diff > 0.05, f"adapter {name} barely changes the logprobs ({diff})"
    return prompts, refs


def test_prompt_logprobs_match_references_per_family_mixed_and_chunked(models: tuple[str, dict[str, str]]) -> None:
    base, adapters = models
    rng = random.Random(5)
    # 9..20 tokens each: with --max-batch-tokens 8 every prompt is prefilled over two or more chunks
    shared = [[rng.randrange(256) for _ in range(rng.randint(9, 20))] for _ in range(2)]
    names: list[str | None] = [None, *adapters]
    prompts: dict[str | None, list[list[int]]] = {}
    ref: dict[tuple[str | None, int], Any] = {}
    base_model = peft_model(base, None)
    for name in names:
        if name in BOTTLENECK:
            prompts[name], refs = bottleneck_reference(name, base_model)
            ref.update({(name, i): r for i, r in enumerate(refs)})
            continue
        m = peft_model(base, adapters[name]) if name else base_model
        prompts[name] = shared
        for i, p in enumerate(shared):
            ref[(name, i)] = reference(m, p)
        if name is not None:  # the adapter changes the prompt's logprobs, so matching it means something
            diff = max(abs(a - b) for i in range(len(shared))
                       for a, b in zip(ref[(name, i)][0], ref[(None, i)][0], strict=True))
            assert diff > 0.05, f"adapter {name} barely changes the prompt logprobs ({diff})"

    # three request shapes, each adapter × prompt, plus plain requests that score nothing, all at once
    shapes = {
        "echo0": dict(echo=True, logprobs=TOP, max_tokens=0),  # lm-eval's loglikelihood: score the prompt
        "echo2": dict(echo=True, logprobs=TOP, max_tokens=2, temperature=0, ignore_eos=True),
        "vllm": dict(prompt_logprobs=TOP, max_tokens=1, temperature=0),
        "plain": dict(max_tokens=3, temperature=0, logprobs=0, ignore_eos=True),
    }
    jobs = [(n, i, s) for n in names for i in range(len(prompts[n])) for s in shapes]
    rng.shuffle(jobs)

    async def fire(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            return await asyncio.gather(*(
                c.post("/v1/completions", json={"prompt": prompts[n][i], **shapes[s], **({"model": n} if n else {})})
                for n, i, s in jobs))

    with live_server(model=base, adapter=[f"{n}={d}" for n, d in adapters.items()], max_model_len=128,
                     kv_cache_blocks=512, block_size=4, max_adapters=len(adapters), max_num_seqs=8,
                     max_batch_tokens=8) as srv:
        resps = asyncio.run(fire(srv.url))
    tok = tiny_tokenizer()
    checked, compared = 0, 0
    for (name, i, s), r in zip(jobs, resps, strict=True):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        want, want_top = ref[(name, i)]
        p = prompts[name][i]
        if s.startswith("echo"):
            lps = choice["logprobs"]
            gen = 0 if s == "echo0" else 2
            assert len(lps["token_logprobs"]) == len(p) + gen
            assert lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
            got = lps["token_logprobs"][1:len(p)]
            pairs = [(a, b) for a, b in zip(got, want, strict=True) if b is not None]
            assert max(abs(a - b) for a, b in pairs) < TOL, (name, s)
            compared += len(pairs)
            for j, top in enumerate(lps["top_logprobs"][1:len(p)] if want_top is not None else []):
                want_d = {tok.decode([t]): v for t, v in want_top[j]}
                assert top.keys() == want_d.keys() and all(abs(top[k] - want_d[k]) < TOL for k in top), (name, s)
            assert lps["tokens"][:len(p)] == [tok.decode([t]) for t in p]
            assert choice["text"].startswith(tok.decode(p))
            if s == "echo0":
                assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 0
                assert choice["text"] == tok.decode(p)
            checked += 1
        elif s == "vllm":
            pl = choice["prompt_logprobs"]
            assert len(pl) == len(p) and pl[0] is None
            for j in range(1, len(p)):
                entry = pl[j][str(p[j])]
                if want[j - 1] is None:
                    continue
                assert abs(entry["logprob"] - want[j - 1]) < TOL, (name, j)
                compared += 1
                if want_top is None:
                    continue
                top_ids = [t for t, _ in want_top[j - 1]]
                if p[j] in top_ids:
                    assert entry["rank"] == top_ids.index(p[j]) + 1
                else:
                    assert entry["rank"] > TOP
                assert {str(t) for t in top_ids} <= pl[j].keys()
            assert choice["logprobs"] is None  # prompt_logprobs alone asks for no sampled-token logprobs
            checked += 1
        else:
            assert "prompt_logprobs" not in choice and len(choice["logprobs"]["token_logprobs"]) == 3
    assert checked == sum(len(prompts[n]) for n in names) * 3
    # every family's reference positions were compared: 3 scored shapes x its prompts' scored positions
    assert compared >= 3 * sum(len(p) - 1 for n in names if n not in BOTTLENECK for p in prompts[n])
