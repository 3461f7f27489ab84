"""Grid tests of the bottleneck-adapter kernels: Triton (interpreter on CPU, real on CUDA) and the torch
twin, each against a naive per-token loop in float64."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from kernels.bottleneck import (
    ACTIVATIONS,
    _down_kernel,
    bottleneck_apply,
    bottleneck_down_triton,
    bottleneck_up_triton,
    down_config,
    up_config,
)
from kernels.bottleneck_ref import bottleneck_apply_ref, bottleneck_down_ref, bottleneck_up_ref
from kernels.metadata import LoRAMeta

INTERPRETED = type(_down_kernel).__name__ == "InterpretedFunction"
if not INTERPRETED and not torch.cuda.is_available():
    raise RuntimeError("kernels was imported before TRITON_INTERPRET=1 was set; run `make test` or set it")
needs_interp = pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

# (atol, rtol) against the float64 oracle, per input dtype.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 3e-2)}

DOWN = {"triton": bottleneck_down_triton, "twin": bottleneck_down_ref}
UP = {"triton": bottleneck_up_triton, "twin": bottleneck_up_ref}
BACKENDS = [pytest.param("triton", marks=needs_interp), "twin"]
DTYPES = [torch.float32, torch.float16]

_NAIVE_ACT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    0: lambda v: v,
    1: lambda v: v.clamp_min(0),
    2: lambda v: v / (1 + torch.exp(-v)),
    3: lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2))),
    4: lambda v: 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))),
    5: torch.tanh,
    6: lambda v: 1 / (1 + torch.exp(-v)),
    7: lambda v: torch.where(v >= 0, v, 0.01 * v),
}


@dataclass(frozen=True)
class Case:
    name: str
    slots: tuple[int, ...]  # per token, -1 = base
    widths: tuple[int, ...]  # per pool slot (0 = empty slot)
    acts: tuple[int, ...]  # per pool slot, activation code
    d: int  # hidden size


def _interleaved(t: int, s: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(-1, s) for _ in range(t))


CASES = [
    Case("decode_8_slots_mixed_widths", tuple(range(8)), (1, 4, 8, 16, 48, 4, 8, 16), tuple(range(8)), 96),
    Case("prefill_contiguous", (0,) * 20 + (-1,) * 4 + (1,) * 33 + (2,) * 7, (16, 48, 6), (1, 2, 3), 96),
    Case("interleaved_with_base", _interleaved(37, 5, seed=1), (8, 1, 48, 4, 16), (2, 1, 4, 7, 5), 80),
    Case("single_token", (0,), (12,), (6,), 64),
    Case("empty_slots_in_pool", (2, 0, 2, -1, 0, 2), (16, 48, 8, 1), (1, 1, 2, 2), 80),
    Case("width_zero_slot", (0, 1, 1, 0, -1), (0, 8), (1, 2), 64),
]


def _pool(case: Case, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s, m_max = len(case.widths), max(case.widths) or 1
    wd = torch.randn(s, m_max, case.d, generator=g) / math.sqrt(case.d) * 2
    bd = torch.randn(s, m_max, generator=g) * 0.5
    wu = torch.randn(s, case.d, m_max, generator=g) / math.sqrt(m_max)
    bu = torch.randn(s, case.d, generator=g) * 0.5
    for i, m in enumerate(case.widths):  # rows/cols past a slot's width hold garbage: kernels must ignore it
        wd[i, m:] = 1e4
        bd[i, m:] = 1e4
        wu[i, :, m:] = 1e4
    return {
        "x": torch.randn(len(case.slots), case.d, generator=g).to(dtype),
        "wd": wd.to(dtype), "bd": bd.to(dtype), "wu": wu.to(dtype), "bu": bu.to(dtype),
        "widths": torch.tensor(case.widths, dtype=torch.int32),
        "acts": torch.tensor(case.acts, dtype=torch.int32),
        "scales": torch.rand(s, generator=g) + 0.5,
    }


def _naive_down(p: dict[str, torch.Tensor], case: Case) -> torch.Tensor:
    out = torch.zeros(len(case.slots), p["wd"].shape[1], dtype=torch.float64)
    for t, s in enumerate(case.slots):
        if s >= 0:
            m = case.widths[s]
            v = p["x"][t].double() @ p["wd"][s, :m].double().T + p["bd"][s, :m].double()
            out[t, :m] = _NAIVE_ACT[case.acts[s]](v)
    return out


def _naive_up(h: torch.Tensor, p: dict[str, torch.Tensor], case: Case, y: torch.Tensor) -> torch.Tensor:
    y = y.double().clone()
    for t, s in enumerate(case.slots):
        if s >= 0 and case.widths[s] > 0:
            m = case.widths[s]
            y[t] += float(p["scales"][s]) * (h[t, :m].double() @ p["wu"][s, :, :m].double().T
                                             + p["bu"][s].double())
    return y


def test_activation_table_is_complete() -> None:
    assert sorted(ACTIVATIONS.values()) == sorted(_NAIVE_ACT)
    v = torch.linspace(-4, 4, 33, dtype=torch.float64)
    from kernels.bottleneck_ref import activate
    for code, fn in _NAIVE_ACT.items():
        torch.testing.assert_close(activate(v, code), fn(v), atol=1e-12, rtol=1e-12)
    assert torch.equal(activate(v, ACTIVATIONS["silu"]), F.silu(v))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_down_matches_naive(backend: str, case: Case, dtype: torch.dtype) -> None:
    p = _pool(case, dtype)
    meta = LoRAMeta.from_token_slots(list(case.slots))
    out = DOWN[backend](p["x"], p["wd"], p["bd"], p["widths"], p["acts"], meta)
    assert out.dtype == dtype and out.shape == (len(case.slots), p["wd"].shape[1])
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), _naive_down(p, case), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_up_into_column_slice_matches_naive(backend: str, case: Case, dtype: torch.dtype) -> None:
    p = _pool(case, dtype)
    meta = LoRAMeta.from_token_slots(list(case.slots))
    t = len(case.slots)
    h = torch.randn(t, p["wd"].shape[1], generator=torch.Generator().manual_seed(3)).to(dtype)
    wide = torch.randn(t, 8 + case.d + 4, generator=torch.Generator().manual_seed(4)).to(dtype)
    before = wide.clone()
    y = wide[:, 8:8 + case.d]
    got = UP[backend](h, p["wu"], p["bu"], p["widths"], p["scales"], meta, y)
    assert got.data_ptr() == y.data_ptr()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(wide[:, 8:8 + case.d].double(), _naive_up(h, p, case, before[:, 8:8 + case.d]),
                               atol=atol, rtol=rtol)
    assert torch.equal(wide[:, :8], before[:, :8]) and torch.equal(wide[:, 8 + case.d:], before[:, 8 + case.d:])
    untouched = [i for i, s in enumerate(case.slots) if s < 0 or case.widths[s] == 0]
    assert torch.equal(wide[untouched], before[untouched])  # base rows bit-identical
    if len(untouched) < t:  # the adapter really moves the output
        assert not torch.allclose(wide.double(), before.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("tokens", [1, 17, 40])
@pytest.mark.parametrize("num_slots", [1, 3, 6])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_grid_down_up(backend: str, dtype: torch.dtype, num_slots: int, tokens: int) -> None:
    """Random mixed batches: widths from {1, 4, 16, 24, 64}, any activation, base rows, unused slots."""
    rng = random.Random(num_slots * 1000 + tokens)
    widths = tuple(rng.choice([1, 4, 16, 24, 64]) for _ in range(num_slots))
    acts = tuple(rng.randrange(len(ACTIVATIONS)) for _ in range(num_slots))
    case = Case("random", tuple(rng.randrange(-1, num_slots) for _ in range(tokens)), widths, acts, 72)
    p = _pool(case, dtype, seed=tokens)
    meta = LoRAMeta.from_token_slots(list(case.slots))
    h = DOWN[backend](p["x"], p["wd"], p["bd"], p["widths"], p["acts"], meta)
    y0 = torch.randn(tokens, case.d).to(dtype)
    y = UP[backend](h, p["wu"], p["bu"], p["widths"], p["scales"], meta, y0.clone())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(h.double(), _naive_down(p, case), atol=atol, rtol=rtol)
    torch.testing.assert_close(y.double(), _naive_up(h, p, case, y0), atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: c.name)
def test_apply_twin_in_place_on_x_matches_naive(case: Case) -> None:
    """The fused twin (CPU path) may write into its own input: every down runs before any row changes."""
    p = _pool(case, torch.float32)
    meta = LoRAMeta.from_token_slots(list(case.slots))
    want = _naive_up(_naive_down(p, case), p, case, p["x"])
    x = p["x"].clone()
    bottleneck_apply(x, x, p["wd"], p["bd"], p["wu"], p["bu"], p["widths"], p["acts"], p["scales"], meta)
    torch.testing.assert_close(x.double(), want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(x, p["x"])


@needs_interp
def test_half_inputs_with_fp32_intermediate() -> None:
    case = CASES[2]
    p = _pool(case, torch.float16)
    meta = LoRAMeta.from_token_slots(list(case.slots))
    h = bottleneck_down_triton(p["x"], p["wd"], p["bd"], p["widths"], p["acts"], meta,
                               torch.zeros(len(case.slots), 48))
    torch.testing.assert_close(h.double(), _naive_down(p, case), atol=1e-4, rtol=1e-4)  # fp32 h: no rounding
    y0 = torch.randn(len(case.slots), case.d).half()
    y = bottleneck_up_triton(h, p["wu"], p["bu"], p["widths"], p["scales"], meta, y0.clone())
    torch.testing.assert_close(y.double(), _naive_up(h, p, case, y0), atol=1e-2, rtol=5e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_base_batch_leaves_y_exactly(backend: str, dtype: torch.dtype) -> None:
    case = Case("all_base", (-1,) * 5, (8, 16), (1, 2), 64)
    p = _pool(case, dtype)
    meta = LoRAMeta.from_token_slots(list(case.slots))
    h = DOWN[backend](p["x"], p["wd"], p["bd"], p["widths"], p["acts"], meta)
    assert torch.equal(h, torch.zeros_like(h))
    y = torch.randn(5, 64).to(dtype)
    before = y.clone()
    UP[backend](h, p["wu"], p["bu"], p["widths"], p["scales"], meta, y)
    assert torch.equal(y, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_up_adds_only_the_bias(backend: str) -> None:
    case = CASES[2]
    p = _pool(case, torch.float32)
    meta = LoRAMeta.from_token_slots(list(case.slots))
    h = DOWN[backend](p["x"], p["wd"], p["bd"], p["widths"], p["acts"], meta)
    y = torch.randn(len(case.slots), case.d)
    before = y.clone()
    UP[backend](h, torch.zeros_like(p["wu"]), torch.zeros_like(p["bu"]), p["widths"], p["scales"], meta, y)
    assert torch.equal(y, before)
    UP[backend](h, torch.zeros_like(p["wu"]), p["bu"], p["widths"], p["scales"], meta, y)
    for t, s in enumerate(case.slots):
        want = before[t] + (float(p["scales"][s]) * p["bu"][s] if s >= 0 else 0)
        torch.testing.assert_close(y[t], want, atol=1e-6, rtol=1e-6)


def test_tile_work_is_own_width_only() -> None:
    """The down kernel's work list covers exactly sum(len_s * m_s): no padding to the widest slot."""
    slots = [0] * 40 + [-1] * 9 + [1] * 3 + [2]
    widths = torch.tensor([64, 4, 16, 32], dtype=torch.int32)
    meta = LoRAMeta.from_token_slots(slots)
    bm, bw, _, _ = down_config(meta.max_seg_len, 64, 96)
    tiles = meta.tile_table(widths, bm, bw).tolist()
    assert sum(m * w for _, m, _, _, w in tiles) == 40 * 64 + 3 * 4 + 1 * 16
    assert {row[2] for row in tiles} == {0, 1, 2}


