"""Capture-ready LoRA launches: fixed-shape step metadata, ranks read on the device, no host decision.

The eager launchers (`triton_shrink.py`, `triton_expand.py`) build a compact tile list on the host from the
step's segments and each module's ranks, so their grids depend on the step's contents: a CUDA graph cannot
replay them. Here the step's LoRA metadata is two fixed-size tensors that live at fixed addresses
(`server/model/step_buffers.py` writes them every step, `server/model/cuda_graphs.py` captures over them):

- ``token_indices`` [T] int64: the rows of the step's adapter tokens, grouped by slot;
- ``tiles`` [n_tiles, 5] int32: row tiles (tok_off, m_len, slot, 0, 0) of ``block_m`` rows of one slot
  each; rows past the step's real tiles have m_len 0 (padding).

The grid is (n_tiles x ceil(R_max / BLOCK_R), split_k) for the shrink and (n_tiles, ceil(N / BLOCK_N)) for
the expand: it depends on shapes only. Each program reads its slot's rank from a *device* ranks tensor, so
one table serves every module whatever its per-slot ranks; a padding tile, a rank-0 slot or a rank block past
the slot's rank loops zero times and stores nothing. Semantics are the twins' (`kernels/reference.py`).
Block sizes, warps and split-K come from fixed tables; a `LaunchConfig` overrides any of them
(`bench/tune_lora.py` sweeps them on a GPU) and, left empty, launches exactly the tables' choices.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import triton

from kernels.metadata import LoRAMeta
from kernels.pages import resolve_pages
from kernels.triton_common import DTYPES
from kernels.triton_expand import _expand_kernel, expand_config
from kernels.triton_shrink import _shrink_kernel, _split_k

FIXED_BLOCK_M = 16  # decode rows per tile: a decode segment is one token per sequence of one adapter
FIXED_BLOCK_R = 16  # shrink rank block: a rank-8 slot next to a rank-64 one pays for 16 columns, not 64


@dataclass(eq=False)
class FixedLoRAMeta:
    """One step's LoRA metadata in fixed-shape device tensors (views of preallocated buffers)."""

    token_indices: torch.Tensor  # [>= T_lora] int64 row ids, grouped by slot (entries past T_lora unread)
    tiles: torch.Tensor  # [n_tiles, 5] int32 row tiles (tok_off, m_len, slot, 0, 0); m_len 0 = padding
    num_tokens: int  # T: rows of x / y
    block_m: int = FIXED_BLOCK_M


def fixed_tiles(meta: LoRAMeta, block_m: int = FIXED_BLOCK_M) -> list[tuple[int, int, int, int, int]]:
    """The real row tiles of a step's segments (host side, once per step): ceil(len / block_m) per segment."""
    rows = []
    for slot, start, n in zip(meta.slots, meta.starts, meta.lens, strict=True):
        for m0 in range(0, n, block_m):
            rows.append((start + m0, min(block_m, n - m0), slot, 0, 0))
    return rows


