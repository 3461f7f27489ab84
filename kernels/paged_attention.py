"""Paged attention straight from block tables: Triton decode (split-KV) and varlen prefill kernels.

Every sequence b of a step is described by the same five numbers whether it decodes or prefills:

    q_start[b]   first row of its queries in q [T, H, D]
    q_len[b]     how many queries (1 for decode)
    ctx_len[b]   keys it sees in total: prefix + cached + this chunk (the chunk's K/V are already cached)
    prefix_len[b] P: read-only prefix-tuning keys placed ahead of its own tokens (0 if none)
    block_tables[b]  KV blocks, the prefix's ceil(P / BS) blocks first, then its own blocks

Keys live in a "virtual index" space: j < P is prefix token j, j >= P is the sequence's own token
j - P. Virtual index j sits at cache slot

    j < P:  bt[j // BS] * BS + j % BS
    j >= P: bt[ceil(P / BS) + (j - P) // BS] * BS + (j - P) % BS

so a prefix adapter's blocks are shared by every sequence using it simply by appearing in their
tables (no copy). Query i of sequence b has virtual index ctx_len - q_len + i and attends to keys
j <= its index (and j > index - window with a sliding window). Logit soft-capping, when on, maps
each score s to cap * tanh(s / cap) before masking (Gemma 2).

Decode (q_len == 1) runs one program per (sequence, KV head, split): the G query heads sharing a KV
head are the rows of one tile, so each K/V block is read once for the group (GQA), and long contexts
are split over programs whose partial softmax states are merged by a second kernel (flash decoding).
The number of splits depends on shapes only (never on the step's lengths) so a launch is capturable
in a CUDA graph. Prefill runs one program per (sequence, query tile, head) over the ragged batch.

Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (fp32/fp16); no autotune, no indirect
pointers: block sizes come from a table by device.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NEG = tl.constexpr(-1.0e30)  # running-max start: finite, so a row that has seen no visible key yet never gives NaN


# ---------------------------------------------------------------------------------------------------
# Torch twin (the specification)
# ---------------------------------------------------------------------------------------------------


def context_slots(block_table: torch.Tensor, ctx_len: int, prefix_len: int, block_size: int) -> torch.Tensor:
    """[ctx_len] int64 flat cache slots of virtual indices 0..ctx_len-1 of one sequence."""
    j = torch.arange(ctx_len, device=block_table.device)
    np_blocks = -(-prefix_len // block_size)
    own = j - prefix_len
    blk_idx = torch.where(j < prefix_len, j // block_size, np_blocks + own.clamp(min=0) // block_size)
    off = torch.where(j < prefix_len, j % block_size, own.clamp(min=0) % block_size)
    return block_table.long()[blk_idx] * block_size + off


def paged_attention_ref(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [NB, BS, KVH, D]
    v_cache: torch.Tensor,  # [NB, BS, KVH, D]
    block_tables: torch.Tensor,  # [B, MB] int32
    q_start: torch.Tensor,  # [B] int32
    q_len: torch.Tensor,  # [B] int32
    ctx_len: torch.Tensor,  # [B] int32
    prefix_len: torch.Tensor,  # [B] int32
    *,
    scale: float,
    window: int | None = None,
    softcap: float = 0.0,
    out: torch.Tensor | None = None,  # [T, H, D]; rows of no sequence are left untouched
) -> torch.Tensor:
    """Semantics: out[q_start+i] = softmax(cap(q[q_start+i] @ K_b.T * scale) + mask_i) @ V_b per head.

    Torch twin of `paged_prefill_attention` / `paged_decode_attention` (same signature), per sequence.
    """
    if out is None:
        out = torch.zeros_like(q)
    num_heads, head_dim = q.shape[1], q.shape[2]
    bs, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    k_flat = k_cache.reshape(-1, kv_heads, head_dim)
    v_flat = v_cache.reshape(-1, kv_heads, head_dim)
    host = [t.tolist() for t in (q_start, q_len, ctx_len, prefix_len)]
    for b, (qs, n, length, p) in enumerate(zip(*host, strict=True)):
        if n == 0:
            continue
        slots = context_slots(block_tables[b], length, p, bs)
        kb = k_flat.index_select(0, slots).float().repeat_interleave(group, dim=1)  # [L, H, D]
        vb = v_flat.index_select(0, slots).float().repeat_interleave(group, dim=1)
        qb = q[qs:qs + n].float()  # [n, H, D]
        s = torch.einsum("nhd,lhd->hnl", qb, kb) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        qi = torch.arange(length - n, length, device=q.device)[:, None]
        j = torch.arange(length, device=q.device)[None, :]
        mask = j <= qi
        if window is not None:
            mask &= j > qi - window
        s = s.masked_fill(~mask, float("-inf"))
        o = torch.einsum("hnl,lhd->nhd", torch.softmax(s, dim=-1), vb)
        out[qs:qs + n] = o.to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _slots(bt_row, j, P, NPB, BS: tl.constexpr, mask):
    """Flat cache slots of virtual indices j (see the module docstring)."""
    own = tl.maximum(j - P, 0)
    is_pre = j < P
    blk_idx = tl.where(is_pre, j // BS, NPB + own // BS)
    off = tl.where(is_pre, j % BS, own % BS)
    blk = tl.load(bt_row + blk_idx, mask=mask, other=0).to(tl.int64)
    return blk * BS + off


@triton.jit
def _softcap(s, SOFTCAP: tl.constexpr):
    # cap * tanh(s / cap), tanh written with exp so the interpreter and every backend agree
    t = tl.exp(-2.0 * tl.abs(s / SOFTCAP))
    th = (1.0 - t) / (1.0 + t)
    return SOFTCAP * tl.where(s >= 0, th, -th)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, qs_ptr, ctx_ptr, pre_ptr,
    out_ptr, ws_acc_ptr, ws_ml_ptr,
    scale, window,
    stride_qt, stride_qh,
    stride_ks, stride_kh,  # k/v cache as [slots, KVH, D]
    stride_bt,
    stride_ot, stride_oh,
    num_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, USE_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(qs_ptr + b).to(tl.int64)
    L = tl.load(ctx_ptr + b)
    P = tl.load(pre_ptr + b)
    NPB = (P + BS - 1) // BS
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_h
    q = tl.load(q_ptr + q_row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)

    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(L - window, 0)
    per_split = tl.cdiv(tl.cdiv(L - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, L)

    m_i = tl.full((BLOCK_H,), _NEG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for n in range(start, end, BLOCK_N):
        j = n + tl.arange(0, BLOCK_N)
        mask_n = j < end
        slots = _slots(bt_row, j, P, NPB, BS, mask_n)
        kv_off = slots[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        # native dtype into the tensor cores, fp32 out (fp32/fp16 only under the interpreter)
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)  # [BN, BD]
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BH, BN]
        if SOFTCAP > 0:
            s = _softcap(s, SOFTCAP)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        o = acc / l_i[:, None]
        tl.store(out_ptr + q_row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])
    else:
        # workspace [B, num_heads, NUM_SPLITS, BLOCK_D] (acc) and [B, num_heads, NUM_SPLITS, 2] (m, l)
        row = (b.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [BH]
        tl.store(ws_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=mask_h[:, None])
        tl.store(ws_ml_ptr + row * 2, m_i, mask=mask_h)
        tl.store(ws_ml_ptr + row * 2 + 1, l_i, mask=mask_h)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, ws_acc_ptr, ws_ml_ptr, qs_ptr,
    stride_ot, stride_oh, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_row = tl.load(qs_ptr + b).to(tl.int64)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    row = (b.to(tl.int64) * num_heads + h) * NUM_SPLITS + offs_s  # [NS]
    m = tl.load(ws_ml_ptr + row * 2)
    lsum = tl.load(ws_ml_ptr + row * 2 + 1)
    acc = tl.load(ws_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :])  # [NS, BD]
    m_max = tl.max(m, axis=0)
    w = tl.exp(m - m_max)  # an empty split has l = 0 and acc = 0: it adds nothing
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(lsum * w, axis=0)
    tl.store(out_ptr + q_row * stride_ot + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, qs_ptr, ql_ptr, ctx_ptr, pre_ptr, out_ptr,
    scale, window,
    stride_qt, stride_qh,
    stride_ks, stride_kh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    h = tl.program_id(2)
    kvh = h // GROUP
    qs = tl.load(qs_ptr + b).to(tl.int64)
    n_q = tl.load(ql_ptr + b)
    L = tl.load(ctx_ptr + b)
    P = tl.load(pre_ptr + b)
    NPB = (P + BS - 1) // BS
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_q
    mask_d = offs_d < HEAD_DIM
    q_idx = L - n_q + offs_m  # virtual index of each query
    q = tl.load(q_ptr + (qs + offs_m[:, None]) * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    # keys this tile can see: up to its last query (causal), from its first query's window start
    hi = tl.minimum(L - n_q + m0 + BLOCK_M, L)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(L - n_q + m0 - window + 1, 0)
    hi = tl.where(m0 < n_q, hi, lo)  # a tile past the chunk's end does nothing

    m_i = tl.full((BLOCK_M,), _NEG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n in range(lo, hi, BLOCK_N):
        j = n + tl.arange(0, BLOCK_N)
        mask_n = j < hi
        slots = _slots(bt_row, j, P, NPB, BS, mask_n)
        kv_off = slots[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BM, BN]
        if SOFTCAP > 0:
            s = _softcap(s, SOFTCAP)
        vis = mask_n[None, :] & (j[None, :] <= q_idx[:, None])
        if USE_WINDOW:
            vis = vis & (j[None, :] > q_idx[:, None] - window)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    o = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(out_ptr + (qs + offs_m[:, None]) * stride_ot + h * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_config(device: torch.device, head_dim: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps): keys per inner step. A table, since autotune does not run under the
    interpreter. On the GPU a [64, 128] bf16 K tile is 16 KiB: two in flight per program hide HBM latency."""
    if device.type != "cuda":
        return 16, 1
    return (64, 4) if head_dim <= 128 else (32, 8)