def test_config_tables_cover_shapes() -> None:
    for seg in (1, 16, 17, 64, 512):
        for w in (1, 16, 64, 256):
            bm, bw, bk, nw = down_config(seg, w, 4096)
            assert bm >= 16 and bw >= 16 and bk >= 16 and nw in (4, 8)
        bm, bn, bw, nw = up_config(seg, 4096)
        assert bm >= 16 and bn >= 16 and bw >= 16 and nw in (4, 8)


# ---- launcher errors -------------------------------------------------------------------------------------


def _good() -> dict[str, object]:
    p = _pool(CASES[0], torch.float32)
    meta = LoRAMeta.from_token_slots(list(CASES[0].slots))
    return {**p, "meta": meta, "h": torch.zeros(8, 48), "y": torch.zeros(8, 96)}


def _down(g: dict[str, object], **kw: object) -> None:
    g = {**g, **kw}
    bottleneck_down_triton(g["x"], g["wd"], g["bd"], g["widths"], g["acts"], g["meta"], g.get("out"))


def _up(g: dict[str, object], **kw: object) -> None:
    g = {**g, **kw}
    bottleneck_up_triton(g["h"], g["wu"], g["bu"], g["widths"], g["scales"], g["meta"], g["y"])


ERRORS: list[tuple[str, Callable[[dict[str, object]], None], str]] = [
    ("x_dtype", lambda g: _down(g, x=g["x"].half()), "float16"),
    ("x_noncontig", lambda g: _down(g, x=torch.randn(96, 8).T), r"stride \(1, 8\)"),
    ("wd_int", lambda g: _down(g, wd=g["wd"].long()), "int64"),
    ("wd_hidden", lambda g: _down(g, wd=g["wd"][:, :, :64].contiguous()), "hidden size 64"),
    ("bd_shape", lambda g: _down(g, bd=g["bd"][:, :10]), r"bias must be \[8, 48\]"),
    ("widths_len", lambda g: _down(g, widths=g["widths"][:3]), r"shape \(3,\)"),
    ("width_too_big", lambda g: _down(g, widths=torch.tensor([1, 4, 8, 16, 99, 4, 8, 16])), "width 99"),
    ("acts_dtype", lambda g: _down(g, acts=g["acts"].long()), "int64"),
    ("meta_tokens", lambda g: _down(g, x=g["x"][:5]), "num_tokens 8"),
    ("slot_range", lambda g: _down(g, wd=g["wd"][:4].contiguous(), bd=g["bd"][:4], widths=g["widths"][:4],
                                   acts=g["acts"][:4]), "slot 7"),
    ("out_shape", lambda g: _down(g, out=torch.zeros(8, 10)), r"\(8, 10\)"),
    ("y_dtype", lambda g: _up(g, y=g["y"].half()), "float16"),
    ("y_width", lambda g: _up(g, y=torch.zeros(8, 100)), "width 100"),
    ("h_mmax", lambda g: _up(g, h=torch.zeros(8, 32)), r"\(8, 32\)"),
    ("wu_noncontig", lambda g: _up(g, wu=g["wu"].transpose(1, 2)), "contiguous=False"),
    ("scales_dtype", lambda g: _up(g, scales=g["scales"].double()), "float64"),
]


