"""Grid tests of the LoRA kernels: Triton (interpreter on CPU, real on CUDA) and the torch twin,
each against a naive per-token loop in float64."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from kernels import LoRAMeta, lora_apply, lora_expand_ref, lora_shrink_ref
from kernels.triton_expand import expand_config, lora_expand_triton
from kernels.triton_shrink import _shrink_kernel, lora_shrink_triton, shrink_config

INTERPRETED = type(_shrink_kernel).__name__ == "InterpretedFunction"
if not INTERPRETED and not torch.cuda.is_available():
    raise RuntimeError("kernels was imported before TRITON_INTERPRET=1 was set; run `make test` or set it")
# Triton on CPU tensors needs the interpreter; on a CUDA machine without it these run in test_gpu_*.
needs_interp = pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

# (atol, rtol) against the float64 oracle, per input dtype.
TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (1e-1, 3e-2),
}

SHRINK = {"triton": lora_shrink_triton, "twin": lora_shrink_ref}
EXPAND = {"triton": lora_expand_triton, "twin": lora_expand_ref}


@dataclass(frozen=True)
class Case:
    name: str
    slots: tuple[int, ...]  # per token, -1 = base
    ranks: tuple[int, ...]  # per pool slot
    k: int  # hidden in
    n: int  # hidden out


def _interleaved(t: int, s: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(-1, s) for _ in range(t))


CASES = [
    Case("decode_8_slots_mixed_ranks", tuple(range(8)), (1, 4, 8, 16, 64, 4, 8, 16), 72, 200),
    Case("prefill_contiguous", (0,) * 20 + (-1,) * 4 + (1,) * 33 + (2,) * 7, (16, 64, 1), 200, 72),
    Case("interleaved_with_base", _interleaved(37, 5, seed=1), (8, 1, 64, 4, 16), 72, 72),
    Case("single_token", (0,), (4,), 200, 200),
    Case("empty_slots_in_pool", (2, 0, 2, -1, 0, 2), (16, 64, 8, 1), 72, 200),
    Case("rank_zero_slot", (0, 1, 1, 0, -1), (0, 8), 72, 72),
]


def _pool(case: Case, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s, r_max = len(case.ranks), max(case.ranks) or 1
    a = torch.randn(s, r_max, case.k, generator=g) / math.sqrt(case.k)
    b = torch.randn(s, case.n, r_max, generator=g) / math.sqrt(r_max)
    for i, r in enumerate(case.ranks):  # rows/cols past a slot's rank hold garbage: kernels must ignore it
        a[i, r:] = 1e4
        b[i, :, r:] = 1e4
    return {
        "x": torch.randn(len(case.slots), case.k, generator=g).to(dtype),
        "a": a.to(dtype),
        "b": b.to(dtype),
        "ranks": torch.tensor(case.ranks, dtype=torch.int32),
        "scales": torch.rand(s, generator=g) + 0.5,
    }


def _naive_shrink(x: torch.Tensor, a: torch.Tensor, ranks: list[int], slots: tuple[int, ...]) -> torch.Tensor:
    out = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float64)
    for t, s in enumerate(slots):
        if s >= 0:
            r = ranks[s]
            out[t, :r] = x[t].double() @ a[s, :r].double().T
    return out


def _naive_expand(h: torch.Tensor, b: torch.Tensor, ranks: list[int], scales: torch.Tensor,
                  slots: tuple[int, ...], y: torch.Tensor) -> torch.Tensor:
    y = y.double().clone()
    for t, s in enumerate(slots):
        if s >= 0:
            r = ranks[s]
            y[t] += float(scales[s]) * (h[t, :r].double() @ b[s, :, :r].double().T)
    return y


BACKENDS = [pytest.param("triton", marks=needs_interp), "twin"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_shrink_matches_naive(backend: str, case: Case, dtype: torch.dtype) -> None:
    p = _pool(case, dtype)
    meta = LoRAMeta.from_token_slots(list(case.slots))
    out = SHRINK[backend](p["x"], p["a"], p["ranks"], meta)
    assert out.dtype == dtype and out.shape == (len(case.slots), p["a"].shape[1])
    want = _naive_shrink(p["x"], p["a"], list(case.ranks), case.slots)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_expand_into_column_slice_matches_naive(backend: str, case: Case, dtype: torch.dtype) -> None:
    p = _pool(case, dtype)
    meta = LoRAMeta.from_token_slots(list(case.slots))
    t = len(case.slots)
    h = (torch.randn(t, p["a"].shape[1], generator=torch.Generator().manual_seed(3))).to(dtype)
    wide = torch.randn(t, 16 + case.n + 8, generator=torch.Generator().manual_seed(4)).to(dtype)  # [q|y|v]
    before = wide.clone()
    y = wide[:, 16:16 + case.n]
    got = EXPAND[backend](h, p["b"], p["ranks"], p["scales"], meta, y)
    assert got.data_ptr() == y.data_ptr()
    want = _naive_expand(h, p["b"], list(case.ranks), p["scales"], case.slots, before[:, 16:16 + case.n])
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(wide[:, 16:16 + case.n].double(), want, atol=atol, rtol=rtol)
    assert torch.equal(wide[:, :16], before[:, :16]) and torch.equal(wide[:, 16 + case.n:], before[:, 16 + case.n:])
    untouched = [i for i, s in enumerate(case.slots) if s < 0 or case.ranks[s] == 0]
    assert torch.equal(wide[untouched], before[untouched])  # base rows bit-identical
    if len(untouched) < t:  # the test can fail: the adapter really moves the output
        assert not torch.allclose(wide.double(), before.double(), atol=atol, rtol=rtol)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("split_k", [2, 3])
def test_shrink_split_k(split_k: int, dtype: torch.dtype) -> None:
    case = CASES[2]
    p = _pool(case, dtype)
    meta = LoRAMeta.from_token_slots(list(case.slots))
    out = lora_shrink_triton(p["x"], p["a"], p["ranks"], meta, split_k=split_k)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), _naive_shrink(p["x"], p["a"], list(case.ranks), case.slots),
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("tokens", [1, 17, 64])
@pytest.mark.parametrize("num_slots", [1, 3, 8])
@pytest.mark.parametrize("k, n", [(72, 200), (200, 72)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_grid_apply(backend: str, dtype: torch.dtype, k: int, n: int, num_slots: int, tokens: int) -> None:
    """Random mixed batches: ranks from {1, 4, 8, 16, 64}, interleaved slots, base rows, unused slots."""
    rng = random.Random(hash((k, num_slots, tokens)) & 0xFFFF)
    ranks = tuple(rng.choice([1, 4, 8, 16, 64]) for _ in range(num_slots))
    case = Case("random", tuple(rng.randrange(-1, num_slots) for _ in range(tokens)), ranks, k, n)
    p = _pool(case, dtype, seed=tokens)
    meta = LoRAMeta.from_token_slots(list(case.slots))
    h = SHRINK[backend](p["x"], p["a"], p["ranks"], meta)
    y0 = torch.randn(tokens, n).to(dtype)
    y = EXPAND[backend](h, p["b"], p["ranks"], p["scales"], meta, y0.clone())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(h.double(), _naive_shrink(p["x"], p["a"], list(ranks), case.slots),
                               atol=atol, rtol=rtol)
    want = _naive_expand(h, p["b"], list(ranks), p["scales"], case.slots, y0)
    torch.testing.assert_close(y.double(), want, atol=atol, rtol=rtol)


@needs_interp
def test_half_inputs_with_fp32_intermediate() -> None:
    case = CASES[0]
    p = _pool(case, torch.float16)
    meta = LoRAMeta.from_token_slots(list(case.slots))
    h = lora_shrink_triton(p["x"], p["a"], p["ranks"], meta, torch.zeros(8, 64))  # fp32 h: no rounding
    want_h = _naive_shrink(p["x"], p["a"], list(case.ranks), case.slots)
    torch.testing.assert_close(h.double(), want_h, atol=1e-4, rtol=1e-4)
    y0 = torch.randn(8, case.n).half()
    y = lora_expand_triton(h, p["b"], p["ranks"], p["scales"], meta, y0.clone())
    want = _naive_expand(h, p["b"], list(case.ranks), p["scales"], case.slots, y0)
    torch.testing.assert_close(y.double(), want, atol=1e-2, rtol=5e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shrink_into_given_out_touches_only_own_rank(backend: str) -> None:
    case = CASES[4]
    p = _pool(case, torch.float32)
    meta = LoRAMeta.from_token_slots(list(case.slots))
    out = torch.full((len(case.slots), p["a"].shape[1]), 7.0)
    SHRINK[backend](p["x"], p["a"], p["ranks"], meta, out)
    want = _naive_shrink(p["x"], p["a"], list(case.ranks), case.slots)
    for t, s in enumerate(case.slots):
        r = case.ranks[s] if s >= 0 else 0
        torch.testing.assert_close(out[t, :r].double(), want[t, :r], atol=1e-4, rtol=1e-4)
        assert bool((out[t, r:] == 7.0).all())


def _explicit_meta(slots: list[int], starts: list[int], lens: list[int], indices: list[int], t: int) -> LoRAMeta:
    return LoRAMeta(
        token_indices=torch.tensor(indices, dtype=torch.int64),
        slots=tuple(slots), starts=tuple(starts), lens=tuple(lens), contiguous=False, num_tokens=t,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_length_segment(backend: str) -> None:
    case = Case("zero_len", (1, -1, 0, 1), (8, 16, 4), 72, 72)
    p = _pool(case, torch.float32)
    meta = _explicit_meta([1, 2, 0], [0, 2, 2], [2, 0, 1], [0, 3, 2], 4)  # slot 2: a segment of 0 tokens
    h = SHRINK[backend](p["x"], p["a"], p["ranks"], meta)
    torch.testing.assert_close(h.double(), _naive_shrink(p["x"], p["a"], [8, 16, 4], case.slots),
                               atol=1e-4, rtol=1e-4)
    y0 = torch.randn(4, 72)
    y = EXPAND[backend](h, p["b"], p["ranks"], p["scales"], meta, y0.clone())
    want = _naive_expand(h, p["b"], [8, 16, 4], p["scales"], case.slots, y0)
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_base_batch_leaves_y_exactly(backend: str, dtype: torch.dtype) -> None:
    case = Case("all_base", (-1,) * 5, (8, 16), 72, 72)
    p = _pool(case, dtype)
    meta = LoRAMeta.from_token_slots(list(case.slots))
    assert meta.num_segments == 0
    h = SHRINK[backend](p["x"], p["a"], p["ranks"], meta)
    assert torch.equal(h, torch.zeros_like(h))
    y = torch.randn(5, 72).to(dtype)
    before = y.clone()
    EXPAND[backend](h, p["b"], p["ranks"], p["scales"], meta, y)
    assert torch.equal(y, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_b_gives_base_exactly(backend: str, dtype: torch.dtype) -> None:
    case = CASES[2]
    p = _pool(case, dtype)
    meta = LoRAMeta.from_token_slots(list(case.slots))
    h = SHRINK[backend](p["x"], p["a"], p["ranks"], meta)
    assert h.abs().sum() > 0
    y = torch.randn(len(case.slots), case.n).to(dtype)
    before = y.clone()
    EXPAND[backend](h, torch.zeros_like(p["b"]), p["ranks"], p["scales"], meta, y)
    assert torch.equal(y, before)


def test_lora_apply_switch_on_cpu_uses_twin_and_matches_naive() -> None:
    case = CASES[2]
    p = _pool(case, torch.float32)
    meta = LoRAMeta.from_token_slots(list(case.slots))
    y0 = torch.randn(len(case.slots), case.n)
    y = lora_apply(p["x"], y0.clone(), p["a"], p["b"], p["ranks"], p["scales"], meta)
    h = _naive_shrink(p["x"], p["a"], list(case.ranks), case.slots)
    want = _naive_expand(h, p["b"], list(case.ranks), p["scales"], case.slots, y0)
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)


# ---- work list: no padding work -------------------------------------------------------------------------


def test_tile_table_is_compact_per_own_rank() -> None:
    slots = [0] * 40 + [-1] * 9 + [1] * 3 + [2]
    ranks = torch.tensor([64, 4, 16, 32], dtype=torch.int32)  # slot 3: in the pool, no tokens
    meta = LoRAMeta.from_token_slots(slots)
    tiles = meta.tile_table(ranks, 16, 16).tolist()
    # slot 0: ceil(40/16)=3 row blocks x 4 rank blocks; slot 1: 1 x 1; slot 2: 1 x 1; slot 3 and base: none.
    assert len(tiles) == 3 * 4 + 1 + 1
    assert sum(m * r for _, m, _, _, r in tiles) == 40 * 64 + 3 * 4 + 1 * 16  # exactly the useful work
    assert {row[2] for row in tiles} == {0, 1, 2}
    assert meta.tile_table(ranks, 16, 0).tolist() == [[0, 16, 0, 0, 64], [16, 16, 0, 0, 64],
                                                       [32, 8, 0, 0, 64], [40, 3, 1, 0, 4], [43, 1, 2, 0, 16]]
    assert meta.tile_table(ranks, 16, 16) is meta.tile_table(ranks, 16, 16)  # memoised per step


def test_config_tables_cover_shapes() -> None:
    for seg in (1, 16, 17, 64, 512):
        for r in (1, 16, 64):
            bm, br, bk, w = shrink_config(seg, r, 4096)
            assert bm >= 16 and br >= 16 and bk >= 16 and w in (4, 8)
        bm, bn, br, w = expand_config(seg, 4096)
        assert bm >= 16 and bn >= 16 and br >= 16 and w in (4, 8)


# ---- launcher errors -------------------------------------------------------------------------------------


def _good() -> dict[str, object]:
    p = _pool(CASES[0], torch.float32)
    meta = LoRAMeta.from_token_slots(list(CASES[0].slots))
    h = torch.zeros(len(CASES[0].slots), 64)
    y = torch.zeros(len(CASES[0].slots), CASES[0].n)
    return {**p, "meta": meta, "h": h, "y": y}


def _shrink(g: dict[str, object], **kw: object) -> None:
    g = {**g, **kw}
    lora_shrink_triton(g["x"], g["a"], g["ranks"], g["meta"], g.get("out"), split_k=g.get("split_k"),
                       pages=g.get("pages"))


def _expand(g: dict[str, object], **kw: object) -> None:
    g = {**g, **kw}
    lora_expand_triton(g["h"], g["b"], g["ranks"], g["scales"], g["meta"], g["y"])


ERRORS: list[tuple[str, Callable[[dict[str, object]], None], str]] = [
    ("x_int", lambda g: _shrink(g, x=g["x"].long()), "int64"),
    ("x_noncontig", lambda g: _shrink(g, x=torch.randn(72, 8).T), r"stride \(1, 8\)"),
    ("a_dtype", lambda g: _shrink(g, a=g["a"].half()), "float16"),
    ("a_hidden", lambda g: _shrink(g, a=g["a"][:, :, :64].contiguous()), "hidden size 64"),
    ("ranks_len", lambda g: _shrink(g, ranks=g["ranks"][:3]), r"shape \(3,\)"),
    ("rank_too_big", lambda g: _shrink(g, ranks=torch.tensor([1, 4, 8, 16, 99, 4, 8, 16])), "rank 99"),
    ("meta_tokens", lambda g: _shrink(g, x=g["x"][:5]), "num_tokens 8"),
    ("slot_range", lambda g: _shrink(g, a=g["a"][:4].contiguous(), ranks=g["ranks"][:4]), "slot 7"),
    ("out_shape", lambda g: _shrink(g, out=torch.zeros(8, 10)), r"\(8, 10\)"),
    ("split_k_with_out", lambda g: _shrink(g, out=torch.zeros(8, 64), split_k=2), "split_k 2"),
    ("y_dtype", lambda g: _expand(g, y=g["y"].half()), "float16"),
    ("y_col_stride", lambda g: _expand(g, y=torch.zeros(200, 8).T), r"stride \(1, 8\)"),
    ("y_width", lambda g: _expand(g, y=torch.zeros(8, 100)), "width 100"),
    ("h_rmax", lambda g: _expand(g, h=torch.zeros(8, 32)), r"\(8, 32\)"),
    ("pages_float", lambda g: _shrink(g, pages=torch.zeros(8, 1)), "pages must be an integer"),
    ("b_rank_mismatch", lambda g: _expand(g, b=g["b"].transpose(1, 2)), r"R_max=200"),
    ("scales_dtype", lambda g: _expand(g, scales=g["scales"].double()), "float64"),
]


@pytest.mark.parametrize("call, match", [(c, m) for _, c, m in ERRORS], ids=[n for n, _, _ in ERRORS])
def test_launcher_errors(call: Callable[[dict[str, object]], None], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(_good())


# ---- real Triton on CUDA ---------------------------------------------------------------------------------

GPU_CASES = CASES + [
    Case("decode_64_adapters_4096", _interleaved(256, 64, seed=2), tuple([8, 16, 32, 64] * 16), 4096, 4096),
    Case("prefill_1k", tuple(s for s in range(4) for _ in range(256)), (16, 64, 8, 32), 4096, 1024),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_gpu_triton_matches_fp32_twin(case: Case, dtype: torch.dtype) -> None:
    p = {k: v.cuda() for k, v in _pool(case, dtype).items()}
    meta = LoRAMeta.from_token_slots(list(case.slots), device="cuda")
    ref_meta = LoRAMeta.from_token_slots(list(case.slots), device="cuda")
    ranks_host = p["ranks"].cpu()
    h = lora_shrink_triton(p["x"], p["a"], ranks_host, meta)
    h_ref = lora_shrink_ref(p["x"].float(), p["a"].float(), ranks_host, ref_meta)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(h.float(), h_ref, atol=atol, rtol=rtol)
    wide = torch.randn(len(case.slots), case.n + 32, device="cuda")
    y_ref = lora_expand_ref(h_ref, p["b"].float(), ranks_host, p["scales"], ref_meta, wide[:, 32:].clone())
    y = lora_expand_triton(h, p["b"], p["ranks"], p["scales"], meta, wide.to(dtype)[:, 32:])
    torch.testing.assert_close(y.float(), y_ref, atol=4 * atol, rtol=4 * rtol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_switch_and_exact_cases(dtype: torch.dtype) -> None:
    case = CASES[2]
    p = {k: v.cuda() for k, v in _pool(case, dtype).items()}
    meta = LoRAMeta.from_token_slots(list(case.slots), device="cuda")
    y0 = torch.randn(len(case.slots), case.n, device="cuda").to(dtype)
    y = lora_apply(p["x"], y0.clone(), p["a"], p["b"], p["ranks"], p["scales"], meta)  # switch -> Triton
    h = lora_shrink_triton(p["x"], p["a"], p["ranks"], meta)
    want = lora_expand_triton(h, p["b"], p["ranks"], p["scales"], meta, y0.clone())
    assert torch.equal(y, want) and not torch.equal(y, y0)
    assert torch.equal(lora_expand_triton(h, torch.zeros_like(p["b"]), p["ranks"], p["scales"], meta, y0.clone()), y0)
    base = LoRAMeta.from_token_slots([-1] * len(case.slots), device="cuda")
    assert torch.equal(lora_apply(p["x"], y0.clone(), p["a"], p["b"], p["ranks"], p["scales"], base), y0)
    assert torch.equal(lora_expand_triton(h, p["b"], p["ranks"], p["scales"], base, y0.clone()), y0)