def prefill_config(device: torch.device, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the prefill kernel."""
    if device.type != "cuda":
        return 16, 16, 1, 1
    if head_dim <= 64:
        return 64, 64, 4, 3
    return (64, 64, 4, 2) if head_dim <= 128 else (32, 32, 4, 2)


def decode_splits(device: torch.device, num_seqs: int, kv_heads: int, max_ctx: int, block_n: int) -> int:
    """Split-KV factor from shapes alone (capturable): enough programs to fill the GPU, each with at
    least 4 key tiles; 1 off the GPU. A power of two (the reduce kernel's arange needs one)."""
    if device.type != "cuda":
        return 1
    target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    want = max(1, target // max(1, num_seqs * kv_heads))
    cap = max(1, max_ctx // (4 * block_n))
    n = min(want, cap, 64)
    return 1 << (n.bit_length() - 1)


class _PagedArgs(NamedTuple):
    """What both launchers derive from their checked arguments."""

    out: torch.Tensor  # [T, H, D]: the caller's, or fresh zeros
    num_seqs: int
    block_size: int
    kv_heads: int
    head_dim: int
    num_heads: int
    block_d: int  # head_dim rounded up to a power of two >= 16
    k_flat: torch.Tensor  # [NB * BS, KVH, D] views of the caches
    v_flat: torch.Tensor


def _check_paged_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_tensors: dict[str, torch.Tensor], out: torch.Tensor | None) -> _PagedArgs:
    """The decode and prefill launchers' shared argument checks (shapes, dtypes, devices; no value is read),
    then the output and the sizes and cache views both launch with."""
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype {q.dtype} unsupported; expected one of {_DTYPES}")
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"q must be [T, H, D] with unit last stride, got {tuple(q.shape)} stride {q.stride()}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or not (k_cache.is_contiguous()
                                                                     and v_cache.is_contiguous()):
        raise ValueError(f"k_cache/v_cache must be contiguous [NB, BS, KVH, D] of one shape, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"cache dtype {k_cache.dtype} != q dtype {q.dtype}")
    if k_cache.shape[3] != q.shape[2] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache heads/dim {tuple(k_cache.shape[2:])}")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be int32 [B, MB] with unit column stride, got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}")
    n = block_tables.shape[0]
    for name, t in seq_tensors.items():
        if t.dim() != 1 or t.dtype != torch.int32 or t.shape[0] != n:
            raise ValueError(f"{name} must be int32 [{n}], got {t.dtype} {tuple(t.shape)}")
    for t in (k_cache, v_cache, block_tables, *seq_tensors.values()):
        if t.device != q.device:
            raise ValueError(f"all tensors must be on {q.device}; found one on {t.device}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1):
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)} with unit last stride, got {out.dtype} "
                         f"{tuple(out.shape)}")
    _, bs, kv_heads, head_dim = k_cache.shape
    return _PagedArgs(out=torch.zeros_like(q) if out is None else out, num_seqs=n, block_size=bs, kv_heads=kv_heads,
                      head_dim=head_dim, num_heads=q.shape[1], block_d=max(16, triton.next_power_of_2(head_dim)),
                      k_flat=k_cache.view(-1, kv_heads, head_dim), v_flat=v_cache.view(-1, kv_heads, head_dim))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_decode_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [NB, BS, KVH, D]
    v_cache: torch.Tensor,  # [NB, BS, KVH, D]
    block_tables: torch.Tensor,  # [B, MB] int32
    q_start: torch.Tensor,  # [B] int32: the row of each sequence's one query
    ctx_len: torch.Tensor,  # [B] int32
    prefix_len: torch.Tensor,  # [B] int32
    *,
    scale: float,
    window: int | None = None,
    softcap: float = 0.0,
    out: torch.Tensor | None = None,  # [T, H, D]
    num_splits: int | None = None,  # None: from shapes (decode_splits)
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,  # preallocated split buffers (graphs)
) -> torch.Tensor:
    """Semantics: paged_attention_ref with q_len = 1 for every sequence (one decode query each)."""
    args = _check_paged_args(q, k_cache, v_cache, block_tables,
                             dict(q_start=q_start, ctx_len=ctx_len, prefix_len=prefix_len), out)
    out, num_seqs, bs, kv_heads, head_dim, num_heads, block_d, k_flat, v_flat = args
    if num_seqs == 0:
        return out
    group = num_heads // kv_heads
    block_n, num_warps = decode_config(q.device, head_dim)
    block_h = max(16, triton.next_power_of_2(group))
    if num_splits is None:
        num_splits = decode_splits(q.device, num_seqs, kv_heads, block_tables.shape[1] * bs, block_n)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two >= 1, got {num_splits}")
    if num_splits > 1:
        if workspace is None:
            workspace = decode_workspace(num_seqs, num_heads, head_dim, num_splits, q.device)
        ws_acc, ws_ml = workspace
        if ws_acc.numel() < num_seqs * num_heads * num_splits * block_d:
            raise ValueError(f"workspace too small for {num_seqs} seqs x {num_heads} heads x {num_splits} splits")
    else:
        ws_acc = ws_ml = out  # unused
    _decode_kernel[(num_seqs, kv_heads, num_splits)](
        q, k_flat, v_flat, block_tables, q_start, ctx_len, prefix_len, out, ws_acc, ws_ml,
        scale, window or 0,
        q.stride(0), q.stride(1), k_flat.stride(0), k_flat.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1), num_heads,
        GROUP=group, HEAD_DIM=head_dim, BS=bs, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d,
        NUM_SPLITS=num_splits, USE_WINDOW=window is not None, SOFTCAP=float(softcap),
        PRECISION=_precision(q.dtype), num_warps=num_warps,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, ws_acc, ws_ml, q_start, out.stride(0), out.stride(1), num_heads,
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits, num_warps=1 if block_d <= 64 else 2,
        )
    return out


