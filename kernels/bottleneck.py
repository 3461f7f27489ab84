"""Triton bottleneck-adapter kernels: down + bias + non-linearity, then up + bias, scaled, added into y.

The same segment machinery as LoRA (``LoRAMeta``: tokens grouped by slot, gathered through
``token_indices``, never permuted), with a slot's bottleneck width in the part of LoRA's rank:

- ``bottleneck_down_triton``: one program per (row block of a segment, width block of the slot's
  *own* width) from ``LoRAMeta.tile_table``; the K loop runs whole inside the program (the
  non-linearity needs the full sum, so no split-K), then bias and the slot's activation.
- ``bottleneck_up_triton``: one program per (row block, column block of D); it loops over the
  slot's own width only and adds ``scale * (acc + b_up)`` into y (read-modify-write, no atomics:
  segments are disjoint and rows within one distinct).

Base tokens, empty slots and the width padding of other slots launch nothing. The torch twin is
``kernels.bottleneck_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.bottleneck_ref import ACTIVATIONS, bottleneck_apply_ref
from kernels.metadata import LoRAMeta
from kernels.triton_common import DTYPES, block_m_for, load_tile


@triton.jit
def _activate(v, code):
    # codes: kernels.bottleneck_ref.ACTIVATIONS (0 identity .. 7 leakyrelu); fp32 in, fp32 out
    if code == 1:
        v = tl.maximum(v, 0.0)
    elif code == 2:
        v = v * tl.sigmoid(v)
    elif code == 3:
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif code == 4:
        inner = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        v = 0.5 * v * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(u) = 2 sigmoid(2u) - 1
    elif code == 5:
        v = 2.0 * tl.sigmoid(2.0 * v) - 1.0
    elif code == 6:
        v = tl.sigmoid(v)
    elif code == 7:
        v = tl.where(v >= 0.0, v, 0.01 * v)
    return v


@triton.jit
def _down_kernel(
    x_ptr,  # [T, D]
    w_ptr,  # [S, M_max, D]
    b_ptr,  # [S, M_max]
    acts_ptr,  # [S] int32
    out_ptr,  # [T, M_max]
    tok_ptr,  # [T_ad] int64
    tiles_ptr,  # [n_tiles, 5] int32 (tok_off, m_len, slot, w_off, w_len)
    K,
    stride_xm,
    stride_ws,
    stride_wm,
    stride_bs,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows, mask_m, slot, w_off, w_len = load_tile(tiles_ptr, tok_ptr, BLOCK_M)
    offs_w = tl.arange(0, BLOCK_W)
    mask_w = offs_w < w_len
    cols = (w_off + offs_w).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    x_rows = x_ptr + rows[:, None] * stride_xm  # [BM, 1]
    w_rows = w_ptr + slot * stride_ws + cols[None, :] * stride_wm  # [1, BW]
    acc = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + offs_k
        mask_k = kk < K
        # Upcast on load: fp32 accumulation, and the CPU interpreter mis-reads bf16 otherwise.
        xt = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        wt = tl.load(w_rows + kk[:, None], mask=mask_k[:, None] & mask_w[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(xt, wt, input_precision=PRECISION)

    bias = tl.load(b_ptr + slot * stride_bs + cols, mask=mask_w, other=0.0).to(tl.float32)
    acc = _activate(acc + bias[None, :], tl.load(acts_ptr + slot))
    o = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_w[None, :])


@triton.jit
def _up_kernel(
    h_ptr,  # [T, M_max]
    w_ptr,  # [S, D, M_max]
    b_ptr,  # [S, D]
    y_ptr,  # [T, D] (row stride may exceed D)
    tok_ptr,  # [T_ad] int64
    tiles_ptr,  # [n_tiles, 5] int32 (tok_off, m_len, slot, 0, m_s)
    scales_ptr,  # [S] float32
    N,
    stride_hm,
    stride_ws,
    stride_wn,
    stride_bs,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows, mask_m, slot, _, w_len = load_tile(tiles_ptr, tok_ptr, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = tl.arange(0, BLOCK_W)

    h_rows = h_ptr + rows[:, None] * stride_hm  # [BM, 1]
    w_cols = w_ptr + slot * stride_ws + offs_n[None, :].to(tl.int64) * stride_wn  # [1, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for w in range(0, w_len, BLOCK_W):  # own width only
        ww = w + offs_w
        mask_w = ww < w_len
        ht = tl.load(h_rows + ww[None, :], mask=mask_m[:, None] & mask_w[None, :], other=0.0).to(tl.float32)
        wt = tl.load(w_cols + ww[:, None], mask=mask_w[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(ht, wt, input_precision=PRECISION)

    bias = tl.load(b_ptr + slot * stride_bs + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    scale = tl.load(scales_ptr + slot)
    yp = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
    mask_y = mask_m[:, None] & mask_n[None, :]
    yv = tl.load(yp, mask=mask_y, other=0.0).to(tl.float32)
    tl.store(yp, (yv + scale * (acc + bias[None, :])).to(y_ptr.dtype.element_ty), mask=mask_y)


def down_config(max_seg_len: int, max_width: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_W, BLOCK_K, num_warps) from a fixed table; autotune does not run under the interpreter."""
    block_m = block_m_for(max_seg_len)
    block_w = 16 if max_width <= 16 else 32 if max_width <= 32 or block_m > 16 else 64
    block_k = 128 if k >= 1024 else 64
    num_warps = 4 if block_m * block_w <= 1024 else 8
    return block_m, block_w, block_k, num_warps


