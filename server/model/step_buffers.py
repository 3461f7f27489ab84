"""Capture-ready step metadata: max-size device buffers filled in place every step.

A step's index tensors (token ids, RoPE positions, KV write slots, logits rows, the LoRA token
order, fixed-shape LoRA row tiles and the paged-attention tables) are views into buffers allocated
once at start-up, sized for
`max_num_seqs` sequences and `max_batch_tokens` tokens. A CUDA graph captured over those views reads
the next step's values after they are copied in, with no new allocation (vLLM's LoRAKernelMeta and
SGLang's LoRABatchInfo do the same). On CUDA the values are written into a pinned host mirror and
copied with `non_blocking=True`; the host mirror is only rewritten at the next step's fill, after the
engine has synchronised on the previous step's logits, so the copies never race it. On the CPU the
buffers are host tensors written directly.

A step larger than the buffers (a caller that did not say its limits) grows them (counted in
`grows`) instead of failing; the engine sizes them so this never happens while it serves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_INT64 = ("token_ids", "positions", "write_slots", "lora_rows", "logits_rows")
_SEQ_INT32 = ("dec_q_start", "dec_ctx_len", "dec_prefix_len", "pre_q_start", "pre_q_len", "pre_ctx_len",
              "pre_prefix_len")


@dataclass
class PagedSeqs:
    """Paged-attention metadata of one kind of chunk (decode or prefill); see kernels/paged_attention.py."""

    block_tables: torch.Tensor  # [B, MB] int32: prefix blocks first, then the sequence's own
    q_start: torch.Tensor  # [B] int32: first query row
    q_len: torch.Tensor | None  # [B] int32 (prefill only; decode has one query each)
    ctx_len: torch.Tensor  # [B] int32: prefix + cached + this chunk
    prefix_len: torch.Tensor  # [B] int32
    max_q_len: int  # host bound on q_len

    @property
    def num_seqs(self) -> int:
        return int(self.block_tables.shape[0])


@dataclass
class PagedAttnMeta:
    decode: PagedSeqs | None  # single-token chunks
    prefill: PagedSeqs | None  # multi-token chunks
    block_size: int


class StepBuffers:
    """Owns the step's index buffers on `device` (and their pinned host mirrors on CUDA)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, device: torch.device) -> None:
        self.device = torch.device(device)
        self.grows = 0
        self._alloc(max(1, max_tokens), max(1, max_seqs), max(1, max_blocks_per_seq))

    def _alloc(self, max_tokens: int, max_seqs: int, width: int) -> None:
        self.max_tokens, self.max_seqs, self.width = max_tokens, max_seqs, width
        pin = self.device.type == "cuda"
        self.dev: dict[str, torch.Tensor] = {}
        self.host: dict[str, torch.Tensor] = {}

        def make(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
            self.dev[name] = torch.zeros(shape, dtype=dtype, device=self.device)
            self.host[name] = (torch.zeros(shape, dtype=dtype, pin_memory=True) if pin else self.dev[name])

        for name in _INT64:
            make(name, (max_tokens,), torch.int64)
        for name in _SEQ_INT32:
            make(name, (max_seqs,), torch.int32)
        make("dec_tables", (max_seqs, width), torch.int32)
        make("pre_tables", (max_seqs, width), torch.int32)
        # fixed-shape LoRA row tiles (kernels/capturable.py): a tile holds >= 1 token, so max_tokens rows suffice
        make("lora_tiles", (max_tokens, 5), torch.int32)

    def ensure(self, num_tokens: int, num_seqs: int, width: int) -> None:
        """Grow (rarely: a caller beyond the limits it declared) so one step of this size fits."""
        if num_tokens <= self.max_tokens and num_seqs <= self.max_seqs and width <= self.width:
            return
        self.grows += 1
        self._alloc(max(num_tokens, self.max_tokens), max(num_seqs, self.max_seqs), max(width, self.width))

    def put(self, name: str, values: Sequence[int]) -> torch.Tensor:
        """Write values into buffer `name`; return the device view [len(values)]."""
        n = len(values)
        if n:
            self.host[name].numpy()[:n] = values
            if self.host[name] is not self.dev[name]:
                self.dev[name][:n].copy_(self.host[name][:n], non_blocking=True)
        return self.dev[name][:n]

    def put_tables(self, name: str, tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """Write block tables row by row (rows shorter than the width keep stale, never-read entries);
        return the full-width device view [len(tables), width] (fixed row stride: capturable)."""
        n = len(tables)
        host = self.host[name].numpy()
        for i, t in enumerate(tables):
            host[i, :len(t)] = t
        if n and self.host[name] is not self.dev[name]:
            self.dev[name][:n].copy_(self.host[name][:n], non_blocking=True)
        return self.dev[name][:n]

    def put_tiles(self, tiles: Sequence[tuple[int, int, int, int, int]], n_rows: int) -> torch.Tensor:
        """Write LoRA row tiles, then padding tiles (all zero: m_len 0) up to n_rows; return the device view
        [n_rows, 5] (the launch grid's tile count, fixed for a given n_rows)."""
        host = self.host["lora_tiles"].numpy()
        n = len(tiles)
        if n:
            host[:n] = tiles
        host[n:n_rows] = 0
        if n_rows and self.host["lora_tiles"] is not self.dev["lora_tiles"]:
            self.dev["lora_tiles"][:n_rows].copy_(self.host["lora_tiles"][:n_rows], non_blocking=True)
        return self.dev["lora_tiles"][:n_rows]

    def storages(self) -> set[int]:
        """data_ptr of every device buffer (tests assert a step's tensors live in them)."""
        return {t.untyped_storage().data_ptr() for t in self.dev.values()}


def prefix_blocks(prefix_slots: Sequence[int], block_size: int) -> list[int]:
    """The blocks holding a prefix adapter's slots; they must be whole blocks from their start."""
    blocks = [prefix_slots[i] // block_size for i in range(0, len(prefix_slots), block_size)]
    for i, s in enumerate(prefix_slots):
        if s != blocks[i // block_size] * block_size + i % block_size:
            raise ValueError(f"prefix slot {i} = {s} is not block-aligned (block {blocks[i // block_size]}, "
                             f"size {block_size}): the paged kernels read prefixes through block tables")
    return blocks


def paged_meta(placed: Sequence[tuple[int, object]], block_size: int, bufs: StepBuffers) -> PagedAttnMeta:
    """Per-sequence paged-attention metadata of a laid-out step: (first row, SeqChunk) per chunk."""
    groups: dict[bool, list[tuple[int, int, int, int, list[int]]]] = {True: [], False: []}
    for row, c in placed:
        n = len(c.token_ids)  # type: ignore[attr-defined]
        start = c.start_pos  # type: ignore[attr-defined]
        ps = c.prefix_slots or []  # type: ignore[attr-defined]
        table = prefix_blocks(ps, block_size) if ps else []
        table = table + list(c.block_table[: -(-(start + n) // block_size)])  # type: ignore[attr-defined]
        groups[n == 1].append((row, n, len(ps) + start + n, len(ps), table))
    out: dict[bool, PagedSeqs | None] = {}
    for is_dec, seqs in groups.items():
        if not seqs:
            out[is_dec] = None
            continue
        pre = "dec_" if is_dec else "pre_"
        rows, lens, ctx, plen, tables = zip(*seqs, strict=True)
        out[is_dec] = PagedSeqs(
            block_tables=bufs.put_tables(pre + "tables", tables),
            q_start=bufs.put(pre + "q_start", rows),
            q_len=None if is_dec else bufs.put("pre_q_len", lens),
            ctx_len=bufs.put(pre + "ctx_len", ctx),
            prefix_len=bufs.put(pre + "prefix_len", plen),
            max_q_len=max(lens),
        )
    return PagedAttnMeta(decode=out[True], prefill=out[False], block_size=block_size)
