"""Helpers for the model tests: HF reference logits, prompts, block tables, chunk builders."""

from __future__ import annotations

import random

import torch

from server.model.runner import SeqChunk


def hf_last_logits(model: torch.nn.Module, seqs: list[list[int]]) -> torch.Tensor:
    """HF's logits of the last position of each sequence, each run alone (full recompute, no padding)."""
    with torch.no_grad():
        return torch.stack([model(torch.tensor([s])).logits[0, -1].float() for s in seqs])


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def shuffled_tables(num_seqs: int, blocks_each: int, num_blocks: int, seed: int = 0) -> list[list[int]]:
    """Disjoint, non-contiguous block tables drawn from a shuffled pool."""
    pool = list(range(num_blocks))
    random.Random(seed).shuffle(pool)
    return [[pool.pop() for _ in range(blocks_each)] for _ in range(num_seqs)]


def prefill_chunks(prompts: list[list[int]], tables: list[list[int]], slots: list[int] | None = None
                   ) -> list[SeqChunk]:
    slots = slots or [-1] * len(prompts)
    return [SeqChunk(i, p, 0, tables[i], True, adapter_slot=slots[i]) for i, p in enumerate(prompts)]


def decode_chunks(seqs: list[list[int]], new: list[int], tables: list[list[int]],
                  slots: list[int] | None = None) -> list[SeqChunk]:
    """One decode token per sequence; appends it to seqs (the running full token lists)."""
    slots = slots or [-1] * len(seqs)
    out = []
    for i, (s, t) in enumerate(zip(seqs, new, strict=True)):
        out.append(SeqChunk(i, [t], len(s), tables[i], True, adapter_slot=slots[i]))
        s.append(t)
    return out
