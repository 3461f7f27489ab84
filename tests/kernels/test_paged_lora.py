"""LoRA kernels reading A/B through a page table: Triton (interpreter), the torch twin and the CPU backend
against a float64 loop over each adapter's own dense weights, with mixed ranks in one batch, scattered
pages, and every page no slot owns (and every row past a slot's rank) poisoned with NaN, so a read of
padding or of another adapter's page shows up in the output."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import LoRAMeta, StackCache, lora_apply, lora_apply_cpu, lora_expand_ref, lora_shrink_ref
from kernels.triton_expand import lora_expand_triton
from kernels.triton_shrink import _shrink_kernel, lora_shrink_triton

INTERPRETED = type(_shrink_kernel).__name__ == "InterpretedFunction"
needs_interp = pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2)}
PR = 4  # page rank: rank rows per page
K, N = 40, 24


def _paged(ranks: list[int], page_lists: list[list[int]], num_pages: int, dtype: torch.dtype, seed: int = 0
           ) -> dict[str, object]:
    """Dense per-slot A [r, K], B [N, r] and the same weights scattered into pools through `page_lists`."""
    g = torch.Generator().manual_seed(seed)
    mp = max(len(p) for p in page_lists)
    a_pool = torch.full((num_pages, PR, K), float("nan"))
    bt_pool = torch.full((num_pages, PR, N), float("nan"))  # stored [P, PR, N], viewed [P, N, PR]
    pages = torch.zeros(len(ranks), mp, dtype=torch.int32)
    dense = []
    for s, (r, plist) in enumerate(zip(ranks, page_lists, strict=True)):
        assert len(plist) == -(-r // PR)
        a = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(dtype).float()
        b = (torch.randn(N, r, generator=g) / math.sqrt(max(r, 1))).to(dtype).float()
        dense.append((a, b))
        for j in range(r):
            a_pool[plist[j // PR], j % PR] = a[j]
            bt_pool[plist[j // PR], j % PR] = b[:, j]
        pages[s, :len(plist)] = torch.tensor(plist, dtype=torch.int32)
        if plist:
            pages[s, len(plist):] = 10_000  # never read: past the slot's rank
    return {"a": a_pool.to(dtype), "b": bt_pool.to(dtype).transpose(1, 2), "pages": pages, "dense": dense,
            "ranks": torch.tensor(ranks, dtype=torch.int32), "scales": torch.rand(len(ranks), generator=g) + 0.5,
            "r_max": mp * PR}


# Mixed ranks in one batch: rank 4 (1 page), 8 (2 pages, not consecutive), 12 (3 pages, reversed), rank 6
# (partial last page), a rank-0 slot, and pages 2 and 9 owned by nobody (NaN).
RANKS = [4, 8, 12, 6, 0]
PAGES = [[5], [0, 7], [8, 4, 3], [1, 6], []]
NUM_PAGES = 10
TOKENS = [0, 1, 1, -1, 2, 3, 2, 0, -1, 4, 3, 3, 1]
PREFILL = [2] * 9 + [-1] * 3 + [0] * 5 + [3] * 2


def _naive(x: torch.Tensor, y: torch.Tensor, p: dict[str, object], slots: list[int]) -> torch.Tensor:
    out = y.double().clone()
    for t, s in enumerate(slots):
        if s >= 0 and RANKS[s]:
            a, b = p["dense"][s]
            out[t] += float(p["scales"][s]) * ((x[t].double() @ a.double().T) @ b.double().T)
    return out


def _inputs(slots: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(len(slots), K, generator=g).to(dtype), torch.randn(len(slots), N, generator=g).to(dtype)


@pytest.mark.parametrize("slots", [TOKENS, PREFILL], ids=["interleaved", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interp), "twin", "cpu"])
def test_paged_apply_matches_dense_loop(backend: str, dtype: torch.dtype, slots: list[int]) -> None:
    p = _paged(RANKS, PAGES, NUM_PAGES, dtype)
    x, y0 = _inputs(slots, dtype)
    meta = LoRAMeta.from_token_slots(slots)
    want = _naive(x, y0, p, slots)
    y = y0.clone()
    if backend == "triton":
        h = lora_shrink_triton(x, p["a"], p["ranks"], meta, pages=p["pages"])
        assert h.shape == (len(slots), p["r_max"])
        lora_expand_triton(h, p["b"], p["ranks"], p["scales"], meta, y, pages=p["pages"])
    elif backend == "twin":
        h = lora_shrink_ref(x, p["a"], p["ranks"], meta, pages=p["pages"])
        lora_expand_ref(h, p["b"], p["ranks"], p["scales"], meta, y, pages=p["pages"])
    else:
        lora_apply_cpu(x, y, p["a"], p["b"], p["ranks"], p["scales"], meta, pages=p["pages"])
    assert torch.isfinite(y).all()  # no NaN page (unowned, or past a slot's rank) was read
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), want, atol=atol, rtol=rtol)
    moved = [t for t, s in enumerate(slots) if s >= 0 and RANKS[s]]
    assert not torch.allclose(y[moved].double(), y0[moved].double(), atol=atol, rtol=rtol)  # the adapters act
    still = [t for t, s in enumerate(slots) if s < 0 or RANKS[s] == 0]
    assert torch.equal(y[still], y0[still])  # base rows bit-identical


@needs_interp
def test_paged_shrink_columns_past_rank_untouched() -> None:
    p = _paged(RANKS, PAGES, NUM_PAGES, torch.float32)
    x, _ = _inputs(TOKENS, torch.float32)
    h = lora_shrink_triton(x, p["a"], p["ranks"], LoRAMeta.from_token_slots(TOKENS), pages=p["pages"])
    for t, s in enumerate(TOKENS):
        r = RANKS[s] if s >= 0 else 0
        assert torch.equal(h[t, r:], torch.zeros_like(h[t, r:]))


def test_cpu_stacked_runs_through_pages() -> None:
    """Decode: equal-length segments of equal rank run as one bmm over weights stacked through the pages."""
    ranks, plist = [8, 8, 8, 4], [[3, 4], [6, 0], [1, 2], [5]]
    p = _paged(ranks, plist, 8, torch.float32, seed=3)
    slots = [0, 1, 2, 3]
    x, y0 = _inputs(slots, torch.float32)
    meta = LoRAMeta.from_token_slots(slots)
    cache = StackCache()
    for _ in range(2):  # a run is stacked on its second step
        y = lora_apply(x, y0.clone(), p["a"], p["b"], p["ranks"], p["scales"], meta, cache=(cache, "m"),
                       pages=p["pages"])
    assert len(cache) == 1  # the rank-8 run was stacked
    want = y0.double().clone()
    for t, s in enumerate(slots):
        a, b = p["dense"][s]
        want[t] += float(p["scales"][s]) * ((x[t].double() @ a.double().T) @ b.double().T)
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)


def test_identity_pages_equal_unpaged_layout() -> None:
    """pages=None is the stacked [S, R_max, K] layout: the same result as the explicit identity table."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 8, K, generator=g), torch.randn(3, N, 8, generator=g)
    ranks, scales = torch.tensor([8, 3, 5], dtype=torch.int32), torch.rand(3, generator=g)
    x, y0 = torch.randn(5, K, generator=g), torch.randn(5, N, generator=g)
    meta = LoRAMeta.from_token_slots([2, 0, -1, 1, 2])
    ident = torch.arange(3, dtype=torch.int32).view(3, 1)
    got = lora_apply_cpu(x, y0.clone(), a, b, ranks, scales, meta)
    torch.testing.assert_close(got, lora_apply_cpu(x, y0.clone(), a, b, ranks, scales, meta, pages=ident))
    assert not torch.allclose(got, y0)


