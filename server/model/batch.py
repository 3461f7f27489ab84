"""One step's ragged batch: what the engine asks for (SeqChunk) and the index tensors the decoder needs.

Index tensors are built once per step and shared by every layer. Chunks are laid out grouped by
adapter slot (this is the one place chunks are sorted), so each adapter's tokens form one contiguous
row range (kernels take slices, not gathers); logits come back in the caller's chunk order regardless.

Attention works in a per-sequence "virtual index" space: the sequence's prefix slots (if any) take
indices 0..P-1 and its own cached tokens P, P+1, ...; a query attends to every key whose index is
not greater than its own (and within the sliding window, if the layer has one).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from kernels import FixedLoRAMeta, LoRAMeta
from kernels.capturable import fixed_tiles, max_fixed_tiles
from server.model.step_buffers import PagedAttnMeta, StepBuffers, paged_meta


@dataclass
class SeqChunk:
    seq_id: int
    token_ids: list[int]  # tokens computed this step (prompt chunk, or 1 decode token)
    start_pos: int  # tokens of this sequence already in the KV cache
    block_table: list[int]  # the sequence's KV blocks, covering start_pos + len(token_ids)
    want_logits: bool  # logits of the chunk's last token needed (end of prompt, or decode)
    adapter_slot: int = -1  # device slot of the sequence's adapter, -1 = base (the runner adds its part)
    # Prefix tuning: flat KV-cache slots (same for every layer) holding read-only keys/values placed
    # ahead of this sequence's own context; every query sees all of them.
    prefix_slots: list[int] | None = None
    # Added to every RoPE position of this sequence (PEFT prefix tuning shifts positions by P).
    pos_offset: int = 0
    # Prompt tuning: [k, hidden] vectors replacing the input embeddings of this chunk's first k tokens.
    input_embeds: torch.Tensor | None = None
    # Prompt scoring: logits of every row from this one to the chunk's end (in order), instead of only the
    # last row's; None for the common case. Only sequences that score their prompt set it.
    logits_from: int | None = None


@dataclass
class PrefillPart:
    """A multi-token chunk: attention runs per sequence."""

    rows: slice  # its rows in the flat batch
    ctx: torch.Tensor | None  # [L] flat slots of prefix + own context; None: keys are the chunk itself
    q_idx: torch.Tensor  # [n] virtual index of each query token


@dataclass
class StepBatch:
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64 RoPE positions
    write_slots: torch.Tensor  # [T] int64 flat KV slots the new tokens' K/V go to
    embeds: list[tuple[int, torch.Tensor]]  # (first row, [k, hidden]) input embedding overrides
    segments: LoRAMeta | None  # rows grouped by row-hook slot; None: no row of this step has one
    active_slots: tuple[int, ...]  # distinct row-hook slots (see build_step) in use this step
    logits_rows: torch.Tensor  # [N] int64, in the caller's chunk order (a chunk with logits_from: its rows)
    decode_rows: torch.Tensor | None  # [S] rows of the single-token chunks (batched attention)
    decode_ctx: torch.Tensor | None  # [S, L_max] flat slots of each one's context, padded with 0
    decode_len: torch.Tensor | None  # [S] context length (prefix included); the query is the last
    prefills: list[PrefillPart]
    _masks: dict = field(default_factory=dict)
    attn: PagedAttnMeta | None = None  # block-table metadata for the paged kernels (Triton backend)
    # the same segments as fixed-shape device tensors (kernels/capturable.py) for a decode step a CUDA graph
    # may replay (build_step's `fixed_lora`); None otherwise
    lora_fixed: FixedLoRAMeta | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def decode_mask(self, window: int | None) -> torch.Tensor | None:
        """[S, 1, 1, L_max] bool: key j is visible to the decode query of row s; None when every key is
        (same-length contexts, no window): SDPA runs faster without a mask."""
        key = ("decode", window)
        if key not in self._masks and window is None and int(self.decode_len.min()) == self.decode_ctx.shape[1]:
            self._masks[key] = None
        if key not in self._masks:
            j = torch.arange(self.decode_ctx.shape[1], device=self.decode_ctx.device)[None, :]
            q = (self.decode_len - 1)[:, None]
            mask = j <= q
            if window is not None:
                mask &= j > q - window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, i: int, window: int | None, num_keys: int) -> torch.Tensor:
        """[n, L] bool causal (and windowed) mask of prefill part i."""
        key = ("prefill", i, window)
        if key not in self._masks:
            q = self.prefills[i].q_idx[:, None]
            j = torch.arange(num_keys, device=q.device)[None, :]
            mask = j <= q
            if window is not None:
                mask &= j > q - window
            self._masks[key] = mask
        return self._masks[key]


def _own_slots(block_table: list[int], start: int, length: int, block_size: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, start + length)]


def _context_slots(tables: list[list[int]], lengths: list[int], block_size: int) -> torch.Tensor:
    """[S, max(lengths)] flat slots of positions 0..len-1 of each sequence (padding rows point at slot 0)."""
    nblocks = [-(-n // block_size) for n in lengths]
    width = max(nblocks)
    bt = torch.tensor([t[:k] + [0] * (width - k) for t, k in zip(tables, nblocks, strict=True)],
                      dtype=torch.int64)
    pos = torch.arange(max(lengths))
    slots = bt[:, pos // block_size] * block_size + pos % block_size
    return slots.masked_fill_(pos[None, :] >= torch.tensor(lengths)[:, None], 0)


def _decode_context(seqs: list[SeqChunk], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Context slots [S, L_max] (prefix first) and context lengths [S] of the single-token chunks."""
    own_lens = [c.start_pos + 1 for c in seqs]
    own = _context_slots([c.block_table for c in seqs], own_lens, block_size)
    plens = [len(c.prefix_slots) if c.prefix_slots else 0 for c in seqs]
    lens = torch.tensor([p + n for p, n in zip(plens, own_lens, strict=True)], dtype=torch.int64)
    if not any(plens):
        return own, lens
    ctx = torch.zeros(len(seqs), int(lens.max()), dtype=torch.int64)
    for s, c in enumerate(seqs):
        p = plens[s]
        if p:
            ctx[s, :p] = torch.tensor(c.prefix_slots, dtype=torch.int64)
        ctx[s, p:p + own_lens[s]] = own[s, :own_lens[s]]
    return ctx, lens


