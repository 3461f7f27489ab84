"""The CPU twin's stacked path (runs of equal-length, equal-rank segments as one bmm) equals the plain twin,
and its weight cache is emptied when a slot changes."""

from __future__ import annotations

import pytest
import torch

from kernels import LoRAMeta, StackCache, lora_apply
from kernels.reference import lora_expand_ref, lora_shrink_ref


def setup(slots_of_tokens: list[int], ranks: list[int], k: int = 40, n: int = 24, r_max: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = len(ranks)
    a = torch.randn(s, r_max, k, generator=g)
    b = torch.randn(s, n, r_max, generator=g)
    for i, r in enumerate(ranks):  # buffers beyond a slot's rank hold junk: it must never be read
        a[i, r:] = 1e4
        b[i, :, r:] = 1e4
    x = torch.randn(len(slots_of_tokens), k, generator=g)
    y = torch.randn(len(slots_of_tokens), n, generator=g)
    return x, y, a, b, torch.tensor(ranks, dtype=torch.int32), torch.rand(s, generator=g) + 0.5


@pytest.mark.parametrize("token_slots, ranks, stacked", [
    ([0, 0, 1, 1, 2, 2, 3, 3], [4, 4, 4, 4], True),  # one run of 4 segments
    ([0, 0, 1, 1, 2, 2, 3, 3, -1, -1], [4, 8, 8, 4], True),  # ranks split the run: (0), (1, 2), (3)
    ([2, 2, 2, 0, 0, 1, 1, 1], [4, 4, 4], False),  # lengths 3, 2, 3: no two adjacent alike
    ([0, 1, 2, 3, 4, 5], [16, 16, 16, 16, 16, 16], True),  # decode: one token per adapter
    ([-1, 1, 1, 0, 0, -1, 3, 3, 2, 2], [4, 4, 4, 4], True),  # a base row splits the runs: (1, 0), (3, 2)
    ([0, -1, 1], [4, 4], False),  # equal segments, but not adjacent rows
])
def test_stacked_equals_plain_twin(token_slots, ranks, stacked):
    x, y, a, b, rk, sc = setup(token_slots, ranks)
    meta = LoRAMeta.from_token_slots(token_slots)
    want = lora_expand_ref(lora_shrink_ref(x, a, rk, meta), b, rk, sc, meta, y.clone())
    assert not torch.allclose(want, y)  # the adapters act
    cache = StackCache()
    got = lora_apply(x, y.clone(), a, b, rk, sc, meta, cache=(cache, "m"))  # first sight: per segment
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert cache.used == 0
    again = lora_apply(x, y.clone(), a, b, rk, sc, meta, cache=(cache, "m"))  # second: stacked and kept
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-4)
    assert (cache.used > 0) == stacked
    third = lora_apply(x, y.clone(), a, b, rk, sc, meta, cache=(cache, "m"))  # from the cache
    torch.testing.assert_close(third, want, rtol=1e-5, atol=1e-4)


def test_stack_cache_budget_falls_back_to_segments():
    token_slots, ranks = [0, 0, 1, 1, 2, 2], [4, 4, 4]
    x, y, a, b, rk, sc = setup(token_slots, ranks)
    meta = LoRAMeta.from_token_slots(token_slots)
    want = lora_expand_ref(lora_shrink_ref(x, a, rk, meta), b, rk, sc, meta, y.clone())
    tiny = StackCache(max_bytes=16)  # nothing fits: computed segment by segment, same result
    torch.testing.assert_close(lora_apply(x, y.clone(), a, b, rk, sc, meta, cache=(tiny, "m")), want,
                               rtol=1e-5, atol=1e-4)
    assert tiny.used == 0 and len(tiny) == 0


