"""Triton LoRA expand: y += scale[slot] * h @ B[slot].T over per-slot token segments (compact tiles).

Grid = (compact row-block tiles, ceil(N / BLOCK_N)). Each tile is one row block of one segment
(``LoRAMeta.tile_table`` with block_r = 0) and loops over the slot's *own* rank only, so base
tokens, empty segments and other slots' rank padding cost nothing. B is read through a page table
(`kernels/pages.py`): rank column j of a slot is column j % PR of page pages[slot, j // PR].
Segments are disjoint and rows within a segment distinct, so the read-modify-write of y needs no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.metadata import LoRAMeta
from kernels.pages import resolve_pages
from kernels.triton_common import DTYPES, block_m_for, check_meta, expand_add, load_tile


@triton.jit
def _expand_kernel(
    h_ptr,  # [T, R_max]
    b_ptr,  # [P, N, PR] pool of B pages (any strides)
    y_ptr,  # [T, N] (row stride may exceed N: a column slice of a wider output)
    tok_ptr,  # [T_lora] int64
    tiles_ptr,  # [n_tiles, 5] int32 (tok_off, m_len, slot, 0, r_s)
    scales_ptr,  # [S] float32
    pages_ptr,  # [S, MP] int32 page table
    N,
    stride_hm,
    stride_bp,
    stride_bn,
    stride_br,
    stride_ym,
    stride_ps,
    page_rank,
    ranks_ptr,  # [S] int32 on the device (FIXED only)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    FIXED: tl.constexpr = False,
):
    rows, mask_m, slot, _, r_len = load_tile(tiles_ptr, tok_ptr, BLOCK_M)
    if FIXED:  # fixed-shape row tiles (kernels/capturable.py): the slot's rank comes from the device
        live = tl.load(tiles_ptr + tl.program_id(0) * 5 + 1) > 0
        r_len = tl.where(live, tl.load(ranks_ptr + slot), 0)
        mask_m = mask_m & ((tl.zeros([BLOCK_M], dtype=tl.int32) + r_len) > 0)  # rank 0: y is not rewritten
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    h_rows = h_ptr + rows[:, None] * stride_hm  # [BM, 1]
    b_cols = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn  # [1, BN]
    expand_add(y_ptr, stride_ym, rows, offs_n, mask_m, mask_n, h_rows, b_cols, pages_ptr, slot, stride_ps, page_rank,
               stride_bp, stride_br, r_len, tl.load(scales_ptr + slot), BLOCK_M, BLOCK_N, BLOCK_R, PRECISION)


def expand_config(max_seg_len: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_R, num_warps) from a fixed table; autotune does not run under the interpreter."""
    block_m = block_m_for(max_seg_len)
    block_n = 64 if n <= 1024 or block_m <= 16 else 128
    num_warps = 4 if block_m * block_n <= 4096 else 8
    return block_m, block_n, 16, num_warps


def _check(h: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor, meta: LoRAMeta,
           y: torch.Tensor, pages: torch.Tensor, r_max: int) -> None:
    if b.dtype not in DTYPES:
        raise ValueError(f"b dtype {b.dtype} unsupported; expected one of {DTYPES}")
    if b.dim() != 3:
        raise ValueError(f"b must be a [P, N, PR] pool, got shape {tuple(b.shape)}")
    if y.dim() != 2 or y.dtype != b.dtype or y.stride(1) != 1:
        raise ValueError(f"y must be 2-D {b.dtype} with unit column stride, got shape {tuple(y.shape)} "
                         f"{y.dtype} stride {y.stride()}")
    if h.dim() != 2 or h.stride(1) != 1 or h.dtype not in (b.dtype, torch.float32):
        raise ValueError(f"h must be 2-D {b.dtype} or float32 with unit column stride, got shape "
                         f"{tuple(h.shape)} {h.dtype} stride {h.stride()}")
    if h.shape[0] != y.shape[0] or h.shape[1] != r_max:
        raise ValueError(f"h shape {tuple(h.shape)} does not match [T={y.shape[0]}, R_max={r_max}]")
    if y.shape[1] != b.shape[1]:
        raise ValueError(f"y width {y.shape[1]} != b output size N={b.shape[1]}")
    if not (h.device == b.device == y.device == scales.device == meta.token_indices.device):
        raise ValueError(f"devices differ: h {h.device}, b {b.device}, y {y.device}, scales {scales.device}, "
                         f"meta {meta.token_indices.device}")
    s = pages.shape[0]
    if scales.shape != (s,) or scales.dtype != torch.float32:
        raise ValueError(f"scales must be float32 [S={s}], got shape {tuple(scales.shape)} {scales.dtype}")
    check_meta(meta, ranks, y.shape[0], s, r_max, y.device, pages)


def lora_expand_triton(
    h: torch.Tensor,  # [T, R_max] output of lora_shrink (b.dtype or float32)
    b: torch.Tensor,  # [P, N, PR] pool of B pages (any strides); [S, N, R_max] when pages is None
    ranks: torch.Tensor,  # [S] integer; read on the host once per meta (a host tensor avoids a sync)
    scales: torch.Tensor,  # [S] float32, on the device
    meta: LoRAMeta,
    y: torch.Tensor,  # [T, N] b.dtype, updated in place; may be a column slice (stride(1) == 1)
    *,
    pages: torch.Tensor | None = None,  # [S, MP] int32 page table on the device; None: identity
) -> torch.Tensor:
    """Semantics: for each token t with slot s >= 0: y[t] += scales[s] * (h[t, :r_s] @ B_s.T), B_s the slot's
    rank columns through the page table (`kernels.reference.lora_expand_ref`)."""
    pages, page_rank, r_max = resolve_pages(b.transpose(1, 2), pages)
    _check(h, b, ranks, scales, meta, y, pages, r_max)
    if meta.num_segments == 0 or max(meta.seg_ranks(ranks)) == 0:
        return y
    n = b.shape[1]
    block_m, block_n, block_r, num_warps = expand_config(meta.max_seg_len, n)
    tiles = meta.tile_table(ranks, block_m, 0)
    _expand_kernel[(tiles.shape[0], triton.cdiv(n, block_n))](
        h, b, y, meta.token_indices, tiles, scales, pages,
        n, h.stride(0), b.stride(0), b.stride(1), b.stride(2), y.stride(0), pages.stride(0), page_rank,
        pages,  # ranks_ptr: unread unless FIXED
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        PRECISION="ieee" if b.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    return y
