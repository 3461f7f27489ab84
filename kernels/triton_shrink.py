"""Triton LoRA shrink: h = x @ A[slot].T over per-slot token segments (SGMV-style, compact tiles).

Work is a host-built tile list (``LoRAMeta.tile_table``): each segment contributes
ceil(len / BLOCK_M) row blocks times ceil(r_s / BLOCK_R) blocks of its *own* rank, so base tokens,
empty segments and other slots' rank padding launch nothing. Rows are gathered through
``meta.token_indices``; activations are never permuted. A is read through a page table
(`kernels/pages.py`): rank row j of a slot is row j % PR of page pages[slot, j // PR] of the pool.
At small token counts the hidden dim is split across programs (split-K) that add into an fp32 workspace.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.metadata import LoRAMeta
from kernels.pages import resolve_pages
from kernels.triton_common import DTYPES, block_m_for, check_meta, load_tile, load_tile_at, page_offsets, shrink_acc


@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, K]
    a_ptr,  # [P, PR, K] pool of A pages
    out_ptr,  # [T, R_max]
    tok_ptr,  # [T_lora] int64
    tiles_ptr,  # [n_tiles, 5] int32 (tok_off, m_len, slot, r_off, r_len)
    pages_ptr,  # [S, MP] int32 page table
    K,
    stride_xm,
    stride_ap,
    stride_ar,
    stride_om,
    stride_ps,
    page_rank,
    k_per_split,
    ranks_ptr,  # [S] int32 on the device (FIXED only)
    n_rank_blocks,  # ceil(R_max / BLOCK_R) (FIXED only)
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr,
    FIXED: tl.constexpr = False,
):
    if FIXED:  # fixed-shape row tiles (kernels/capturable.py): rank block and rank come from the device
        tile = tl.program_id(0) // n_rank_blocks
        rows, mask_m, slot, _, _ = load_tile_at(tiles_ptr, tok_ptr, BLOCK_M, tile)
        r_off = (tl.program_id(0) % n_rank_blocks) * BLOCK_R
        live = tl.load(tiles_ptr + tile * 5 + 1) > 0
        r_len = tl.where(live, tl.load(ranks_ptr + slot) - r_off, 0)  # <= 0: nothing to do (padding tile)
    else:
        rows, mask_m, slot, r_off, r_len = load_tile(tiles_ptr, tok_ptr, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < r_len
    cols = (r_off + offs_r).to(tl.int64)

    x_rows = x_ptr + rows[:, None] * stride_xm  # [BM, 1]
    a_rows = a_ptr + page_offsets(pages_ptr, slot, stride_ps, cols, mask_r, page_rank, stride_ap,
                                  stride_ar)[None, :]  # [1, BR]
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if FIXED:
        k_end = tl.where(r_len > 0, k_end, k_start)  # an empty tile loops zero times
    acc = shrink_acc(x_rows, a_rows, mask_m, mask_r, k_start, k_end, BLOCK_M, BLOCK_R, BLOCK_K, PRECISION)

    o = out_ptr + rows[:, None] * stride_om + cols[None, :]
    mask_o = mask_m[:, None] & mask_r[None, :]
    if ATOMIC:
        tl.atomic_add(o, acc, mask=mask_o)
    else:
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=mask_o)


def shrink_config(max_seg_len: int, max_rank: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_R, BLOCK_K, num_warps) from a fixed table; autotune does not run under the interpreter."""
    block_m = block_m_for(max_seg_len)
    # Small rank blocks: a rank-8 slot next to a rank-64 one pays for 16 columns, not 64.
    block_r = 16 if block_m <= 32 or max_rank <= 16 else 32
    block_k = 128 if k >= 1024 else 64
    num_warps = 4 if block_m * block_r <= 1024 else 8
    return block_m, block_r, block_k, num_warps


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_k(n_tiles: int, k: int, block_k: int, device: torch.device) -> int:
    """Fill the GPU when few tiles exist (decode), keeping >= 4 K-blocks per program."""
    if device.type != "cuda":
        return 1
    target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    k_blocks = triton.cdiv(k, block_k)
    return max(1, min(target // max(n_tiles, 1), k_blocks // 4))


def _check(x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, meta: LoRAMeta,
           out: torch.Tensor | None, pages: torch.Tensor, r_max: int) -> None:
    if x.dtype not in DTYPES:
        raise ValueError(f"x dtype {x.dtype} unsupported; expected one of {DTYPES}")
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D with unit column stride, got shape {tuple(x.shape)} "
                         f"stride {x.stride()}")
    if a.dim() != 3 or a.dtype != x.dtype or a.stride(2) != 1:
        raise ValueError(f"a must be a [P, PR, K] {x.dtype} pool with unit K stride, got shape {tuple(a.shape)} "
                         f"{a.dtype} stride {a.stride()}")
    if a.shape[2] != x.shape[1]:
        raise ValueError(f"a hidden size {a.shape[2]} != x hidden size {x.shape[1]}")
    if a.device != x.device:
        raise ValueError(f"a on {a.device}, x on {x.device}")
    check_meta(meta, ranks, x.shape[0], pages.shape[0], r_max, x.device, pages)
    if out is not None:
        if tuple(out.shape) != (x.shape[0], r_max) or out.stride(1) != 1:
            raise ValueError(f"out must be [{x.shape[0]}, {r_max}] with unit column stride, got "
                             f"{tuple(out.shape)} stride {out.stride()}")
        if out.dtype not in (x.dtype, torch.float32) or out.device != x.device:
            raise ValueError(f"out must be {x.dtype} or float32 on {x.device}, got {out.dtype} on {out.device}")


def lora_shrink_triton(
    x: torch.Tensor,  # [T, K] activations (unit column stride)
    a: torch.Tensor,  # [P, PR, K] pool of A pages (unit K stride), x.dtype; [S, R_max, K] when pages is None
    ranks: torch.Tensor,  # [S] integer; read on the host once per meta (a host tensor avoids a sync)
    meta: LoRAMeta,
    out: torch.Tensor | None = None,  # [T, R_max] x.dtype or float32, R_max = MP * PR
    *,
    split_k: int | None = None,  # None: chosen from the shape; > 1 only when out is None
    pages: torch.Tensor | None = None,  # [S, MP] int32 page table on the device; None: identity
) -> torch.Tensor:
    """Semantics: for each token t with slot s >= 0: out[t, :r_s] = x[t] @ A_s.T, A_s the slot's rank rows
    through the page table (`kernels.reference.lora_shrink_ref`).

    Rows of base tokens and columns >= r_s are left untouched (zeros if out is fresh).
    """
    pages, page_rank, r_max = resolve_pages(a, pages)
    _check(x, a, ranks, meta, out, pages, r_max)
    fresh = out is None
    if fresh:
        out = torch.zeros(x.shape[0], r_max, dtype=x.dtype, device=x.device)
    if meta.num_segments == 0:
        return out
    seg_r = meta.seg_ranks(ranks)
    max_rank = max(seg_r)
    if max_rank == 0:
        return out
    k = x.shape[1]
    block_m, block_r, block_k, num_warps = shrink_config(meta.max_seg_len, max_rank, k)
    tiles = meta.tile_table(ranks, block_m, block_r)
    n_tiles = tiles.shape[0]
    if split_k is None:
        split_k = _split_k(n_tiles, k, block_k, x.device) if fresh else 1
    if split_k < 1 or (split_k > 1 and not fresh):
        raise ValueError(f"split_k {split_k} invalid: must be >= 1, and 1 when out is given")
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    atomic = split_k > 1
    # Split-K partial sums meet in fp32 (atomics), then round once to the output dtype.
    dst = torch.zeros_like(out, dtype=torch.float32) if atomic and out.dtype != torch.float32 else out
    _shrink_kernel[(n_tiles, split_k)](
        x, a, dst, meta.token_indices, tiles, pages,
        k, x.stride(0), a.stride(0), a.stride(1), dst.stride(0), pages.stride(0), page_rank, k_per_split,
        pages, 1,  # ranks_ptr, n_rank_blocks: unread unless FIXED
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, ATOMIC=atomic,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    if dst is not out:
        out.copy_(dst)
    return out
