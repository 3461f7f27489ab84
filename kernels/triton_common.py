"""What the Triton kernels and launchers share: the tile loader, accepted dtypes, the row-block rule, and the
metadata checks."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.metadata import LoRAMeta

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def block_m_for(max_seg_len: int) -> int:
    """Rows per tile: the smallest of 16 / 32 / 64 that holds the longest segment (decode: 16)."""
    return 16 if max_seg_len <= 16 else 32 if max_seg_len <= 32 else 64


def check_meta(meta: LoRAMeta, ranks: torch.Tensor, num_tokens: int, num_slots: int, r_max: int,
               device: torch.device, pages: torch.Tensor | None = None) -> None:
    """The metadata and ranks fit `num_slots` slots of rank <= `r_max` over `num_tokens` rows (and the page
    table, when given, is on the device)."""
    if pages is not None and pages.device != device:
        raise ValueError(f"pages on {pages.device}, tensors on {device}")
    if ranks.dim() != 1 or ranks.shape[0] != num_slots or ranks.dtype.is_floating_point:
        raise ValueError(f"ranks must be an integer [S={num_slots}] tensor, got shape {tuple(ranks.shape)} "
                         f"{ranks.dtype}")
    if meta.num_tokens != num_tokens:
        raise ValueError(f"meta.num_tokens {meta.num_tokens} != {num_tokens} rows")
    if meta.token_indices.device != device:
        raise ValueError(f"meta on {meta.token_indices.device}, tensors on {device}")
    if meta.num_segments and max(meta.slots) >= num_slots:
        raise ValueError(f"slot {max(meta.slots)} out of range for a pool of {num_slots} slots")
    for s, r in zip(meta.slots, meta.seg_ranks(ranks), strict=True):
        if not 0 <= r <= r_max:
            raise ValueError(f"rank {r} of slot {s} outside [0, R_max={r_max}]")


@triton.jit
def load_tile_at(tiles_ptr, tok_ptr, BLOCK_M: tl.constexpr, idx):
    """Tile `idx` (a row of ``LoRAMeta.tile_table``: tok_off, m_len, slot, c_off, c_len) and its rows.

    Returns (rows [BLOCK_M] int64 row ids into x / y, mask_m [BLOCK_M] which of them are real, slot int64,
    c_off, c_len): the tile covers columns [c_off, c_off + c_len) of the slot's rank (or bottleneck width).
    A tile with m_len 0 (the padding of a fixed-shape table, `kernels.capturable`) has no real row.
    """
    tile = tiles_ptr + idx * 5
    tok_off = tl.load(tile)
    m_len = tl.load(tile + 1)
    slot = tl.load(tile + 2).to(tl.int64)
    c_off = tl.load(tile + 3)
    c_len = tl.load(tile + 4)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < m_len
    rows = tl.load(tok_ptr + tok_off + offs_m, mask=mask_m, other=0).to(tl.int64)
    return rows, mask_m, slot, c_off, c_len


@triton.jit
def page_offsets(pages_ptr, slot, stride_ps, idx, mask, page_rank, stride_page, stride_row):
    """Element offsets, in a paged pool (`kernels/pages.py`), of the slot's rank rows (A) or rank columns (B)
    `idx` [BR]: rank index j lies at row/column j % page_rank of page pages[slot, j // page_rank]
    (`stride_page` apart, `stride_row` per rank index). Masked-off indices read page 0. int64 [BR].
    Shared by the shrink, expand and fused LoRA kernels."""
    page = tl.load(pages_ptr + slot * stride_ps + idx // page_rank, mask=mask, other=0).to(tl.int64)
    return page * stride_page + (idx % page_rank) * stride_row


@triton.jit
def load_tile(tiles_ptr, tok_ptr, BLOCK_M: tl.constexpr):
    """This program's tile: `load_tile_at` of row ``program_id(0)`` (shared by the LoRA and bottleneck kernels)."""
    return load_tile_at(tiles_ptr, tok_ptr, BLOCK_M, tl.program_id(0))
