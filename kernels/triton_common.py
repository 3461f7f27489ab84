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
def shrink_acc(x_rows, a_rows, mask_m, mask_r, k_start, k_end, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """The fp32 [BM, BR] tile x[rows, k_start:k_end] @ A[cols, k_start:k_end].T: `x_rows` [BM, 1] row addresses
    of x, `a_rows` [1, BR] rank-row addresses of A (`page_offsets`). Loads upcast to fp32 (fp32 accumulation,
    and the CPU interpreter mis-reads bf16 otherwise)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        kk = k + offs_k
        mask_k = kk < k_end
        xt = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        at = tl.load(a_rows + kk[:, None], mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(xt, at, input_precision=PRECISION)
    return acc


@triton.jit
def expand_add(y_ptr, stride_ym, rows, offs_n, mask_m, mask_n, h_rows, b_cols, pages_ptr, slot, stride_ps,
               page_rank, stride_bp, stride_br, r_len, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """y[rows, offs_n] += scale * h[rows, :r_len] @ B[offs_n, :r_len].T, looping over the slot's own rank:
    `h_rows` [BM, 1] row addresses of h, `b_cols` [1, BN] column addresses of B's pool (pages added per rank
    block, `page_offsets`). Segments' rows are distinct, so the read-modify-write needs no atomics."""
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, r_len, BLOCK_R):  # own rank only
        rr = r + offs_r
        mask_r = rr < r_len
        b_at = b_cols + page_offsets(pages_ptr, slot, stride_ps, rr, mask_r, page_rank, stride_bp,
                                     stride_br)[:, None]  # [BR, BN]
        ht = tl.load(h_rows + rr[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        bt = tl.load(b_at, mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(ht, bt, input_precision=PRECISION)
    yp = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
    mask_y = mask_m[:, None] & mask_n[None, :]
    yv = tl.load(yp, mask=mask_y, other=0.0).to(tl.float32)
    tl.store(yp, (yv + scale * acc).to(y_ptr.dtype.element_ty), mask=mask_y)


@triton.jit
def load_tile(tiles_ptr, tok_ptr, BLOCK_M: tl.constexpr):
    """This program's tile: `load_tile_at` of row ``program_id(0)`` (shared by the LoRA and bottleneck kernels)."""
    return load_tile_at(tiles_ptr, tok_ptr, BLOCK_M, tl.program_id(0))
