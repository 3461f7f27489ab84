"""`kernels.row_scale` (IA3 / DoRA's per-row scale) against a per-row float64 loop, on mixed batches.

Rows of several slots and base rows are interleaved (a hand-built meta), laid out as `build_step` lays out a
step (base rows first, then each slot's rows), and in long prefill-like segments; each is run through the
gather path (one index per step, one multiply per module), the per-segment path and the automatic choice,
in place and into a new tensor, with and without the additive table, on a column slice of a wider tensor
(as q/k/v are slices of the fused output). Every slot's rows must change and every other row must not.
"""

from __future__ import annotations

import pytest
import torch

from kernels.metadata import LoRAMeta
from kernels.row_scale import row_index, row_scale, use_gather

S = 5  # slots; table row S is the identity
N = 24

LAYOUTS = {
    # slot 3 is not served by the table (identity row, `on` false); slot 4 has no row in the step
    "interleaved": [0, -1, 2, 2, -1, 0, 3, 1, -1, 0, 2, 1],
    "step_order": [-1, -1, 0, 0, 1, 1, 2, 2, 3, 3, 3],
    "decode": [-1, 0, 1, 2, 3],
    "prefill": [-1] * 7 + [0] * 70 + [2] * 65 + [1] * 66,
}


def _tables(dtype: torch.dtype, with_add: bool) -> tuple[torch.Tensor, torch.Tensor | None, list[bool]]:
    g = torch.Generator().manual_seed(3)
    on = [True, True, True, False, True]
    mul = torch.ones(S + 1, N, dtype=dtype)
    add = torch.zeros(S + 1, N, dtype=dtype) if with_add else None
    for s in range(S):
        if on[s]:
            mul[s] = (1.0 + 0.5 * torch.randn(N, generator=g)).to(dtype)
            if add is not None:
                add[s] = torch.randn(N, generator=g).to(dtype)
    return mul, add, on


def _expected(y: torch.Tensor, slots: list[int], mul: torch.Tensor, add: torch.Tensor | None, on: list[bool]
              ) -> torch.Tensor:
    out = y.double().clone()
    for t, s in enumerate(slots):
        if s >= 0 and on[s]:
            out[t] = out[t] * mul[s].double() + (0.0 if add is None else add[s].double())
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("gather", [True, False, None])
@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("with_add", [False, True])
def test_row_scale_mixed_batch(layout: str, gather: bool | None, inplace: bool, with_add: bool) -> None:
    slots = LAYOUTS[layout]
    meta = LoRAMeta.from_token_slots(slots)
    mul, add, on = _tables(torch.float32, with_add)
    wide = torch.randn(len(slots), N + 10, generator=torch.Generator().manual_seed(7))
    before = wide.clone()
    y = wide[:, 4:4 + N]  # a column slice, as the hooks get q/k/v
    want = _expected(y, slots, mul, add, on)
    got = row_scale(y, mul, add, on, meta, inplace=inplace, gather=gather)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    if inplace:
        assert got.data_ptr() == y.data_ptr()
    else:
        assert torch.equal(wide, before)  # the shared input is left alone
    # the other columns of the wide tensor are untouched either way
    assert torch.equal(wide[:, :4], before[:, :4]) and torch.equal(wide[:, 4 + N:], before[:, 4 + N:])
    for t, s in enumerate(slots):  # the test can fail: served slots' rows move, all other rows stay exact
        if s >= 0 and on[s]:
            assert not torch.allclose(got[t], before[t, 4:4 + N])
        else:
            assert torch.equal(got[t], before[t, 4:4 + N])


def test_row_index_is_built_once_per_step() -> None:
    meta = LoRAMeta.from_token_slots(LAYOUTS["interleaved"])
    idx = row_index(meta, S)
    assert idx.tolist() == [S if s < 0 else s for s in LAYOUTS["interleaved"]]
    assert row_index(meta, S) is idx  # shared by every module of the step
    assert row_index(meta, 9).tolist() == [9 if s < 0 else s for s in LAYOUTS["interleaved"]]


def test_path_choice() -> None:
    y = torch.empty(0, N)
    assert use_gather(LoRAMeta.from_token_slots(LAYOUTS["interleaved"]), y)  # rows not contiguous
    assert use_gather(LoRAMeta.from_token_slots(LAYOUTS["step_order"]), y)  # 4 short segments
    assert not use_gather(LoRAMeta.from_token_slots([-1, 0, 0, 1, 1]), y)  # two segments: slices
    assert not use_gather(LoRAMeta.from_token_slots(LAYOUTS["prefill"]), y)  # long segments: slices


def test_fp16_matches_per_segment() -> None:
    """Both paths give the same fp16 rows (one rounding each: a multiply, then an add)."""
    slots = LAYOUTS["step_order"]
    meta = LoRAMeta.from_token_slots(slots)
    mul, add, on = _tables(torch.float16, True)
    y = torch.randn(len(slots), N, generator=torch.Generator().manual_seed(2)).half()
    a = row_scale(y, mul, add, on, meta, inplace=False, gather=True)
    b = row_scale(y, mul, add, on, meta, inplace=False, gather=False)
    assert torch.equal(a, b)