def max_fixed_tiles(num_tokens: int, num_slots: int, block_m: int = FIXED_BLOCK_M) -> int:
    """Upper bound on `fixed_tiles` for any step of num_tokens rows over num_slots slots (a tile holds >= 1
    row, and at most one tile per slot is partial)."""
    return max(1, min(num_tokens, -(-num_tokens // block_m) + num_slots))


def _check(x: torch.Tensor, ranks: torch.Tensor, meta: FixedLoRAMeta, pages: torch.Tensor, r_max: int) -> None:
    """Shape, dtype and device checks only: nothing here reads a tensor's values (capturable)."""
    if x.dtype not in DTYPES or x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D {'/'.join(map(str, DTYPES))} with unit column stride, got "
                         f"{tuple(x.shape)} {x.dtype} stride {x.stride()}")
    if meta.num_tokens != x.shape[0]:
        raise ValueError(f"meta.num_tokens {meta.num_tokens} != {x.shape[0]} rows")
    if meta.tiles.dim() != 2 or meta.tiles.shape[1] != 5 or meta.tiles.dtype != torch.int32:
        raise ValueError(f"tiles must be int32 [n, 5], got {tuple(meta.tiles.shape)} {meta.tiles.dtype}")
    if ranks.dim() != 1 or ranks.dtype != torch.int32 or ranks.shape[0] != pages.shape[0]:
        raise ValueError(f"ranks must be int32 [S={pages.shape[0]}] on the device, got {tuple(ranks.shape)} "
                         f"{ranks.dtype}")
    for name, t in (("ranks", ranks), ("pages", pages), ("tiles", meta.tiles), ("token_indices", meta.token_indices)):
        if t.device != x.device:
            raise ValueError(f"{name} on {t.device}, x on {x.device}: the fixed path reads it on the device")
    if r_max < 1:
        raise ValueError(f"R_max {r_max} must be >= 1")


def shrink_fixed_config(k: int) -> tuple[int, int]:
    """(BLOCK_K, num_warps) of the fixed shrink (BLOCK_M x BLOCK_R = 16 x 16 tiles)."""
    return (128 if k >= 1024 else 64), 4


def _pow2(v: int, lo: int, hi: int) -> bool:
    return lo <= v <= hi and v & (v - 1) == 0


@dataclass(frozen=True)
class LaunchConfig:
    """Overrides of the fixed-shape and fused LoRA launches' tuning knobs; a field left None keeps the table's
    choice (`shrink_fixed_config`, `_split_k`, `expand_config`; Triton's default stages), so `LaunchConfig()`
    launches exactly what no config does. Numerics do not depend on these (split-K changes only the fp32
    summation order of h)."""

    block_k: int | None = None  # shrink: K elements per loop step (power of two, 16..1024)
    shrink_warps: int | None = None  # shrink: num_warps (power of two, 1..16)
    shrink_stages: int | None = None  # shrink: num_stages (software pipelining of the K loop), >= 1
    split_k: int | None = None  # shrink: programs along K (>= 1; rounded down to whole BLOCK_K chunks)
    block_n: int | None = None  # expand: output columns per program (power of two, 16..1024)
    expand_warps: int | None = None  # expand: num_warps (power of two, 1..16)
    expand_stages: int | None = None  # expand: num_stages, >= 1

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"LaunchConfig.{f.name} must be an int or None, got {v!r}")
            if f.name in ("block_k", "block_n") and not _pow2(v, 16, 1024):
                raise ValueError(f"LaunchConfig.{f.name} must be a power of two in 16..1024, got {v}")
            if f.name.endswith("_warps") and not _pow2(v, 1, 16):
                raise ValueError(f"LaunchConfig.{f.name} must be a power of two in 1..16, got {v}")
            if (f.name.endswith("_stages") or f.name == "split_k") and v < 1:
                raise ValueError(f"LaunchConfig.{f.name} must be >= 1, got {v}")

    def label(self) -> str:
        """The overridden fields, e.g. 'block_k=256,split_k=2' ('default' when none is)."""
        set_ = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) is not None]
        return ",".join(set_) or "default"


DEFAULT_LAUNCH = LaunchConfig()


def _launch_kw(warps: int, stages: int | None) -> dict[str, int]:
    """Triton launch options: num_stages only when overridden (unset, Triton picks its default as before)."""
    return {"num_warps": warps} if stages is None else {"num_warps": warps, "num_stages": stages}


@dataclass(frozen=True)
class ShrinkLaunch:
    """A fixed or fused shrink launch's resolved knobs."""

    block_k: int
    split_k: int  # programs along K after rounding k_per_split up to whole BLOCK_K chunks
    k_per_split: int
    kw: dict[str, Any]  # num_warps (and num_stages)


def shrink_launch(k: int, programs: int, device: torch.device, config: LaunchConfig | None = None,
                  split_k: int | None = None) -> ShrinkLaunch:
    """The shrink's BLOCK_K, split-K and launch options for K columns and `programs` tiles x rank blocks:
    the tables' unless `config` (or the `split_k` argument) overrides them."""
    config = config or DEFAULT_LAUNCH
    if split_k is not None and config.split_k is not None and split_k != config.split_k:
        raise ValueError(f"split_k {split_k} and LaunchConfig.split_k {config.split_k} disagree: give one")
    if split_k is not None and split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    block_k, warps = shrink_fixed_config(k)
    block_k = config.block_k or block_k
    warps = config.shrink_warps or warps
    split_k = split_k or config.split_k or _split_k(programs, k, block_k, device)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return ShrinkLaunch(block_k, triton.cdiv(k, k_per_split), k_per_split, _launch_kw(warps, config.shrink_stages))


def expand_launch(block_m: int, n: int, config: LaunchConfig | None = None) -> tuple[int, int, dict[str, Any]]:
    """(BLOCK_N, BLOCK_R, launch options) of a fixed or fused expand of N output columns (the widest module's)."""
    config = config or DEFAULT_LAUNCH
    _, block_n, block_r, warps = expand_config(block_m, n)
    return (config.block_n or block_n, block_r,
            _launch_kw(config.expand_warps or warps, config.expand_stages))


