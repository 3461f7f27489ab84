"""Guided decoding in the engine: the grammar mask for the constrained rows of a sampled batch.

A request with a grammar carries a `Matcher` (server.structured.grammar) that the engine advances in
`_advance`, exactly when the sampled token is appended to `output_ids`; so after preemption-by-recompute
or a chunked prefill (which recompute KV but never re-sample) the matcher still stands at the end of
`output_ids`. Rows without a matcher are never touched and cost nothing.
"""

from __future__ import annotations

from typing import Any

import torch


def grammar_masks(matchers: list[Any]) -> tuple[list[int], torch.Tensor] | None:
    """(rows, bitmask) for the rows that have a matcher, or None when no row is constrained."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    from server.structured.grammar import allocate_bitmask

    bitmask = allocate_bitmask(len(rows), matchers[rows[0]].vocab_size)
    for j, i in enumerate(rows):
        matchers[i].fill(bitmask, j)
    return rows, bitmask


def mask_logits(logits: torch.Tensor, masks: tuple[list[int], torch.Tensor]) -> None:
    """Apply `grammar_masks`'s result to logits [n, vocab] in place."""
    from server.structured.grammar import apply_bitmask

    rows, bitmask = masks
    apply_bitmask(logits, bitmask, rows)
