"""Tuning overrides of the fixed-shape and fused LoRA launches (`kernels.capturable.LaunchConfig`), under the
interpreter: an override changes block sizes, warps, stages and split-K but not the answer (held to the default
launch and to a float64 loop); no config launches exactly the tables' grids, constexprs and options; a bad
override is refused naming its field."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import kernels.capturable as cap
import kernels.fused_lora as fl
from kernels.capturable import LaunchConfig, lora_apply_fixed, lora_shrink_fixed, max_fixed_tiles
from kernels.fused_lora import lora_apply_fused
from tests.kernels.test_capturable_lora import DECODE, LONG, _fixed
from tests.kernels.test_fused_lora import MODULES, _module, _want
from tests.kernels.test_paged_lora import NUM_PAGES, PAGES, RANKS, _inputs, _naive, _paged, needs_interp

# K = 40 columns: BLOCK_K 16 with split_k 3 gives 3 programs along K, the last one masked; N = 24 with
# BLOCK_N 16 gives a partial column block
OVERRIDE = LaunchConfig(block_k=16, shrink_warps=2, shrink_stages=2, split_k=3, block_n=16, expand_warps=2,
                        expand_stages=1)


class _Recorder:
    """Stands in for a @triton.jit kernel: records each launch's grid and its constexpr / option keywords,
    then launches the real kernel."""

    def __init__(self, fn: Any, log: list) -> None:
        self.fn, self.log = fn, log

    def __getitem__(self, grid: tuple) -> Any:
        launch = self.fn[grid]

        def call(*args: Any, **kw: Any) -> Any:
            self.log.append((self.fn.__name__, tuple(grid), dict(kw)))
            return launch(*args, **kw)

        return call


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list:
    log: list = []
    for mod, name in ((cap, "_shrink_kernel"), (cap, "_expand_kernel"), (fl, "_fused_shrink_kernel"),
                      (fl, "_fused_expand_kernel")):
        monkeypatch.setattr(mod, name, _Recorder(getattr(mod, name), log))
    return log


def _fused_case(slots: list[int]) -> tuple:
    mods = [_module(n, r, p, torch.float32, seed=i) for i, (n, r, p) in enumerate(MODULES.values())]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(slots), 40, generator=g)
    y0 = torch.randn(len(slots), 56, generator=g)
    return mods, x, y0, _fixed(slots, max_fixed_tiles(len(slots), 5))


def _run_fused(mods: list, x: torch.Tensor, y0: torch.Tensor, meta: Any, config: LaunchConfig | None
               ) -> torch.Tensor:
    fused = y0.clone()
    ys = [fused[:, 0:24], fused[:, 24:40], fused[:, 40:56]]
    lora_apply_fused(x, ys, [(m["a"], m["b"], m["ranks"], m["scales"], m["pages"]) for m in mods], meta,
                     config=config)
    return fused


@needs_interp
@pytest.mark.parametrize("slots", [DECODE, LONG], ids=["decode", "long"])
def test_fixed_override_matches_default(slots: list[int], launches: list) -> None:
    p = _paged(RANKS, PAGES, NUM_PAGES, torch.float32)
    x, y0 = _inputs(slots, torch.float32)
    meta = _fixed(slots, max_fixed_tiles(len(slots), len(RANKS)))
    args = (p["a"], p["b"], p["ranks"], p["scales"], meta)
    y_def = lora_apply_fixed(x, y0.clone(), *args, pages=p["pages"])
    y_cfg = lora_apply_fixed(x, y0.clone(), *args, pages=p["pages"], config=OVERRIDE)
    assert not torch.allclose(y_def, y0, atol=1e-3)  # the adapters move the output
    torch.testing.assert_close(y_cfg, y_def, atol=1e-5, rtol=1e-5)  # split-K reorders fp32 sums only
    torch.testing.assert_close(y_cfg.double(), _naive(x, y0, p, slots), atol=1e-4, rtol=1e-4)
    (_, g_s, kw_s), (_, g_e, kw_e) = launches[2:]  # the override's shrink and expand
    assert g_s[1] == 3 and kw_s["BLOCK_K"] == 16 and kw_s["ATOMIC"] and kw_s["num_warps"] == 2
    assert kw_s["num_stages"] == 2
    assert g_e[1] == 2 and kw_e["BLOCK_N"] == 16 and kw_e["num_warps"] == 2 and kw_e["num_stages"] == 1


@needs_interp
@pytest.mark.parametrize("slots", [DECODE, LONG], ids=["decode", "long"])
def test_fused_override_matches_default(slots: list[int], launches: list) -> None:
    mods, x, y0, meta = _fused_case(slots)
    want = _run_fused(mods, x, y0, meta, None)
    got = _run_fused(mods, x, y0, meta, OVERRIDE)
    assert not torch.allclose(want, y0, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for i, (lo, hi) in enumerate(((0, 24), (24, 40), (40, 56))):
        torch.testing.assert_close(got[:, lo:hi].double(), _want(x, y0[:, lo:hi], mods[i], slots), atol=1e-4,
                                   rtol=1e-4)
    (_, g_s, kw_s), (_, g_e, kw_e) = launches[2:]
    assert g_s[1] == 3 and kw_s["BLOCK_K"] == 16 and kw_s["num_warps"] == 2 and kw_s["num_stages"] == 2
    assert g_e[1] == 2 + 1 + 1 and kw_e["BLOCK_N"] == 16  # q: 24 -> 2 blocks, k and v: 16 -> 1 each


@needs_interp
def test_no_config_launches_the_tables(launches: list) -> None:
    """None and LaunchConfig() launch exactly today's grids, constexprs and options (no num_stages passed)."""
    mods, x, y0, meta = _fused_case(DECODE)
    a = _run_fused(mods, x, y0, meta, None)
    b = _run_fused(mods, x, y0, meta, LaunchConfig())
    assert torch.equal(a, b)
    assert launches[:2] == launches[2:4]
    (n_s, g_s, kw_s), (n_e, g_e, kw_e) = launches[:2]
    n_tiles = meta.tiles.shape[0]
    assert (n_s, g_s) == ("_fused_shrink_kernel", (3 * n_tiles, 1))  # CPU: _split_k is 1
    assert kw_s == dict(NUM_MODULES=3, BLOCK_M=16, BLOCK_R=16, BLOCK_K=64, ATOMIC=False, PRECISION="ieee",
                        num_warps=4)
    assert (n_e, g_e) == ("_fused_expand_kernel", (n_tiles, 3))
    assert kw_e == dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=16, PRECISION="ieee", num_warps=4)
    p = _paged(RANKS, PAGES, NUM_PAGES, torch.float32)
    xf, yf = _inputs(DECODE, torch.float32)
    lora_apply_fixed(xf, yf, p["a"], p["b"], p["ranks"], p["scales"], meta, pages=p["pages"])
    (n_s, g_s, kw_s), (n_e, g_e, kw_e) = launches[4:]
    assert (n_s, g_s) == ("_shrink_kernel", (n_tiles, 1))
    assert kw_s == dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=64, ATOMIC=False, PRECISION="ieee", FIXED=True, num_warps=4)
    assert (n_e, g_e) == ("_expand_kernel", (n_tiles, 1))
    assert kw_e == dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=16, PRECISION="ieee", FIXED=True, num_warps=4)


@pytest.mark.parametrize(("field", "value"), [
    ("block_k", 48), ("block_k", 8), ("block_n", 2048), ("shrink_warps", 3), ("expand_warps", 32),
    ("split_k", 0), ("shrink_stages", 0), ("expand_stages", -1), ("block_n", 64.0), ("split_k", True),
])
def test_bad_override_names_its_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"LaunchConfig.{field} must be"):
        LaunchConfig(**{field: value})


def test_split_k_argument_and_config_must_agree() -> None:
    p = _paged(RANKS, PAGES, NUM_PAGES, torch.float32)
    x, _ = _inputs(DECODE, torch.float32)
    meta = _fixed(DECODE, max_fixed_tiles(len(DECODE), len(RANKS)))
    with pytest.raises(ValueError, match="split_k 2 and LaunchConfig.split_k 3 disagree"):
        lora_shrink_fixed(x, p["a"], p["ranks"], meta, pages=p["pages"], split_k=2, config=OVERRIDE)
    assert LaunchConfig(block_k=256, split_k=2).label() == "block_k=256,split_k=2"
    assert LaunchConfig().label() == "default"
