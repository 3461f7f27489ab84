"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Logprobs are those of the model's own distribution (log_softmax of the raw logits), as vLLM
reports them, whatever temperature/top-k/top-p were used to pick the token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.guided import mask_logits
from server.engine.sequence import SamplingParams


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p on one row of logits (fp32, CPU)."""
    logits = logits / p.temperature
    vocab = logits.shape[-1]
    if 0 < p.top_k < vocab:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        remove = probs.cumsum(-1) - probs > p.top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def sample(
    logits: torch.Tensor,  # [n, vocab] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    suppress: list[list[int] | None] | None = None,  # per row: token ids that must not be picked (min_tokens)
    masks: tuple[list[int], torch.Tensor] | None = None,  # grammar bitmasks of the constrained rows (guided.py)
) -> list[SampleResult]:
    """Pick one token per row. Greedy rows are batched; random rows use their own generator. Only the
    rows named in `masks` are masked; the grammar wins over `suppress` when both would leave nothing."""
    logits = logits.float().cpu()
    want_lp = any(p.logprobs is not None for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if want_lp else None  # before any masking
    if masks is not None or (suppress and any(suppress)):
        logits = logits.clone()
    if masks is not None:
        mask_logits(logits, masks)
    if suppress and any(suppress):
        for i, ids in enumerate(suppress):
            if ids:
                row = logits[i].clone()
                row[ids] = float("-inf")
                if masks is None or bool(torch.isfinite(row).any()):
                    logits[i] = row
    greedy_ids = logits.argmax(dim=-1).tolist()
    results: list[SampleResult] = []
    for i, p in enumerate(params):
        if p.greedy:
            tok = greedy_ids[i]
        else:
            probs = torch.softmax(_filter(logits[i], p), dim=-1)
            tok = int(torch.multinomial(probs, 1, generator=generators[i]).item())
        res = SampleResult(tok)
        if p.logprobs is not None and logprobs is not None:
            row = logprobs[i]
            res.logprob = float(row[tok])
            if p.logprobs > 0:
                vals, ids = torch.topk(row, p.logprobs)
                res.top_logprobs = list(zip(ids.tolist(), vals.tolist(), strict=True))
        results.append(res)
    return results
