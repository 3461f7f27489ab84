"""Prompt scoring: the log-probability of every prompt token under the model (echo + logprobs, vLLM's
`prompt_logprobs`), gathered chunk by chunk while the prompt is prefilled.

Prompt token j (j >= 1) is scored by the logits at KV position `num_virtual + j - 1`; token 0 has no
context of the user's and is reported as None (OpenAI's legacy echo, vLLM). Virtual tokens of a prompt-
tuning adapter are never scored and a prefix adapter's KV prefix holds no positions of the sequence, so
only the user's tokens appear. After a preemption the prompt is prefilled again; positions already
scored are not scored twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PromptLogprob:
    """One scored prompt token: its logprob, its rank in the distribution (1 = most likely), top-N."""

    token_id: int
    logprob: float
    rank: int
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class PromptScorer:
    prompt_ids: list[int]
    num_virtual: int  # KV positions ahead of the prompt that are not the user's (prompt tuning)
    top_n: int  # 0 = the prompt token only
    entries: list[PromptLogprob | None] = field(default_factory=lambda: [None])

    @property
    def done(self) -> bool:
        return len(self.entries) >= len(self.prompt_ids)

    def _next_position(self) -> int:
        """KV position whose logits score the next unscored prompt token."""
        return self.num_virtual + len(self.entries) - 1

    def logits_from(self, start: int, n: int) -> int | None:
        """First row of the chunk [start, start + n) whose logits this scorer needs (None: none)."""
        if self.done:
            return None
        pos = self._next_position()
        last = self.num_virtual + len(self.prompt_ids) - 2  # the position scoring the last prompt token
        if pos >= start + n or last < start:
            return None
        return max(pos - start, 0)

    def add(self, first_pos: int, logits: torch.Tensor) -> None:
        """Score from `logits` [rows, vocab], the logits of KV positions first_pos, first_pos + 1, ..."""
        pos = self._next_position()
        end = min(first_pos + logits.shape[0], self.num_virtual + len(self.prompt_ids) - 1)
        if pos < first_pos or pos >= end:
            return
        rows = logits[pos - first_pos:end - first_pos].float()
        lp = torch.log_softmax(rows, dim=-1)
        j0 = pos - self.num_virtual + 1
        targets = torch.tensor(self.prompt_ids[j0:j0 + rows.shape[0]], device=lp.device)
        chosen = lp.gather(1, targets[:, None])
        ranks = (lp > chosen).sum(-1) + 1
        top = torch.topk(lp, self.top_n, dim=-1) if self.top_n > 0 else None
        chosen_l, ranks_l = chosen[:, 0].tolist(), ranks.tolist()
        top_v = top.values.tolist() if top is not None else None
        top_i = top.indices.tolist() if top is not None else None
        for i, t in enumerate(targets.tolist()):
            tops = list(zip(top_i[i], top_v[i], strict=True)) if top_i is not None else None
            self.entries.append(PromptLogprob(t, chosen_l[i], ranks_l[i], tops))