@pytest.mark.parametrize("call, match", [(c, m) for _, c, m in ERRORS], ids=[n for n, _, _ in ERRORS])
def test_launcher_errors(call: Callable[[dict[str, object]], None], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(_good())


# ---- real Triton on CUDA ---------------------------------------------------------------------------------

GPU_CASES = CASES + [
    Case("decode_64_adapters_4096", _interleaved(256, 64, seed=2), tuple([16, 64, 128, 256] * 16),
         tuple([1, 2] * 32), 4096),
    Case("prefill_1k", tuple(s for s in range(4) for _ in range(256)), (256, 64, 16, 128), (1, 2, 3, 4), 4096),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_gpu_triton_matches_fp32_twin(case: Case, dtype: torch.dtype) -> None:
    p = {k: v.cuda() for k, v in _pool(case, dtype).items()}
    meta = LoRAMeta.from_token_slots(list(case.slots), device="cuda")
    widths = p["widths"].cpu()
    y0 = torch.randn(len(case.slots), case.d, device="cuda")
    y = bottleneck_apply(p["x"], y0.to(dtype), p["wd"], p["bd"], p["wu"], p["bu"], widths, p["acts"],
                         p["scales"], meta)
    want = bottleneck_apply_ref(p["x"].float(), y0.clone(), p["wd"].float(), p["bd"].float(), p["wu"].float(),
                                p["bu"].float(), widths, p["acts"].cpu(), p["scales"], meta)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.float(), want, atol=4 * atol, rtol=4 * rtol)
