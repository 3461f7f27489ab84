"""The capture-ready LoRA launches (`kernels/capturable.py`) under the interpreter: fixed-shape row tiles padded
past the step's real tiles, ranks read on the device, one table shared by modules whose per-slot ranks differ.
Held to a float64 loop over each adapter's dense weights, with every page no slot owns poisoned with NaN."""

from __future__ import annotations

import pytest
import torch

from kernels import FixedLoRAMeta, LoRAMeta, lora_apply
from kernels.capturable import fixed_tiles, lora_expand_fixed, lora_shrink_fixed, max_fixed_tiles
from tests.kernels.test_paged_lora import NUM_PAGES, PAGES, RANKS, TOL, _inputs, _naive, _paged, needs_interp


def _fixed(slots: list[int], n_tiles: int) -> FixedLoRAMeta:
    """The step's real tiles, then padding tiles (m_len 0) up to n_tiles; the padding names slot 0 and row 0
    so a kernel that ignored m_len would visibly write row 0."""
    meta = LoRAMeta.from_token_slots(slots)
    real = fixed_tiles(meta)
    assert len(real) <= n_tiles
    tiles = torch.tensor(real + [(0, 0, 0, 0, 0)] * (n_tiles - len(real)), dtype=torch.int32).reshape(-1, 5)
    idx = torch.zeros(len(slots), dtype=torch.int64)
    idx[:len(meta.token_indices)] = meta.token_indices
    return FixedLoRAMeta(token_indices=idx, tiles=tiles, num_tokens=len(slots))


DECODE = [0, 1, 1, -1, 2, 3, 2, 0, -1, 4, 3, 3, 1]  # interleaved slots, base rows, a rank-0 slot
LONG = [2] * 19 + [-1] * 3 + [0] * 5  # a segment longer than one 16-row tile


@needs_interp
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("slots", [DECODE, LONG], ids=["decode", "long"])
def test_fixed_apply_matches_dense_loop(slots: list[int], dtype: torch.dtype, split_k: int) -> None:
    p = _paged(RANKS, PAGES, NUM_PAGES, dtype)
    x, y0 = _inputs(slots, dtype)
    meta = _fixed(slots, max_fixed_tiles(len(slots), len(RANKS)))
    assert meta.tiles[-1, 1] == 0  # the table really has padding tiles
    y = y0.clone()
    h = lora_shrink_fixed(x, p["a"], p["ranks"], meta, pages=p["pages"], split_k=split_k)
    lora_expand_fixed(h, p["b"], p["ranks"], p["scales"], meta, y, pages=p["pages"])
    assert torch.isfinite(y).all()  # no NaN page (unowned, or past a slot's rank) was read
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), _naive(x, y0, p, slots), atol=atol, rtol=rtol)
    moved = [t for t, s in enumerate(slots) if s >= 0 and RANKS[s]]
    assert not torch.allclose(y[moved].double(), y0[moved].double(), atol=atol, rtol=rtol)
    still = [t for t, s in enumerate(slots) if s < 0 or RANKS[s] == 0]
    assert torch.equal(y[still], y0[still])  # base rows, rank-0 rows and padding never written
    for t, s in enumerate(slots):  # the shrink wrote only a slot's own rank columns
        r = RANKS[s] if s >= 0 else 0
        assert torch.equal(h[t, r:], torch.zeros_like(h[t, r:]))


@needs_interp
def test_one_table_serves_modules_of_different_ranks() -> None:
    """The tile table does not depend on ranks: the same fixed meta run over a module where the slots have
    other ranks (and slot 1 has none) gives that module's answer, through the dispatching lora_apply."""
    ranks2 = [8, 0, 4, 12, 5]
    pages2 = [[2, 9], [], [6], [0, 1, 3], [4, 5]]
    slots = DECODE
    meta = _fixed(slots, max_fixed_tiles(len(slots), 5))
    for ranks, plist in ((RANKS, PAGES), (ranks2, pages2)):
        p = _paged(ranks, plist, NUM_PAGES, torch.float32, seed=4)
        x, y0 = _inputs(slots, torch.float32)
        y = lora_apply(x, y0.clone(), p["a"], p["b"], p["ranks"], p["scales"], meta, pages=p["pages"])
        want = y0.double().clone()
        for t, s in enumerate(slots):
            if s >= 0 and ranks[s]:
                a, b = p["dense"][s]
                want[t] += float(p["scales"][s]) * ((x[t].double() @ a.double().T) @ b.double().T)
        torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)


