"""Torch twin of the bottleneck-adapter kernels: the written specification, and the CPU path.

A bottleneck adapter (Houlsby / Pfeiffer / parallel, AdapterHub's ``adapters``) maps a hidden row
``x`` to ``scale * (up(act(down(x) + b_down)) + b_up)``: down d -> m, a non-linearity, up m -> d,
both with biases. Slots are stacked like LoRA's ("width" plays the part of the rank): a slot's own
width m_s is all that is read or computed, so a narrow adapter next to a wide one pays for its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.metadata import LoRAMeta

# Non-linearity codes, one per slot (int32 [S]); the Triton kernel branches on the same numbers.
ACTIVATIONS: dict[str, int] = {
    "identity": 0,
    "relu": 1,
    "silu": 2,  # AdapterHub's "swish" (transformers' ACT2FN maps swish to SiLU)
    "gelu": 3,  # exact (erf)
    "gelu_new": 4,  # tanh approximation (also "gelu_pytorch_tanh")
    "tanh": 5,
    "sigmoid": 6,
    "leakyrelu": 7,  # negative slope 0.01, torch's default
}


def activate(v: torch.Tensor, code: int) -> torch.Tensor:
    """The non-linearity named by `code` (see ACTIVATIONS), computed in v's dtype."""
    if code == 0:
        return v
    if code == 1:
        return F.relu(v)
    if code == 2:
        return F.silu(v)
    if code == 3:
        return F.gelu(v)
    if code == 4:
        return F.gelu(v, approximate="tanh")
    if code == 5:
        return torch.tanh(v)
    if code == 6:
        return torch.sigmoid(v)
    if code == 7:
        return F.leaky_relu(v, 0.01)
    raise ValueError(f"activation code {code} unknown; known: {sorted(ACTIVATIONS.values())}")


def bottleneck_down_ref(
    x: torch.Tensor,  # [T, D]
    w_down: torch.Tensor,  # [S, M_max, D] stacked down-projections of every slot
    b_down: torch.Tensor,  # [S, M_max]
    widths: torch.Tensor,  # [S] int32 (host), the slot's own bottleneck width m_s (0 = empty slot)
    acts: torch.Tensor,  # [S] int32 (host), activation code of each slot
    meta: LoRAMeta,
    out: torch.Tensor | None = None,  # [T, M_max] x.dtype or float32
) -> torch.Tensor:
    """Semantics: for each token t with slot s >= 0: out[t, :m_s] = act_s(x[t] @ w_down[s, :m_s].T + b_down[s, :m_s]).

    Rows of base tokens and columns >= m_s are left untouched (zeros if out is fresh).
    """
    if out is None:
        out = torch.zeros(x.shape[0], w_down.shape[1], dtype=x.dtype, device=x.device)
    codes = acts.tolist()
    for i, (s, m) in enumerate(zip(meta.slots, meta.seg_ranks(widths), strict=True)):
        if m == 0 or meta.lens[i] == 0:
            continue
        rows = meta.rows(i)
        h = F.linear(x[rows].to(out.dtype), w_down[s, :m].to(out.dtype), b_down[s, :m].to(out.dtype))
        out[rows, :m] = activate(h, codes[s])
    return out


def bottleneck_up_ref(
    h: torch.Tensor,  # [T, M_max] output of bottleneck_down
    w_up: torch.Tensor,  # [S, D, M_max] stacked up-projections of every slot
    b_up: torch.Tensor,  # [S, D]
    widths: torch.Tensor,  # [S] int32 (host)
    scales: torch.Tensor,  # [S] float32
    meta: LoRAMeta,
    y: torch.Tensor,  # [T, D], updated in place (may be a column slice; stride(1) == 1)
) -> torch.Tensor:
    """Semantics: for each token t with slot s >= 0 and m_s > 0:
    y[t] += scales[s] * (h[t, :m_s] @ w_up[s, :, :m_s].T + b_up[s])."""
    sl = scales.tolist()
    for i, (s, m) in enumerate(zip(meta.slots, meta.seg_ranks(widths), strict=True)):
        if m == 0 or meta.lens[i] == 0:
            continue
        rows = meta.rows(i)
        delta = F.linear(h[rows, :m].to(w_up.dtype), w_up[s, :, :m], b_up[s]) * sl[s]
        if isinstance(rows, slice):
            y[rows] += delta.to(y.dtype)
        else:
            y.index_add_(0, rows, delta.to(y.dtype))
    return y


def bottleneck_apply_ref(
    x: torch.Tensor,  # [T, D] adapter input
    y: torch.Tensor,  # [T, D] updated in place; may be x itself
    w_down: torch.Tensor,  # [S, M_max, D]
    b_down: torch.Tensor,  # [S, M_max]
    w_up: torch.Tensor,  # [S, D, M_max]
    b_up: torch.Tensor,  # [S, D]
    widths: torch.Tensor,  # [S] int32 (host)
    acts: torch.Tensor,  # [S] int32 (host)
    scales: torch.Tensor,  # [S] float32
    meta: LoRAMeta,
) -> torch.Tensor:
    """y[t] += scale_s * (up_s(act_s(down_s(x[t]))) ) for every token with a slot; base rows untouched.

    Segment by segment with no [T, M_max] buffer; every down projection is computed before y is
    written, so `y` may alias `x`.
    """
    sl = scales.tolist()
    codes = acts.tolist()
    deltas: list[tuple[slice | torch.Tensor, torch.Tensor]] = []
    for i, (s, m) in enumerate(zip(meta.slots, meta.seg_ranks(widths), strict=True)):
        if m == 0 or meta.lens[i] == 0:
            continue
        rows = meta.rows(i)
        h = activate(F.linear(x[rows], w_down[s, :m], b_down[s, :m]), codes[s])
        deltas.append((rows, F.linear(h, w_up[s, :, :m], b_up[s]).mul_(sl[s])))
    for rows, delta in deltas:
        if isinstance(rows, slice):
            y[rows] += delta.to(y.dtype)
        else:
            y.index_add_(0, rows, delta.to(y.dtype))
    return y
