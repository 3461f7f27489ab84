"""Micro-benchmark of lora_shrink / lora_expand at decode shapes against a gather-and-bmm baseline.

Run from the repository root: `python -m bench.bench_kernels [--quick] [--out results.json]`.
On CUDA `ours` is the Triton kernels; elsewhere it is the torch twin (the backend switch decides).

Ideal bytes of one LoRA application (what a perfect kernel must move):
  x [T, K] read + each distinct adapter's own-rank A [r_d, K] and B [N, r_d] read + y [T, N] read and written.
The baseline gathers every token's max-rank-padded A and B (torch index) and runs two torch.bmm.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from kernels import LoRAMeta, lora_expand, lora_shrink

HBM_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # peak HBM bandwidth, GB/s


def hbm_peak_gbps(device_name: str) -> float | None:
    """The datasheet HBM bandwidth of a CUDA device by its name (None: not in HBM_GBPS, or not a GPU)."""
    return next((v for key, v in HBM_GBPS.items() if key in device_name), None)
RANK_MODES = {"r8": [8], "r16": [16], "r64": [64], "mixed": [8, 16, 32, 64]}


@dataclass
class Result:
    tokens: int
    adapters: int
    ranks: str
    hidden: int
    dtype: str
    ours_shrink_us: float
    ours_expand_us: float
    ours_apply_us: float
    baseline_us: float
    meta_us: float  # host: building LoRAMeta + tile tables, once per step (shared by all layers)
    ideal_mb: float
    ours_gbps: float
    baseline_gbps: float
    roofline_us: float | None  # ideal bytes at peak HBM bandwidth (CUDA only)


def _timer(device: torch.device, iters: int, warmup: int, repeats: int = 5
           ) -> Callable[[Callable[[], object]], float]:
    """Mean time per call of the fastest of `repeats` rounds (shared machines are noisy)."""

    def one_round(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) * 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e6 / iters

    def run(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        return min(one_round(fn) for _ in range(repeats))

    return run


def baseline_apply(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
                   rows: torch.Tensor, tok_slots: torch.Tensor) -> torch.Tensor:
    """Per-token gather of the padded A/B by slot, then bmm (what a server without SGMV kernels does)."""
    h = torch.bmm(x[rows].unsqueeze(1), a[tok_slots].transpose(1, 2))  # [T_l, 1, R_max]
    d = torch.bmm(h, b[tok_slots].transpose(1, 2)).squeeze(1) * scales[tok_slots, None]  # [T_l, N]
    return y.index_add_(0, rows, d.to(y.dtype))


def bench_one(tokens: int, adapters: int, rank_mode: str, hidden: int, slots: int, r_max: int,
              dtype: torch.dtype, device: torch.device, timer: Callable[[Callable[[], object]], float],
              peak_gbps: float | None) -> Result:
    g = torch.Generator().manual_seed(tokens * 1000 + adapters)
    cycle = RANK_MODES[rank_mode]
    ranks = torch.tensor([cycle[i % len(cycle)] for i in range(slots)], dtype=torch.int32)
    k = n = hidden
    a = (torch.randn(slots, r_max, k, generator=g) / k**0.5).to(dtype).to(device)
    b = (torch.randn(slots, n, r_max, generator=g) / r_max**0.5).to(dtype).to(device)
    scales = torch.full((slots,), 2.0, device=device)
    x = torch.randn(tokens, k, generator=g).to(dtype).to(device)
    y = torch.zeros(tokens, n, dtype=dtype, device=device)
    used = torch.randperm(slots, generator=g)[:adapters].tolist()
    token_slots = [used[i % adapters] for i in range(tokens)]  # every adapter used, tokens interleaved

    def build_meta() -> LoRAMeta:
        return LoRAMeta.from_token_slots(token_slots, device=device)

    meta = build_meta()
    host_ranks = ranks  # host copy: launchers read ranks on the host, a device tensor would add a sync
    ranks = ranks.to(device)
    rows = meta.token_indices
    tok_slots = torch.tensor([token_slots[i] for i in rows.tolist()], dtype=torch.int64, device=device)

    def step_meta() -> None:
        m = build_meta()
        lora_shrink(x, a, host_ranks, m)
        lora_expand(torch.zeros(tokens, r_max, dtype=dtype, device=device), b, host_ranks, scales, m, y)

    h = lora_shrink(x, a, host_ranks, meta)
    shrink_us = timer(lambda: lora_shrink(x, a, host_ranks, meta))
    expand_us = timer(lambda: lora_expand(h, b, host_ranks, scales, meta, y))
    apply_us = timer(lambda: lora_expand(lora_shrink(x, a, host_ranks, meta), b, host_ranks, scales, meta, y))
    base_us = timer(lambda: baseline_apply(x, y, a, b, scales, rows, tok_slots))
    meta_us = max(0.0, timer(step_meta) - apply_us)

    bpe = x.element_size()
    own = sum(int(host_ranks[s]) for s in used)
    ideal = bpe * (tokens * k + own * (k + n) + 2 * tokens * n)
    return Result(
        tokens=tokens, adapters=adapters, ranks=rank_mode, hidden=hidden, dtype=str(dtype).removeprefix("torch."),
        ours_shrink_us=shrink_us, ours_expand_us=expand_us, ours_apply_us=apply_us, baseline_us=base_us,
        meta_us=meta_us, ideal_mb=ideal / 1e6, ours_gbps=ideal / apply_us / 1e3, baseline_gbps=ideal / base_us / 1e3,
        roofline_us=ideal / peak_gbps / 1e3 if peak_gbps else None,
    )


def _peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)", None
    name = torch.cuda.get_device_name(device)
    return name, hbm_peak_gbps(name)


def main(argv: list[str] | None = None) -> list[Result]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tokens", type=int, nargs="+", default=None)
    p.add_argument("--adapters", type=int, nargs="+", default=None)
    p.add_argument("--ranks", nargs="+", default=None, choices=sorted(RANK_MODES))
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", "--json", dest="out", metavar="PATH", default=None,
                   help="write results as JSON to this file")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.quick:
        tokens, adapters, modes, hidden, iters = [1, 8, 32], [1, 4], ["r8", "mixed"], 256, 10
    else:
        tokens, adapters, modes, hidden, iters = [1, 16, 64, 256], [1, 8, 64], ["r16", "r64", "mixed"], 4096, 50
    tokens, adapters = args.tokens or tokens, args.adapters or adapters
    modes, hidden, iters = args.ranks or modes, args.hidden or hidden, args.iters or iters
    slots, r_max = max(64, max(adapters)), 64
    name, peak = _peak(device)
    backend = "triton" if device.type == "cuda" else "torch twin"
    print(f"device: {name}; ours = {backend}; dtype {str(dtype).removeprefix('torch.')}; hidden {hidden}; "
          f"pool {slots} slots x max rank {r_max}" + (f"; HBM peak {peak:.0f} GB/s" if peak else ""))
    timer = _timer(device, iters, warmup=max(3, iters // 5))

    head = (f"{'T':>4} {'D':>3} {'ranks':>6} | {'shrink':>8} {'expand':>8} {'apply':>8} {'baseline':>9} "
            f"{'speedup':>7} | {'ideal MB':>8} {'GB/s':>7} {'base GB/s':>9} {'roof us':>7} {'%roof':>6} "
            f"| {'meta us':>7}")
    print(head + "\n" + "-" * len(head))
    results = []
    for t in tokens:
        for d in adapters:
            if d > t:
                continue
            for mode in modes:
                r = bench_one(t, d, mode, hidden, slots, r_max, dtype, device, timer, peak)
                results.append(r)
                roof = f"{r.roofline_us:7.2f} {100 * r.roofline_us / r.ours_apply_us:5.1f}%" if peak else " " * 14
                print(f"{t:>4} {d:>3} {mode:>6} | {r.ours_shrink_us:8.1f} {r.ours_expand_us:8.1f} "
                      f"{r.ours_apply_us:8.1f} {r.baseline_us:9.1f} {r.baseline_us / r.ours_apply_us:6.2f}x | "
                      f"{r.ideal_mb:8.3f} {r.ours_gbps:7.1f} {r.baseline_gbps:9.1f} {roof} | {r.meta_us:7.1f}")
    print("times in us per call; apply = shrink + expand; speedup = baseline / apply")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "backend": backend, "dtype": str(dtype), "hidden": hidden,
                       "peak_gbps": peak, "results": [asdict(r) for r in results]}, f, indent=1)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