def decode_workspace(max_seqs: int, num_heads: int, head_dim: int, num_splits: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV partial results ([acc], [m, l]) for up to max_seqs sequences; allocate once to capture."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    n = max_seqs * num_heads * num_splits
    return (torch.empty(n * block_d, dtype=torch.float32, device=device),
            torch.empty(n * 2, dtype=torch.float32, device=device))


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [NB, BS, KVH, D]
    v_cache: torch.Tensor,  # [NB, BS, KVH, D]
    block_tables: torch.Tensor,  # [B, MB] int32
    q_start: torch.Tensor,  # [B] int32
    q_len: torch.Tensor,  # [B] int32
    ctx_len: torch.Tensor,  # [B] int32
    prefix_len: torch.Tensor,  # [B] int32
    *,
    max_q_len: int,  # host bound on q_len (sizes the grid)
    scale: float,
    window: int | None = None,
    softcap: float = 0.0,
    out: torch.Tensor | None = None,  # [T, H, D]
) -> torch.Tensor:
    """Semantics: paged_attention_ref (causal chunks against cached + new keys, ragged batch)."""
    args = _check_paged_args(q, k_cache, v_cache, block_tables,
                             dict(q_start=q_start, q_len=q_len, ctx_len=ctx_len, prefix_len=prefix_len), out)
    out, num_seqs, bs, kv_heads, head_dim, num_heads, block_d, k_flat, v_flat = args
    if num_seqs == 0 or max_q_len == 0:
        return out
    block_m, block_n, num_warps, num_stages = prefill_config(q.device, head_dim)
    _prefill_kernel[(num_seqs, triton.cdiv(max_q_len, block_m), num_heads)](
        q, k_flat, v_flat, block_tables, q_start, q_len, ctx_len, prefix_len, out,
        scale, window or 0,
        q.stride(0), q.stride(1), k_flat.stride(0), k_flat.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_heads // kv_heads, HEAD_DIM=head_dim, BS=bs, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, USE_WINDOW=window is not None, SOFTCAP=float(softcap),
        PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out


def kv_bytes_read(ctx_lens: list[int], kv_heads: int, head_dim: int, elem_bytes: int) -> int:
    """Bytes of K and V one decode attention call must read (the roofline's numerator)."""
    return 2 * sum(ctx_lens) * kv_heads * head_dim * elem_bytes


__all__ = [
    "context_slots",
    "decode_config",
    "decode_splits",
    "decode_workspace",
    "kv_bytes_read",
    "paged_attention_ref",
    "paged_decode_attention",
    "paged_prefill_attention",
    "prefill_config",
]
