"""Fused q/k/v (and gate/up) LoRA launches (`kernels/fused_lora.py`) under the interpreter: one shrink and one
expand launch for several modules sharing an input, each module with its own paged pools, ranks (a slot may
have rank 0 in one module only) and output; q/k/v outputs are column slices of one fused tensor. Held to a
float64 loop per module, with unowned pages poisoned with NaN."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.capturable import max_fixed_tiles
from kernels.fused_lora import lora_apply_fused
from tests.kernels.test_capturable_lora import DECODE, LONG, _fixed
from tests.kernels.test_paged_lora import needs_interp

K = 40
# per module: (N, ranks per slot, page lists) with page rank 4 and 10 pages per pool
MODULES = {
    "q": (24, [4, 8, 12, 6, 0], [[5], [0, 7], [8, 4, 3], [1, 6], []]),
    "k": (16, [8, 0, 4, 12, 5], [[2, 9], [], [6], [0, 1, 3], [4, 5]]),
    "v": (16, [2, 3, 0, 7, 1], [[9], [3], [], [2, 8], [7]]),
}
PR, NUM_PAGES = 4, 10


def _module(n: int, ranks: list[int], plist: list[list[int]], dtype: torch.dtype, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    a_pool = torch.full((NUM_PAGES, PR, K), float("nan"))
    bt_pool = torch.full((NUM_PAGES, PR, n), float("nan"))
    pages = torch.zeros(len(ranks), 3, dtype=torch.int32)
    dense = []
    for s, (r, pl) in enumerate(zip(ranks, plist, strict=True)):
        a = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(dtype).double()
        b = (torch.randn(n, r, generator=g) / math.sqrt(max(r, 1))).to(dtype).double()
        dense.append((a, b))
        for j in range(r):
            a_pool[pl[j // PR], j % PR] = a[j].float()
            bt_pool[pl[j // PR], j % PR] = b[:, j].float()
        pages[s, :len(pl)] = torch.tensor(pl, dtype=torch.int32)
    return {"a": a_pool.to(dtype), "b": bt_pool.to(dtype).transpose(1, 2), "pages": pages, "dense": dense,
            "ranks": torch.tensor(ranks, dtype=torch.int32), "scales": torch.rand(len(ranks), generator=g) + 0.5}


def _want(x: torch.Tensor, y: torch.Tensor, mod: dict, slots: list[int]) -> torch.Tensor:
    out = y.double().clone()
    for t, s in enumerate(slots):
        if s >= 0:
            a, b = mod["dense"][s]
            out[t] += float(mod["scales"][s]) * ((x[t].double() @ a.T) @ b.T)
    return out


@needs_interp
@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("slots", [DECODE, LONG], ids=["decode", "long"])
def test_fused_qkv_into_slices_of_one_output(slots: list[int], dtype: torch.dtype, split_k: int) -> None:
    mods = [_module(n, r, p, dtype, seed=i) for i, (n, r, p) in enumerate(MODULES.values())]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(slots), K, generator=g).to(dtype)
    fused0 = torch.randn(len(slots), sum(n for n, _, _ in MODULES.values()), generator=g).to(dtype)
    fused = fused0.clone()
    bounds = [0, 24, 40, 56]
    ys = [fused[:, bounds[i]:bounds[i + 1]] for i in range(3)]
    meta = _fixed(slots, max_fixed_tiles(len(slots), 5))
    lora_apply_fused(x, ys, [(m["a"], m["b"], m["ranks"], m["scales"], m["pages"]) for m in mods], meta,
                     split_k=split_k)
    assert torch.isfinite(fused).all()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for i, m in enumerate(mods):
        y0 = fused0[:, bounds[i]:bounds[i + 1]]
        got = fused[:, bounds[i]:bounds[i + 1]]
        torch.testing.assert_close(got.double(), _want(x, y0, m, slots), atol=tol, rtol=tol)
        ranks = m["ranks"].tolist()
        moved = [t for t, s in enumerate(slots) if s >= 0 and ranks[s]]
        still = [t for t, s in enumerate(slots) if s < 0 or ranks[s] == 0]
        assert not torch.allclose(got[moved].double(), y0[moved].double(), atol=tol, rtol=tol)
        assert torch.equal(got[still], y0[still])  # base rows and this module's rank-0 rows untouched


@needs_interp
@pytest.mark.parametrize("names", [("q", "k"), ("v",)], ids=["gate-up-like", "one"])
def test_fused_separate_outputs(names: tuple[str, ...]) -> None:
    """Two modules with their own output tensors (gate/up), and a single module."""
    mods = [_module(*MODULES[n], torch.float32, seed=7 + i) for i, n in enumerate(names)]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(len(DECODE), K, generator=g)
    y0 = [torch.randn(len(DECODE), MODULES[n][0], generator=g) for n in names]
    ys = [y.clone() for y in y0]
    lora_apply_fused(x, ys, [(m["a"], m["b"], m["ranks"], m["scales"], m["pages"]) for m in mods],
                     _fixed(DECODE, max_fixed_tiles(len(DECODE), 5)))
    for y, y_start, m in zip(ys, y0, mods, strict=True):
        torch.testing.assert_close(y.double(), _want(x, y_start, m, DECODE), atol=1e-4, rtol=1e-4)


def test_fused_refuses_mismatched_outputs() -> None:
    m = _module(*MODULES["q"], torch.float32, seed=0)
    x = torch.zeros(3, K)
    meta = _fixed([0, 1, -1], 3)
    mod = (m["a"], m["b"], m["ranks"], m["scales"], m["pages"])
    with pytest.raises(ValueError, match="1..3 modules and one output each"):
        lora_apply_fused(x, [torch.zeros(3, 24)] * 2, [mod], meta)
    with pytest.raises(ValueError, match=r"module 0: y must be \[3, N\]"):
        lora_apply_fused(x, [torch.zeros(3, 23)], [mod], meta)
