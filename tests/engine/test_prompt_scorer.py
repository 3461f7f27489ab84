"""PromptScorer: which rows of a chunk it asks for, and that a prompt prefilled again after a preemption
is not scored twice."""

from __future__ import annotations

import torch

from server.engine.prompt_logprobs import PromptScorer


def feed(sc: PromptScorer, logits: torch.Tensor, start: int, n: int) -> None:
    """What the engine does for one chunk [start, start + n): hand over rows logits_from..n-1."""
    lf = sc.logits_from(start, n)
    if lf is not None:
        sc.add(start + lf, logits[start + lf:start + n])


def test_chunks_with_virtual_tokens_and_a_second_prefill_score_each_token_once() -> None:
    torch.manual_seed(0)
    v, prompt = 3, [5, 1, 7, 2, 9, 4, 4, 8]
    logits = torch.randn(v + len(prompt) + 2, 10)  # KV positions: 3 virtual, 8 prompt, 2 generated
    lp = torch.log_softmax(logits, -1)
    want = [lp[v + j - 1, t].item() for j, t in enumerate(prompt) if j > 0]

    sc = PromptScorer(prompt, v, top_n=2)
    assert sc.logits_from(0, 2) is None  # virtual tokens only: nothing to score
    assert sc.logits_from(0, 4) == 3  # position 3 (prompt token 0) scores token 1; token 0's logprob is null
    feed(sc, logits, 0, 2)
    feed(sc, logits, 2, 5)  # positions 3..6 score prompt tokens 1..4
    assert len(sc.entries) == 5 and not sc.done
    feed(sc, logits, 0, 7)  # preempted and prefilled again: nothing new
    assert len(sc.entries) == 5
    feed(sc, logits, 7, 6)  # past the prompt: only up to the last prompt token's position
    assert sc.done and sc.entries[0] is None and len(sc.entries) == len(prompt)
    got = [e.logprob for e in sc.entries[1:]]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-6
    assert [e.token_id for e in sc.entries[1:]] == prompt[1:]
    for j, e in enumerate(sc.entries[1:], start=1):
        row = lp[v + j - 1]
        assert e.rank == int((row > row[prompt[j]]).sum()) + 1
        assert [t for t, _ in e.top_logprobs] == torch.topk(row, 2).indices.tolist()
    assert sc.logits_from(0, 20) is None