def lora_shrink_fixed(
    x: torch.Tensor,  # [T, K]
    a: torch.Tensor,  # [P, PR, K] pool ([S, R_max, K] when pages is None)
    ranks: torch.Tensor,  # [S] int32 on x's device
    meta: FixedLoRAMeta,
    *,
    pages: torch.Tensor | None = None,  # [S, MP] int32 page table; None: identity
    split_k: int | None = None,  # None: from the shapes (fills the GPU at decode sizes)
    config: LaunchConfig | None = None,  # tuning overrides (None: the tables')
) -> torch.Tensor:
    """h [T, R_max] float32: h[t, :r_s] = x[t] @ A_s.T for each adapter row t of slot s; every other entry 0."""
    pages, page_rank, r_max = resolve_pages(a, pages)
    _check(x, ranks, meta, pages, r_max)
    if a.dim() != 3 or a.dtype != x.dtype or a.stride(2) != 1 or a.shape[2] != x.shape[1] or a.device != x.device:
        raise ValueError(f"a must be a [P, PR, K={x.shape[1]}] {x.dtype} pool on {x.device} with unit K stride, "
                         f"got {tuple(a.shape)} {a.dtype} on {a.device}")
    k = x.shape[1]
    n_rb = triton.cdiv(r_max, FIXED_BLOCK_R)
    programs = meta.tiles.shape[0] * n_rb
    sl = shrink_launch(k, programs, x.device, config, split_k)
    h = torch.zeros(x.shape[0], r_max, dtype=torch.float32, device=x.device)  # split-K partials meet here
    _shrink_kernel[(programs, sl.split_k)](
        x, a, h, meta.token_indices, meta.tiles, pages,
        k, x.stride(0), a.stride(0), a.stride(1), h.stride(0), pages.stride(0), page_rank, sl.k_per_split,
        ranks, n_rb,
        BLOCK_M=meta.block_m, BLOCK_R=FIXED_BLOCK_R, BLOCK_K=sl.block_k, ATOMIC=sl.split_k > 1,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", FIXED=True,
        **sl.kw,
    )
    return h


def lora_expand_fixed(
    h: torch.Tensor,  # [T, R_max] float32 (lora_shrink_fixed) or b.dtype
    b: torch.Tensor,  # [P, N, PR] pool ([S, N, R_max] when pages is None)
    ranks: torch.Tensor,  # [S] int32 on the device
    scales: torch.Tensor,  # [S] float32 on the device
    meta: FixedLoRAMeta,
    y: torch.Tensor,  # [T, N] b.dtype, updated in place (may be a column slice)
    *,
    pages: torch.Tensor | None = None,
    config: LaunchConfig | None = None,  # tuning overrides (None: the tables')
) -> torch.Tensor:
    """y[t] += scales[s] * h[t, :r_s] @ B_s.T for each adapter row t of slot s; other rows untouched."""
    pages, page_rank, r_max = resolve_pages(b.transpose(1, 2), pages)
    _check(y, ranks, meta, pages, r_max)
    if b.dim() != 3 or b.dtype != y.dtype or b.shape[1] != y.shape[1] or b.device != y.device:
        raise ValueError(f"b must be a [P, N={y.shape[1]}, PR] {y.dtype} pool on {y.device}, got "
                         f"{tuple(b.shape)} {b.dtype} on {b.device}")
    if tuple(h.shape) != (y.shape[0], r_max) or h.stride(1) != 1 or h.dtype not in (torch.float32, y.dtype):
        raise ValueError(f"h must be [{y.shape[0]}, {r_max}] float32 or {y.dtype} with unit column stride, got "
                         f"{tuple(h.shape)} {h.dtype}")
    if scales.shape != (pages.shape[0],) or scales.dtype != torch.float32 or scales.device != y.device:
        raise ValueError(f"scales must be float32 [S={pages.shape[0]}] on {y.device}, got {tuple(scales.shape)} "
                         f"{scales.dtype} on {scales.device}")
    n = b.shape[1]
    block_n, block_r, kw = expand_launch(meta.block_m, n, config)
    _expand_kernel[(meta.tiles.shape[0], triton.cdiv(n, block_n))](
        h, b, y, meta.token_indices, meta.tiles, scales, pages,
        n, h.stride(0), b.stride(0), b.stride(1), b.stride(2), y.stride(0), pages.stride(0), page_rank, ranks,
        BLOCK_M=meta.block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        PRECISION="ieee" if b.dtype == torch.float32 else "tf32", FIXED=True,
        **kw,
    )
    return y


def lora_apply_fixed(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor,
    scales: torch.Tensor, meta: FixedLoRAMeta, *, pages: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """`kernels.lora_apply` over fixed-shape metadata: two launches whose grids depend on shapes only
    (`config`: tuning overrides of both; None launches the tables' choices)."""
    h = lora_shrink_fixed(x, a, ranks, meta, pages=pages, config=config)
    return lora_expand_fixed(h, b, ranks, scales, meta, y, pages=pages, config=config)