def test_cpu_gathers_scattered_pages_once_per_cache():
    """Slots on scattered pages are gathered into the stack cache once; the next step reads the copy, and a
    cleared cache (any slot change) gathers again."""
    p = _paged(RANKS, PAGES, NUM_PAGES, torch.float32)
    x, y0 = _inputs(TOKENS, torch.float32)
    meta = LoRAMeta.from_token_slots(TOKENS)
    cache = StackCache()
    want = _naive(x, y0, p, TOKENS)
    for _ in range(2):
        y = lora_apply(x, y0.clone(), p["a"], p["b"], p["ranks"], p["scales"], LoRAMeta.from_token_slots(TOKENS),
                       cache=(cache, "m"), pages=p["pages"])
        torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)
    assert {k[1] for k in cache.gathered} == {1, 2, 3}  # slots 1, 2 and 3 sit on non-consecutive pages
    p["a"][7].zero_()  # page 7 (slot 1) changes: the cached copy is stale until the cache is cleared
    cache.clear()
    y = lora_apply(x, y0.clone(), p["a"], p["b"], p["ranks"], p["scales"], meta, cache=(cache, "m"), pages=p["pages"])
    assert not torch.allclose(y.double(), want, atol=1e-4, rtol=1e-4)


def test_cpu_decode_compositions_change_under_a_small_stack_budget() -> None:
    """Decode steps whose adapter set changes every few steps (requests finish, others join), mixed ranks on
    scattered pages, two modules sharing one StackCache too small for both: every step equals the float64
    loop, whether its runs come from the cache, are stacked anew (evicting an earlier step's), or run per
    segment because the step's own runs fill the budget."""
    ranks = [8, 8, 4, 8, 8, 12, 8, 4, 8]
    plist = [[3, 4], [6, 0], [1], [9, 2], [10, 11], [12, 7, 5], [13, 14], [8], [15, 17]]
    p = _paged(ranks, plist, 18, torch.float32, seed=5)
    q = _paged(ranks, plist, 18, torch.float32, seed=6)  # a second module, other weights
    per_slot = 8 * (K + N) * 4  # bytes of one rank-8 slot's A + B rows in a stack
    cache = StackCache(max_bytes=5 * per_slot)  # one 4-slot run fits, not two modules' worth
    compositions = [[0, 1, 3, 4], [0, 1, 3, 4], [0, 1, 3, 4], [1, 3, 4, 6], [1, 3, 4, 6], [2, 0, 5, 8, 6],
                    [2, 0, 5, 8, 6], [0, 1, 3, 4], [0, 1, 3, 4]]
    stacked_steps = 0
    for step, comp in enumerate(compositions):
        slots = sorted(comp)  # build_step groups rows by slot
        g = torch.Generator().manual_seed(100 + step)
        x, y0 = torch.randn(len(slots), K, generator=g), torch.randn(len(slots), N, generator=g)
        meta = LoRAMeta.from_token_slots(slots)
        for mod, w in (("p", p), ("q", q)):
            want = y0.double().clone()
            for t, s in enumerate(slots):
                a, b = w["dense"][s]
                want[t] += float(w["scales"][s]) * ((x[t].double() @ a.double().T) @ b.double().T)
            assert not torch.allclose(want, y0.double(), atol=1e-3)
            used = cache.used
            y = lora_apply(x, y0.clone(), w["a"], w["b"], w["ranks"], w["scales"], meta, cache=(cache, mod),
                           pages=w["pages"])
            assert torch.isfinite(y).all()
            torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)
            stacked_steps += cache.used != used
            assert cache.used <= cache.max_bytes
    assert cache.evictions > 0 and stacked_steps >= 2  # the budget forced evictions; runs were stacked