def up_config(max_seg_len: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_W, num_warps) from a fixed table."""
    block_m = block_m_for(max_seg_len)
    block_n = 64 if n <= 1024 or block_m <= 16 else 128
    num_warps = 4 if block_m * block_n <= 4096 else 8
    return block_m, block_n, 32, num_warps


def _check_pool(name: str, w: torch.Tensor, b: torch.Tensor, widths: torch.Tensor, meta: LoRAMeta,
                width_dim: int) -> None:
    if w.dtype not in DTYPES:
        raise ValueError(f"{name} dtype {w.dtype} unsupported; expected one of {DTYPES}")
    if w.dim() != 3 or not w.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 3-D pool, got shape {tuple(w.shape)} "
                         f"contiguous={w.is_contiguous()}")
    bias_len = w.shape[1]
    if b.dim() != 2 or tuple(b.shape) != (w.shape[0], bias_len) or b.stride(1) != 1 or b.device != w.device:
        raise ValueError(f"{name} bias must be [{w.shape[0]}, {bias_len}] with unit column stride on {w.device}, "
                         f"got shape {tuple(b.shape)} stride {b.stride()} on {b.device}")
    if widths.dim() != 1 or widths.shape[0] != w.shape[0] or widths.dtype.is_floating_point:
        raise ValueError(f"widths must be an integer [S={w.shape[0]}] tensor, got shape {tuple(widths.shape)} "
                         f"{widths.dtype}")
    if meta.num_segments and max(meta.slots) >= w.shape[0]:
        raise ValueError(f"slot {max(meta.slots)} out of range for a pool of {w.shape[0]} slots")
    for s, m in zip(meta.slots, meta.seg_ranks(widths), strict=True):  # a width is a rank to the tile list
        if not 0 <= m <= w.shape[width_dim]:
            raise ValueError(f"width {m} of slot {s} outside [0, M_max={w.shape[width_dim]}]")


def bottleneck_down_triton(
    x: torch.Tensor,  # [T, D] activations (unit column stride)
    w_down: torch.Tensor,  # [S, M_max, D] contiguous, x.dtype
    b_down: torch.Tensor,  # [S, M_max] x.dtype
    widths: torch.Tensor,  # [S] integer, read on the host (host tensor: no sync)
    acts: torch.Tensor,  # [S] int32 activation codes, on x's device
    meta: LoRAMeta,
    out: torch.Tensor | None = None,  # [T, M_max] x.dtype or float32
) -> torch.Tensor:
    """Semantics: for each token t with slot s >= 0: out[t, :m_s] = act_s(x[t] @ w_down[s, :m_s].T + b_down[s, :m_s]).

    Rows of base tokens and columns >= m_s are left untouched (zeros if out is fresh).
    """
    _check_pool("w_down", w_down, b_down, widths, meta, 1)
    if x.dtype != w_down.dtype or x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D {w_down.dtype} with unit column stride, got shape {tuple(x.shape)} "
                         f"{x.dtype} stride {x.stride()}")
    if w_down.shape[2] != x.shape[1]:
        raise ValueError(f"w_down hidden size {w_down.shape[2]} != x hidden size {x.shape[1]}")
    if meta.num_tokens != x.shape[0]:
        raise ValueError(f"meta.num_tokens {meta.num_tokens} != x rows {x.shape[0]}")
    if not (x.device == w_down.device == acts.device == meta.token_indices.device):
        raise ValueError(f"devices differ: x {x.device}, w_down {w_down.device}, acts {acts.device}, "
                         f"meta {meta.token_indices.device}")
    if acts.shape != (w_down.shape[0],) or acts.dtype != torch.int32:
        raise ValueError(f"acts must be int32 [S={w_down.shape[0]}], got shape {tuple(acts.shape)} {acts.dtype}")
    if out is None:
        out = torch.zeros(x.shape[0], w_down.shape[1], dtype=x.dtype, device=x.device)
    elif (tuple(out.shape) != (x.shape[0], w_down.shape[1]) or out.stride(1) != 1
          or out.dtype not in (x.dtype, torch.float32) or out.device != x.device):
        raise ValueError(f"out must be [{x.shape[0]}, {w_down.shape[1]}] {x.dtype} or float32 with unit column "
                         f"stride on {x.device}, got {tuple(out.shape)} {out.dtype} stride {out.stride()}")
    if meta.num_segments == 0 or max(meta.seg_ranks(widths)) == 0:
        return out
    k = x.shape[1]
    block_m, block_w, block_k, num_warps = down_config(meta.max_seg_len, max(meta.seg_ranks(widths)), k)
    tiles = meta.tile_table(widths, block_m, block_w)
    _down_kernel[(tiles.shape[0],)](
        x, w_down, b_down, acts, out, meta.token_indices, tiles,
        k, x.stride(0), w_down.stride(0), w_down.stride(1), b_down.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_W=block_w, BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    return out


def bottleneck_up_triton(
    h: torch.Tensor,  # [T, M_max] output of bottleneck_down (w_up.dtype or float32)
    w_up: torch.Tensor,  # [S, D, M_max] contiguous
    b_up: torch.Tensor,  # [S, D]
    widths: torch.Tensor,  # [S] integer, read on the host
    scales: torch.Tensor,  # [S] float32, on the device
    meta: LoRAMeta,
    y: torch.Tensor,  # [T, D] w_up.dtype, updated in place; may be a column slice (stride(1) == 1)
) -> torch.Tensor:
    """Semantics: for each token t with slot s >= 0 and m_s > 0:
    y[t] += scales[s] * (h[t, :m_s] @ w_up[s, :, :m_s].T + b_up[s])."""
    _check_pool("w_up", w_up, b_up, widths, meta, 2)
    if y.dim() != 2 or y.dtype != w_up.dtype or y.stride(1) != 1:
        raise ValueError(f"y must be 2-D {w_up.dtype} with unit column stride, got shape {tuple(y.shape)} "
                         f"{y.dtype} stride {y.stride()}")
    if h.dim() != 2 or h.stride(1) != 1 or h.dtype not in (w_up.dtype, torch.float32):
        raise ValueError(f"h must be 2-D {w_up.dtype} or float32 with unit column stride, got shape "
                         f"{tuple(h.shape)} {h.dtype} stride {h.stride()}")
    if h.shape[0] != y.shape[0] or h.shape[1] != w_up.shape[2]:
        raise ValueError(f"h shape {tuple(h.shape)} does not match [T={y.shape[0]}, M_max={w_up.shape[2]}]")
    if y.shape[1] != w_up.shape[1]:
        raise ValueError(f"y width {y.shape[1]} != w_up output size D={w_up.shape[1]}")
    if scales.shape != (w_up.shape[0],) or scales.dtype != torch.float32:
        raise ValueError(f"scales must be float32 [S={w_up.shape[0]}], got shape {tuple(scales.shape)} "
                         f"{scales.dtype}")
    if not (h.device == w_up.device == y.device == scales.device == meta.token_indices.device):
        raise ValueError(f"devices differ: h {h.device}, w_up {w_up.device}, y {y.device}, scales {scales.device}, "
                         f"meta {meta.token_indices.device}")
    if meta.num_tokens != y.shape[0]:
        raise ValueError(f"meta.num_tokens {meta.num_tokens} != y rows {y.shape[0]}")
    if meta.num_segments == 0 or max(meta.seg_ranks(widths)) == 0:
        return y
    n = w_up.shape[1]
    block_m, block_n, block_w, num_warps = up_config(meta.max_seg_len, n)
    tiles = meta.tile_table(widths, block_m, 0)
    _up_kernel[(tiles.shape[0], triton.cdiv(n, block_n))](
        h, w_up, b_up, y, meta.token_indices, tiles, scales,
        n, h.stride(0), w_up.stride(0), w_up.stride(1), b_up.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w,
        PRECISION="ieee" if w_up.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    return y


def bottleneck_apply(
    x: torch.Tensor,  # [T, D]
    y: torch.Tensor,  # [T, D] updated in place; may alias x
    w_down: torch.Tensor,  # [S, M_max, D]
    b_down: torch.Tensor,  # [S, M_max]
    w_up: torch.Tensor,  # [S, D, M_max]
    b_up: torch.Tensor,  # [S, D]
    widths: torch.Tensor,  # [S] int32 (host)
    acts: torch.Tensor,  # [S] int32 (x's device; the CPU twin reads it on the host)
    scales: torch.Tensor,  # [S] float32
    meta: LoRAMeta,
) -> torch.Tensor:
    """Backend switch: y[t] += scale_s * (up_s(act_s(down_s(x[t]))) + b_up_s). Triton on CUDA, twin elsewhere.

    The intermediate is fp32 on the Triton path, so the activation never rounds to half precision.
    """
    if meta.num_segments == 0:
        return y
    if not x.is_cuda:
        return bottleneck_apply_ref(x, y, w_down, b_down, w_up, b_up, widths, acts, scales, meta)
    h = torch.zeros(x.shape[0], w_down.shape[1], dtype=torch.float32, device=x.device)
    bottleneck_down_triton(x, w_down, b_down, widths, acts, meta, h)
    return bottleneck_up_triton(h, w_up, b_up, widths, scales, meta, y)


__all__ = ["ACTIVATIONS", "bottleneck_apply", "bottleneck_down_triton", "bottleneck_up_triton"]
