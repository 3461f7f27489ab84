"""Fused LoRA launches for projections that share one input (q/k/v; gate/up): one shrink launch and one expand
launch for up to three modules, over fixed-shape step metadata (`kernels/capturable.py`).

At decode shapes a module's LoRA work is a few kilobytes of A and B per adapter, so the cost of three
modules run one after another is mostly launches. Here:
- the shrink grid is (modules x row tiles x rank blocks, split_k): each program picks its module's A pool,
  page table and device ranks by its program id, and writes h[:, m * R_max:(m + 1) * R_max] (fp32; split-K
  partial sums meet there through atomics when the step has few tiles);
- the expand grid is (row tiles, sum over modules of ceil(N_m / BLOCK_N)): each column block belongs to one
  module and adds straight into that module's output, which may be a column slice of the fused q/k/v output
  (no temporary, no copy).
Semantics are the twins' (`kernels/reference.py`) applied module by module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.capturable import FIXED_BLOCK_R, FixedLoRAMeta, LaunchConfig, _check, expand_launch, shrink_launch
from kernels.pages import resolve_pages
from kernels.triton_common import expand_add, load_tile_at, page_offsets, shrink_acc

MAX_MODULES = 3


@triton.jit
def _pick(m, v0, v1, v2):
    """v0, v1 or v2 by module index m (scalars or pointers)."""
    return tl.where(m == 0, v0, tl.where(m == 1, v1, v2))


@triton.jit
def _fused_shrink_kernel(
    x_ptr,  # [T, K]
    tok_ptr,  # [T_lora] int64
    tiles_ptr,  # [n_tiles, 5] int32 row tiles (tok_off, m_len, slot, 0, 0)
    h_ptr,  # [T, NUM_MODULES * R_max] float32
    a0_ptr, a1_ptr, a2_ptr,  # [P, PR, K] pools of A pages per module
    p0_ptr, p1_ptr, p2_ptr,  # [S, MP] int32 page tables
    r0_ptr, r1_ptr, r2_ptr,  # [S] int32 ranks on the device
    sap0, sap1, sap2,  # pool page strides
    sar0, sar1, sar2,  # pool rank-row strides
    sps0, sps1, sps2,  # page-table row strides
    pr0, pr1, pr2,  # page ranks
    K,
    stride_xm,
    stride_hm,
    r_max,  # h columns per module
    n_rank_blocks,
    k_per_split,
    NUM_MODULES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    m = pid % NUM_MODULES
    rest = pid // NUM_MODULES
    tile = rest // n_rank_blocks
    r_off = (rest % n_rank_blocks) * BLOCK_R
    rows, mask_m, slot, _, _ = load_tile_at(tiles_ptr, tok_ptr, BLOCK_M, tile)
    a_ptr = _pick(m, a0_ptr, a1_ptr, a2_ptr)
    pages_ptr = _pick(m, p0_ptr, p1_ptr, p2_ptr)
    ranks_ptr = _pick(m, r0_ptr, r1_ptr, r2_ptr)
    stride_ap = _pick(m, sap0, sap1, sap2)
    stride_ar = _pick(m, sar0, sar1, sar2)
    stride_ps = _pick(m, sps0, sps1, sps2)
    page_rank = _pick(m, pr0, pr1, pr2)
    live = tl.load(tiles_ptr + tile * 5 + 1) > 0
    r_len = tl.where(live, tl.load(ranks_ptr + slot) - r_off, 0)  # <= 0: nothing to do

    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < r_len
    cols = (r_off + offs_r).to(tl.int64)
    x_rows = x_ptr + rows[:, None] * stride_xm
    a_rows = a_ptr + page_offsets(pages_ptr, slot, stride_ps, cols, mask_r, page_rank, stride_ap,
                                  stride_ar)[None, :]  # [1, BR]
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    k_end = tl.where(r_len > 0, k_end, k_start)  # an empty tile loops zero times
    acc = shrink_acc(x_rows, a_rows, mask_m, mask_r, k_start, k_end, BLOCK_M, BLOCK_R, BLOCK_K, PRECISION)
    o = h_ptr + rows[:, None] * stride_hm + (m * r_max + cols)[None, :]
    mask_o = mask_m[:, None] & mask_r[None, :]
    if ATOMIC:
        tl.atomic_add(o, acc, mask=mask_o)
    else:
        tl.store(o, acc, mask=mask_o)


@triton.jit
def _fused_expand_kernel(
    h_ptr,  # [T, NUM_MODULES * R_max] float32
    tok_ptr,
    tiles_ptr,
    b0_ptr, b1_ptr, b2_ptr,  # [P, N_m, PR] pools of B pages (any strides)
    y0_ptr, y1_ptr, y2_ptr,  # [T, N_m] outputs (column slices allowed: unit column stride)
    p0_ptr, p1_ptr, p2_ptr,
    r0_ptr, r1_ptr, r2_ptr,
    c0_ptr, c1_ptr, c2_ptr,  # [S] float32 scales
    n0, n1, n2,  # output widths
    nb0, nb1,  # column blocks of modules 0 and 1
    sbp0, sbp1, sbp2,
    sbn0, sbn1, sbn2,
    sbr0, sbr1, sbr2,
    sym0, sym1, sym2,
    sps0, sps1, sps2,
    pr0, pr1, pr2,
    stride_hm,
    r_max,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows, mask_m, slot, _, _ = load_tile_at(tiles_ptr, tok_ptr, BLOCK_M, tl.program_id(0))
    pid_n = tl.program_id(1)
    m = (pid_n >= nb0).to(tl.int32) + (pid_n >= nb0 + nb1).to(tl.int32)
    nblock = pid_n - _pick(m, 0, nb0, nb0 + nb1)
    b_ptr = _pick(m, b0_ptr, b1_ptr, b2_ptr)
    y_ptr = _pick(m, y0_ptr, y1_ptr, y2_ptr)
    pages_ptr = _pick(m, p0_ptr, p1_ptr, p2_ptr)
    ranks_ptr = _pick(m, r0_ptr, r1_ptr, r2_ptr)
    scales_ptr = _pick(m, c0_ptr, c1_ptr, c2_ptr)
    N = _pick(m, n0, n1, n2)
    stride_bp = _pick(m, sbp0, sbp1, sbp2)
    stride_bn = _pick(m, sbn0, sbn1, sbn2)
    stride_br = _pick(m, sbr0, sbr1, sbr2)
    stride_ym = _pick(m, sym0, sym1, sym2)
    stride_ps = _pick(m, sps0, sps1, sps2)
    page_rank = _pick(m, pr0, pr1, pr2)
    live = tl.load(tiles_ptr + tl.program_id(0) * 5 + 1) > 0
    r_len = tl.where(live, tl.load(ranks_ptr + slot), 0)
    mask_m = mask_m & ((tl.zeros([BLOCK_M], dtype=tl.int32) + r_len) > 0)  # rank 0: y is not rewritten

    offs_n = nblock * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    h_rows = h_ptr + rows[:, None] * stride_hm + m * r_max
    b_cols = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn
    expand_add(y_ptr, stride_ym, rows, offs_n, mask_m, mask_n, h_rows, b_cols, pages_ptr, slot, stride_ps, page_rank,
               stride_bp, stride_br, r_len, tl.load(scales_ptr + slot), BLOCK_M, BLOCK_N, BLOCK_R, PRECISION)


# (a pool, b pool, device ranks, scales, page table or None)
Module = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def _pad3(values: list) -> list:
    return values + [values[0]] * (MAX_MODULES - len(values))


def lora_apply_fused(
    x: torch.Tensor,  # [T, K] the modules' shared input
    ys: Sequence[torch.Tensor],  # per module [T, N_m], updated in place (column slices of one output allowed)
    modules: Sequence[Module],  # per module (a pool, b pool, device ranks, scales, page table or None)
    meta: FixedLoRAMeta,
    *,
    split_k: int | None = None,
    config: LaunchConfig | None = None,  # tuning overrides of both launches (None: the tables')
) -> None:
    """ys[m][t] += scales_m[s] * (x[t] @ A_m,s.T) @ B_m,s.T for every adapter row t of slot s, every module m,
    in one shrink launch and one expand launch (grids from shapes only: capturable)."""
    nm = len(modules)
    if not 1 <= nm <= MAX_MODULES or len(ys) != nm:
        raise ValueError(f"lora_apply_fused takes 1..{MAX_MODULES} modules and one output each, got {nm} modules "
                         f"and {len(ys)} outputs")
    resolved = []
    for i, ((a, b, ranks, scales, pages), y) in enumerate(zip(modules, ys, strict=True)):
        pages, page_rank, r_max = resolve_pages(a, pages)
        _check(x, ranks, meta, pages, r_max)
        if a.dtype != x.dtype or a.stride(2) != 1 or a.shape[2] != x.shape[1] or a.device != x.device:
            raise ValueError(f"module {i}: a must be a [P, PR, K={x.shape[1]}] {x.dtype} pool on {x.device} with "
                             f"unit K stride, got {tuple(a.shape)} {a.dtype}")
        if (y.dim() != 2 or y.shape[0] != x.shape[0] or y.stride(1) != 1 or y.dtype != x.dtype
                or b.dtype != x.dtype or b.shape[1] != y.shape[1] or b.device != x.device):
            raise ValueError(f"module {i}: y must be [{x.shape[0]}, N] {x.dtype} with unit column stride and b a "
                             f"[P, N, PR] pool of that dtype; got y {tuple(y.shape)} {y.dtype}, b {tuple(b.shape)}")
        if b.dim() != 3 or b.shape[2] != a.shape[1]:
            raise ValueError(f"module {i}: b must be [P, N, PR={a.shape[1]}] (A's page rank), got {tuple(b.shape)}")
        if scales.shape != (pages.shape[0],) or scales.dtype != torch.float32 or scales.device != x.device:
            raise ValueError(f"module {i}: scales must be float32 [S={pages.shape[0]}] on {x.device}")
        resolved.append((a, b, ranks, scales, pages, page_rank, r_max))
    r_max = resolved[0][6]
    if any(r[6] != r_max for r in resolved):
        raise ValueError(f"modules differ in R_max {[r[6] for r in resolved]}: the fused h holds one width per module")
    k = x.shape[1]
    n_rb = triton.cdiv(r_max, FIXED_BLOCK_R)
    n_tiles = meta.tiles.shape[0]
    programs = nm * n_tiles * n_rb
    sl = shrink_launch(k, programs, x.device, config, split_k)
    h = torch.zeros(x.shape[0], nm * r_max, dtype=torch.float32, device=x.device)
    cols = [list(c) for c in zip(*resolved, strict=True)]  # a, b, ranks, scales, pages, page_rank, r_max
    a_s, b_s, r_s, c_s, p_s, pr_s = (_pad3(c) for c in cols[:6])
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    _fused_shrink_kernel[(programs, sl.split_k)](
        x, meta.token_indices, meta.tiles, h, *a_s, *p_s, *r_s,
        *[t.stride(0) for t in a_s], *[t.stride(1) for t in a_s], *[t.stride(0) for t in p_s], *pr_s,
        k, x.stride(0), h.stride(0), r_max, n_rb, sl.k_per_split,
        NUM_MODULES=nm, BLOCK_M=meta.block_m, BLOCK_R=FIXED_BLOCK_R, BLOCK_K=sl.block_k, ATOMIC=sl.split_k > 1,
        PRECISION=prec, **sl.kw,
    )
    ns = [y.shape[1] for y in ys]
    block_n, block_r, kw = expand_launch(meta.block_m, max(ns), config)
    nbs = [triton.cdiv(n, block_n) for n in ns]
    y_s = _pad3(list(ys))
    ns3, nbs3 = _pad3(ns), nbs + [0] * (MAX_MODULES - nm)
    _fused_expand_kernel[(n_tiles, sum(nbs))](
        h, meta.token_indices, meta.tiles, *b_s, *y_s, *p_s, *r_s, *c_s, *ns3, nbs3[0], nbs3[1],
        *[t.stride(0) for t in b_s], *[t.stride(1) for t in b_s], *[t.stride(2) for t in b_s],
        *[t.stride(0) for t in y_s], *[t.stride(0) for t in p_s], *pr_s, h.stride(0), r_max,
        BLOCK_M=meta.block_m, BLOCK_N=block_n, BLOCK_R=block_r, PRECISION=prec, **kw,
    )
