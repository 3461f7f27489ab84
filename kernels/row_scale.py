"""Per-slot column scaling of token rows: IA3's learned vectors and DoRA's magnitude, mixed in one batch.

Semantics: for each segment of `meta` whose slot s has `on[s]`:
    y[rows] = y[rows] * mul[s]            (add is None)
    y[rows] = y[rows] * mul[s] + add[s]   (otherwise)
Rows of other slots and base rows are untouched. One elementwise op per segment (contiguous rows: an
in-place slice op, no gather); the same torch code runs on CPU and CUDA, where it is memory-bound and
as cheap as a fused kernel would be next to the projection it follows.
"""

from __future__ import annotations

import torch

from kernels.metadata import LoRAMeta


def row_scale(
    y: torch.Tensor,  # [T, N] updated in place (may be a column slice of a wider tensor)
    mul: torch.Tensor,  # [S, N] per-slot multipliers, y's dtype and device
    add: torch.Tensor | None,  # [S, N] per-slot offsets, or None
    on: list[bool],  # [S] host: which slots this table serves
    meta: LoRAMeta,
) -> torch.Tensor:
    """y[rows of slot s] = y * mul[s] (+ add[s]) for every segment whose slot is on; returns y."""
    for i, s in enumerate(meta.slots):
        if not on[s] or meta.lens[i] == 0:
            continue
        rows = meta.rows(i)
        if isinstance(rows, slice):
            seg = y[rows]
            seg.mul_(mul[s])
            if add is not None:
                seg.add_(add[s])
        else:
            v = y.index_select(0, rows) * mul[s]
            if add is not None:
                v += add[s]
            y.index_copy_(0, rows, v)
    return y
