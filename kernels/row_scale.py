"""Per-slot column scaling of token rows: IA3's learned vectors and DoRA's magnitude, mixed in one batch.

Semantics: for every row t of y whose slot s = slot(t) (from `meta`; base rows have none):
    y[t] = y[t] * mul[s]            (add is None)
    y[t] = y[t] * mul[s] + add[s]   (otherwise)
Other rows are untouched. Tables have one row per slot plus a last *identity* row (ones in `mul`, zeros in
`add`), and a slot that a table does not serve holds the identity too, so a row may be scaled by its
table row without asking whether the slot is on.

Two ways to run it, the same result:
- gather (several small segments: decode with a few adapters or more, or any CUDA step): the step's
  row -> table-row index (`row_index`, built once per step, shared by every module and family) picks each
  row's multiplier,
  and one multiply (and one add) covers all T rows, base rows included (they pick the identity row).
  Per module that is one gather + one elementwise op, whatever the number of adapters.
- per segment (on CPU: one or two segments, or long ones: prefill): one in-place op per segment on its row slice, where
  the op's cost dwarfs its overhead and a gathered [T, N] multiplier would only add memory traffic.
"""

from __future__ import annotations

import torch

from kernels.metadata import LoRAMeta

# CPU: segments this long (on average, counting base rows) run as per-segment slice ops instead of a gather.
SEGMENT_ROWS = 64


def row_index(meta: LoRAMeta, identity: int) -> torch.Tensor:
    """[T] int64 on meta's device: the table row of every row of the step: its slot, or `identity` for a base
    row. Built once per step and identity (memoised on the meta), then read by every module's row scale."""
    key = ("row_index", identity)
    hit = meta.memo.get(key)
    if hit is None:
        dev = meta.token_indices.device
        seg_slot = torch.repeat_interleave(torch.tensor(meta.slots, dtype=torch.int64),
                                           torch.tensor(meta.lens, dtype=torch.int64))
        hit = torch.full((meta.num_tokens,), identity, dtype=torch.int64, device=dev)
        hit[meta.token_indices] = seg_slot.to(dev, non_blocking=True)
        meta.memo[key] = hit
    return hit


def use_gather(meta: LoRAMeta, y: torch.Tensor) -> bool:
    """Whether `row_scale` gathers (see the module docstring). On CPU a gather + multiply costs about what
    three per-segment slice ops do (measured at hidden 1024): gather from three segments on, unless they are
    long; always on CUDA (one launch) and for a hand-built meta whose rows are not contiguous."""
    if y.is_cuda or not meta.contiguous:
        return True
    return meta.num_segments >= 3 and meta.num_tokens < SEGMENT_ROWS * meta.num_segments


def row_scale(
    y: torch.Tensor,  # [T, N] (may be a column slice of a wider tensor)
    mul: torch.Tensor,  # [S + 1, N] per-slot multipliers, y's dtype and device; row S is all ones
    add: torch.Tensor | None,  # [S + 1, N] per-slot offsets (row S all zeros), or None
    on: list[bool],  # [S] host: which slots this table serves (per-segment path: the others are skipped)
    meta: LoRAMeta,
    *,
    inplace: bool = True,
    gather: bool | None = None,  # None: `use_gather`; True / False force one path (tests)
) -> torch.Tensor:
    """y[rows of slot s] = y * mul[s] (+ add[s]); in place (returns y) or, with inplace=False, into a new
    tensor (y untouched)."""
    if gather is None:
        gather = use_gather(meta, y)
    if gather:
        idx = row_index(meta, mul.shape[0] - 1)
        g = mul.index_select(0, idx)
        if inplace:
            y.mul_(g)
        else:
            y = y * g
        if add is not None:
            y.add_(add.index_select(0, idx))
        return y
    if not inplace:
        y = y.clone()
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