def _check(c: SeqChunk, num_blocks: int, block_size: int, max_model_len: int, max_adapters: int,
           num_slots: int, hidden: int, vocab_size: int) -> None:
    """A chunk the decoder can run without an out-of-range index (the engine's bugs stop here)."""
    n = len(c.token_ids)
    if n == 0:
        raise ValueError(f"sequence {c.seq_id}: a chunk needs at least one token")
    if min(c.token_ids) < 0 or max(c.token_ids) >= vocab_size:
        # checked here because on CUDA an out-of-range embedding index is a device assert that
        # poisons the whole process
        raise ValueError(f"sequence {c.seq_id}: token ids must be in [0, {vocab_size})")
    end = c.start_pos + n
    if c.start_pos < 0 or end > max_model_len:
        raise ValueError(f"sequence {c.seq_id}: positions {c.start_pos}..{end - 1} exceed max_model_len "
                         f"{max_model_len}")
    if len(c.block_table) * block_size < end:
        raise ValueError(f"sequence {c.seq_id}: block table of {len(c.block_table)} blocks x {block_size} "
                         f"does not cover {end} tokens")
    need = c.block_table[: -(-end // block_size)]
    if min(need) < 0 or max(need) >= num_blocks:
        raise ValueError(f"sequence {c.seq_id}: block ids must be in [0, {num_blocks}), got {need}")
    if not -1 <= c.adapter_slot < max_adapters:
        raise ValueError(f"sequence {c.seq_id}: adapter_slot {c.adapter_slot} not in [-1, {max_adapters})")
    if c.prefix_slots and (min(c.prefix_slots) < 0 or max(c.prefix_slots) >= num_slots):
        raise ValueError(f"sequence {c.seq_id}: prefix slots must be in [0, {num_slots})")
    if c.logits_from is not None and not 0 <= c.logits_from < n:
        raise ValueError(f"sequence {c.seq_id}: logits_from {c.logits_from} not in [0, {n})")
    if c.input_embeds is not None and (c.input_embeds.dim() != 2 or c.input_embeds.shape[0] > n
                                       or c.input_embeds.shape[1] != hidden):
        raise ValueError(f"sequence {c.seq_id}: input_embeds must be [k <= {n}, {hidden}], "
                         f"got {tuple(c.input_embeds.shape)}")


def build_step(chunks: list[SeqChunk], *, block_size: int, num_blocks: int, max_model_len: int,
               max_adapters: int, hidden: int, vocab_size: int, device: torch.device,
               row_slots: frozenset[int] | None = None, buffers: StepBuffers | None = None,
               paged: bool = False, fixed_lora: bool = False) -> StepBatch:
    """Validate the chunks and lay them out as one flat batch.

    `row_slots`: the adapter slots whose family has per-row hooks (`server.model.hooks`); only their
    rows form segments (None: every adapter slot does). Other adapters' rows count as base rows there.
    With `buffers`, the step's index tensors are views into its preallocated buffers (capture-ready);
    with `paged`, block-table metadata for the paged attention kernels is added (needs `buffers`).
    With `fixed_lora` (and `buffers`), a step with segments also gets them as fixed-shape row tiles in the
    buffers (`StepBatch.lora_fixed`, padded to `max_fixed_tiles(T, max_adapters)`), for the decode graphs.
    """
    if paged and buffers is None:
        raise ValueError("build_step: paged attention metadata lives in step buffers; pass buffers")
    num_slots = num_blocks * block_size
    for c in chunks:
        _check(c, num_blocks, block_size, max_model_len, max_adapters, num_slots, hidden, vocab_size)
    row_slot = [c.adapter_slot if row_slots is None or c.adapter_slot in row_slots else -1 for c in chunks]
    order = sorted(range(len(chunks)), key=row_slot.__getitem__)
    tokens: list[int] = []
    positions: list[int] = []
    write: list[int] = []
    token_slots: list[int] = []
    embeds: list[tuple[int, torch.Tensor]] = []
    logit_rows: list[list[int]] = [[] for _ in chunks]
    decode: list[tuple[int, SeqChunk]] = []
    prefills: list[PrefillPart] = []
    placed: list[tuple[int, SeqChunk]] = []
    for i in order:
        c = chunks[i]
        row, n = len(tokens), len(c.token_ids)
        tokens.extend(c.token_ids)
        base = c.pos_offset + c.start_pos
        positions.extend(range(base, base + n))
        write.extend(_own_slots(c.block_table, c.start_pos, n, block_size))
        token_slots.extend([row_slot[i]] * n)
        if c.input_embeds is not None and c.input_embeds.shape[0] > 0:
            embeds.append((row, c.input_embeds))
        if c.logits_from is not None:
            logit_rows[i] = list(range(row + c.logits_from, row + n))
        elif c.want_logits:
            logit_rows[i] = [row + n - 1]
        placed.append((row, c))
        p = len(c.prefix_slots) if c.prefix_slots else 0
        if n == 1:
            decode.append((row, c))
            continue
        if paged:  # the kernels read block tables; the twin's gather indices are not needed
            continue
        q_idx = torch.arange(p + c.start_pos, p + c.start_pos + n, device=device)
        ctx = None
        if c.start_pos > 0 or p:
            own = _context_slots([c.block_table], [c.start_pos + n], block_size)[0]
            if p:
                own = torch.cat([torch.tensor(c.prefix_slots, dtype=torch.int64), own])
            ctx = own.to(device)
        prefills.append(PrefillPart(rows=slice(row, row + n), ctx=ctx, q_idx=q_idx))

    decode_rows = decode_ctx = decode_len = None
    if decode and not paged:
        decode_ctx, decode_len = _decode_context([c for _, c in decode], block_size)
        decode_ctx, decode_len = decode_ctx.to(device), decode_len.to(device)
        decode_rows = torch.tensor([r for r, _ in decode], dtype=torch.int64, device=device)

    active = tuple(sorted({s for s in token_slots if s >= 0}))
    logits_rows = [r for rows in logit_rows for r in rows]
    attn = None
    lora_fixed = None
    if buffers is None:
        meta = LoRAMeta.from_token_slots(token_slots, device=device) if active else None
        put = lambda _name, xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
    else:
        width = max(-(-(c.start_pos + len(c.token_ids)) // block_size)
                    + -(-len(c.prefix_slots or []) // block_size) for c in chunks)
        buffers.ensure(len(tokens), len(chunks), width)
        put = buffers.put
        meta = None
        if active:  # segments on the host; the one tensor the kernels read goes into its buffer
            meta = LoRAMeta.from_token_slots(token_slots, device="cpu")
            meta = replace(meta, token_indices=put("lora_rows", meta.token_indices.tolist()))
            if fixed_lora:
                lora_fixed = FixedLoRAMeta(
                    token_indices=meta.token_indices,
                    tiles=buffers.put_tiles(fixed_tiles(meta), max_fixed_tiles(len(tokens), max_adapters)),
                    num_tokens=len(tokens))
        if paged:
            attn = paged_meta(placed, block_size, buffers)
    return StepBatch(
        token_ids=put("token_ids", tokens),
        positions=put("positions", positions),
        write_slots=put("write_slots", write),
        embeds=embeds,
        segments=meta,
        active_slots=active,
        logits_rows=put("logits_rows", logits_rows),
        decode_rows=decode_rows,
        decode_ctx=decode_ctx,
        decode_len=decode_len,
        prefills=prefills,
        attn=attn,
        lora_fixed=lora_fixed,
    )
