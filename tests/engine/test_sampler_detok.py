"""Sampler (greedy, top-k, top-p, seeds, logprobs) and incremental detokenization with stop strings."""

from __future__ import annotations

import torch

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.sampler import make_generator, sample
from server.engine.sequence import SamplingParams
from tests.tiny import tiny_tokenizer


def test_greedy_and_logprobs_are_of_the_raw_distribution():
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0]])
    (r,) = sample(logits, [SamplingParams(temperature=0.0, logprobs=2)], [None], [[1]])
    assert r.token_id == 2  # token 1 suppressed (min_tokens), the next best is chosen
    ref = torch.log_softmax(logits[0], -1)
    assert abs(r.logprob - ref[2].item()) < 1e-6  # logprob of the unmasked distribution
    assert [t for t, _ in r.top_logprobs] == [1, 2]


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    seen_k, seen_p = set(), set()
    for seed in range(200):
        seen_k.add(sample(logits, [SamplingParams(temperature=1.0, top_k=2, seed=seed)],
                          [make_generator(seed)])[0].token_id)
        seen_p.add(sample(logits, [SamplingParams(temperature=1.0, top_p=0.7, seed=seed)],
                          [make_generator(seed)])[0].token_id)
    assert seen_k == {0, 1}
    probs = torch.softmax(logits[0], -1)  # 0.64, 0.23, ...: top_p 0.7 keeps the first two
    assert probs[0] < 0.7 < probs[0] + probs[1] and seen_p == {0, 1}


def test_same_seed_same_tokens_different_seed_differs():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.5)

    def draw(seed: int) -> list[int]:
        g = make_generator(seed)
        return [sample(logits, [p], [g])[0].token_id for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_detokenizer_holds_back_partial_utf8_and_stop_prefixes():
    tok = tiny_tokenizer()
    text = "héllo wörld STOP tail"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tok, stop=("STOP",))
    out, hit = "", False
    for i in range(1, len(ids) + 1):
        hit = d.add(ids[:i])
        chunk = d.take(final=hit)
        assert "\ufffd" not in chunk  # never half a UTF-8 character
        out += chunk
        if hit:
            break
        assert not out.endswith(("S", "ST", "STO"))  # a possible stop prefix is held back
    assert hit and out == "héllo wörld "