@needs_interp
@pytest.mark.parametrize("split_k", [1, 2])
def test_fixed_ranks_past_one_rank_block(split_k: int) -> None:
    """Ranks above the 16-wide rank block (20, 36, 17) take several rank-block programs per tile."""
    ranks = [20, 36, 5, 17]
    order = torch.randperm(21, generator=torch.Generator().manual_seed(3)).tolist()  # scattered pages
    plists, i = [], 0
    for r in ranks:
        n = -(-r // 4)
        plists.append(order[i:i + n])
        i += n
    p = _paged(ranks, plists, 21, torch.float32, seed=5)
    slots = [1, 0, 3, -1, 1, 2, 0, 3, 1]
    x, y0 = _inputs(slots, torch.float32)
    y = y0.clone()
    h = lora_shrink_fixed(x, p["a"], p["ranks"], _fixed(slots, 5), pages=p["pages"], split_k=split_k)
    lora_expand_fixed(h, p["b"], p["ranks"], p["scales"], _fixed(slots, 5), y, pages=p["pages"])
    want = y0.double().clone()
    for t, s in enumerate(slots):
        if s >= 0:
            a, b = p["dense"][s]
            want[t] += float(p["scales"][s]) * ((x[t].double() @ a.double().T) @ b.double().T)
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)


@needs_interp
def test_unpaged_layout_and_all_padding() -> None:
    """pages=None (stacked [S, R_max, K]) works, and a table of only padding tiles changes nothing."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 8, 40, generator=g), torch.randn(3, 24, 8, generator=g)
    ranks, scales = torch.tensor([8, 3, 5], dtype=torch.int32), torch.rand(3, generator=g) + 0.5
    x, y0 = torch.randn(4, 40, generator=g), torch.randn(4, 24, generator=g)
    slots = [2, 0, -1, 2]
    y = lora_apply(x, y0.clone(), a, b, ranks, scales, _fixed(slots, 4))
    want = y0.double().clone()
    for t, s in enumerate(slots):
        if s >= 0:
            want[t] += float(scales[s]) * (x[t].double() @ a[s, :ranks[s]].double().T) @ b[s, :, :ranks[s]].double().T
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)
    empty = FixedLoRAMeta(token_indices=torch.zeros(4, dtype=torch.int64), tiles=torch.zeros(4, 5, dtype=torch.int32),
                          num_tokens=4)
    assert torch.equal(lora_apply(x, y0.clone(), a, b, ranks, scales, empty), y0)


@needs_interp
def test_fixed_launch_refuses_host_ranks_on_another_device_and_bad_tiles() -> None:
    a, b = torch.zeros(2, 4, 8), torch.zeros(2, 6, 4)
    x, y = torch.zeros(3, 8), torch.zeros(3, 6)
    meta = FixedLoRAMeta(token_indices=torch.zeros(3, dtype=torch.int64), tiles=torch.zeros(3, 4, dtype=torch.int32),
                         num_tokens=3)
    with pytest.raises(ValueError, match=r"tiles must be int32 \[n, 5\]"):
        lora_shrink_fixed(x, a, torch.zeros(2, dtype=torch.int32), meta)
    meta.tiles = torch.zeros(3, 5, dtype=torch.int32)
    with pytest.raises(ValueError, match="ranks must be int32"):
        lora_expand_fixed(torch.zeros(3, 4), b, torch.zeros(2, dtype=torch.int64), torch.ones(2), meta, y)
    meta.num_tokens = 2
    with pytest.raises(ValueError, match="num_tokens 2 != 3"):
        lora_shrink_fixed(x, a, torch.zeros(2, dtype=torch.int32), meta)


def test_max_fixed_tiles_bounds_every_step() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        t = int(torch.randint(1, 70, (1,), generator=g))
        s = int(torch.randint(1, 9, (1,), generator=g))
        slots = torch.randint(-1, s, (t,), generator=g).tolist()
        assert len(fixed_tiles(LoRAMeta.from_token_slots(slots))) <= max_fixed_tiles(t, s)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fixed_apply_on_gpu(dtype: torch.dtype) -> None:
    """Real Triton: the fixed launches (split-K chosen from the SM count) against the float64 loop."""
    p = _paged(RANKS, PAGES, NUM_PAGES, dtype)
    x, y0 = _inputs(DECODE, dtype)
    meta = _fixed(DECODE, max_fixed_tiles(len(DECODE), len(RANKS)))
    want = _naive(x, y0, p, DECODE)
    cuda = {k: v.to("cuda") for k, v in p.items() if isinstance(v, torch.Tensor)}
    fm = FixedLoRAMeta(token_indices=meta.token_indices.cuda(), tiles=meta.tiles.cuda(), num_tokens=len(DECODE))
    y = lora_apply(x.cuda(), y0.cuda(), cuda["a"], cuda["b"], cuda["ranks"], cuda["scales"], fm, pages=cuda["pages"])
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double().cpu(), want, atol=3e-2, rtol=3e-2)