def test_slot_reload_empties_the_stack_cache():
    from server.families.lora import LoRASlots
    from server.model.shapes import BaseModelInfo

    info = BaseModelInfo("llama", 1, 16, 32, 4, 2, 4, 64)
    slots = LoRASlots(info, max_adapters=2, max_rank=4, dtype=torch.float32, device=torch.device("cpu"))
    w = {(0, "q_proj"): (torch.randn(2, 16), torch.randn(16, 2), 1.0)}
    slots.load_slot(0, w)
    slots.load_slot(1, w)
    x, y = torch.randn(4, 16), torch.zeros(4, 16)
    meta = LoRAMeta.from_token_slots([0, 0, 1, 1])
    a, b, rk, sc = slots.module(0, "q_proj", (0, 1))
    pages = slots.pool.pages
    for _ in range(2):  # a run is stacked on its second step
        lora_apply(x, y, a, b, rk, sc, meta, cache=slots.cache_for(0, "q_proj"), pages=pages)
    assert slots.stack_cache.used > 0
    w2 = {(0, "q_proj"): (torch.randn(2, 16), torch.randn(16, 2), 3.0)}
    slots.load_slot(1, w2)
    assert slots.stack_cache.used == 0  # new weights in slot 1: stale stacks dropped
    y2 = lora_apply(x, torch.zeros(4, 16), a, b, rk, sc, meta, cache=slots.cache_for(0, "q_proj"), pages=pages)
    ref = lora_apply(x, torch.zeros(4, 16), a, b, rk, sc, meta, pages=pages)
    want = x[2:] @ w2[(0, "q_proj")][0].T @ w2[(0, "q_proj")][1].T * 3.0
    torch.testing.assert_close(ref[2:], want)
    torch.testing.assert_close(y2, ref)


def test_two_runs_in_one_module_both_cached():
    token_slots, ranks = [0, 0, 1, 1, 2, 2, 3, 3], [4, 4, 8, 8]  # runs (0, 1) at rank 4 and (2, 3) at rank 8
    x, y, a, b, rk, sc = setup(token_slots, ranks)
    meta = LoRAMeta.from_token_slots(token_slots)
    want = lora_expand_ref(lora_shrink_ref(x, a, rk, meta), b, rk, sc, meta, y.clone())
    cache = StackCache()
    for _ in range(3):
        torch.testing.assert_close(lora_apply(x, y.clone(), a, b, rk, sc, meta, cache=(cache, "m")), want,
                                   rtol=1e-5, atol=1e-4)
    assert len(cache) == 2


def test_stack_cache_evicts_least_recently_used_of_earlier_steps_across_modules():
    cache = StackCache(max_bytes=80)
    cache.begin("step 1")
    for m in range(4):
        assert cache.store(("mod", m), "run", (torch.zeros(1),), 20)
    cache.begin("step 2")
    assert cache.lookup(("mod", 0), "run") is not None  # module 0's run: used again, now the most recent
    assert cache.store(("mod", 9), "run", (torch.zeros(1),), 40)  # evicts modules 1 and 2 (oldest first)
    assert cache.lookup(("mod", 1), "run") is None and cache.lookup(("mod", 2), "run") is None
    assert cache.lookup(("mod", 0), "run") is not None and cache.lookup(("mod", 3), "run") is not None
    assert cache.used == 80 and cache.evictions == 2 and len(cache) == 3


def test_stack_cache_never_evicts_what_the_current_step_uses():
    """A run that does not fit beside the current step's own runs is refused before anything is evicted (no
    thrashing between the modules of one step): it is computed segment by segment instead."""
    cache = StackCache(max_bytes=100)
    cache.begin("step 1")
    for m in range(4):
        assert cache.store(("mod", m), "run", (torch.zeros(1),), 20)
    assert not cache.store(("mod", 5), "run", (torch.zeros(1),), 30)  # only 20 left: refused
    assert len(cache) == 4 and cache.used == 80 and cache.evictions == 0
    assert cache.store(("mod", 5), "run", (torch.zeros(1),), 20)  # fits exactly
    cache.begin("step 2")
    cache.lookup(("mod", 0), "run")
    assert not cache.store(("mod", 6), "run", (torch.zeros(1),), 100)  # would need module 0's run too
    assert cache.lookup(("mod", 0), "run") is not None and cache.evictions == 0
    assert cache.store(("mod", 6), "run", (torch.zeros(1),), 80)  # the 4 runs step 2 did not use go
    assert cache.evictions == 4 and cache.used == 100
