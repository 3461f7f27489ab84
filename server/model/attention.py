"""Attention over the paged KV cache for a ragged batch.

Single-token chunks (decode) of all sequences run as ONE batched SDPA: their contexts are gathered
through a padded [S, L_max] slot index and masked. GQA uses a grouped reshape, not a repeat: the G
query heads sharing a KV head become G "query positions" of that head, so K/V are read once.
Multi-token chunks (prefill) run per sequence; a first chunk with no prefix attends to its own fresh
K/V directly (no gather). Logit soft-capping (Gemma 2) has no SDPA form: those layers run the same
masks through an explicit softmax (`_softcapped`). That is the torch twin; when the step carries
block-table metadata (`batch.attn`, the Triton backend: CUDA, or forced under the interpreter) the
paged kernels of kernels/paged_attention.py read K/V straight from the blocks instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.paged_attention import paged_decode_attention, paged_prefill_attention
from server.model.batch import StepBatch


def paged_attention(
    q: torch.Tensor,  # [T, H, D] (RoPE applied)
    k: torch.Tensor,  # [T, KVH, D] this step's keys (already written to the cache)
    v: torch.Tensor,  # [T, KVH, D]
    k_cache: torch.Tensor,  # [num_slots, KVH, D] flat view of one layer's cache
    v_cache: torch.Tensor,  # [num_slots, KVH, D]
    batch: StepBatch,
    window: int | None,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Semantics: out[t] = softmax(cap(q[t] @ K_ctx(t).T * scale) + mask) @ V_ctx(t); returns [T, H * D],
    where cap(x) = softcap * tanh(x / softcap) when softcap is set, else x."""
    if batch.attn is not None:
        return _paged_kernels(q, k_cache, v_cache, batch, window, scale, softcap or 0.0)
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    out = torch.empty(num_tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)

    if batch.decode_rows is not None:
        s = batch.decode_rows.shape[0]
        qd = q.index_select(0, batch.decode_rows).view(s, kv_heads, group, head_dim)
        flat = batch.decode_ctx.view(-1)
        kd = k_cache.index_select(0, flat).view(s, -1, kv_heads, head_dim).transpose(1, 2)  # [S, KVH, L, D]
        vd = v_cache.index_select(0, flat).view(s, -1, kv_heads, head_dim).transpose(1, 2)
        mask = batch.decode_mask(window)
        if softcap is None:
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)
        else:
            od = _softcapped(qd, kd, vd, mask, scale, softcap)
        out.index_copy_(0, batch.decode_rows, od.reshape(s, num_heads * head_dim))

    for i, part in enumerate(batch.prefills):
        qp = q[part.rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        n = qp.shape[2]
        if part.ctx is None:
            kp, vp = k[part.rows], v[part.rows]
        else:
            kp, vp = k_cache.index_select(0, part.ctx), v_cache.index_select(0, part.ctx)
        kp = kp.transpose(0, 1).unsqueeze(0)  # [1, KVH, L, D]
        vp = vp.transpose(0, 1).unsqueeze(0)
        if softcap is not None:
            mask = batch.prefill_mask(i, window, kp.shape[2])
            qg = qp.view(1, kv_heads, group, n, head_dim).flatten(2, 3)  # [1, KVH, G * n, D]
            og = _softcapped(qg, kp, vp, mask.repeat(group, 1), scale, softcap)
            op = og.view(1, num_heads, n, head_dim)
        elif part.ctx is None and (window is None or window >= n):
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = batch.prefill_mask(i, window, kp.shape[2])
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        out[part.rows] = op[0].transpose(0, 1).reshape(n, num_heads * head_dim)
    return out


def _paged_kernels(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: StepBatch,
                   window: int | None, scale: float, softcap: float) -> torch.Tensor:
    """The Triton backend: decode and prefill kernels write their rows of one output."""
    meta = batch.attn
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
    kc = k_cache.view(-1, meta.block_size, kv_heads, head_dim)
    vc = v_cache.view(-1, meta.block_size, kv_heads, head_dim)
    out = torch.empty_like(q)
    if meta.decode is not None:
        d = meta.decode
        paged_decode_attention(q, kc, vc, d.block_tables, d.q_start, d.ctx_len, d.prefix_len, scale=scale,
                               window=window, softcap=softcap, out=out)
    if meta.prefill is not None:
        p = meta.prefill
        paged_prefill_attention(q, kc, vc, p.block_tables, p.q_start, p.q_len, p.ctx_len, p.prefix_len,
                                max_q_len=p.max_q_len, scale=scale, window=window, softcap=softcap, out=out)
    return out.view(q.shape[0], -1)


def _softcapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                softcap: float) -> torch.Tensor:
    """softmax(softcap * tanh(q @ k.T * scale / softcap), masked) @ v, softmax in fp32 as HF's eager path.

    q [..., M, D], k/v [..., L, D], mask broadcastable to [..., M, L] (True = visible) or None."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
