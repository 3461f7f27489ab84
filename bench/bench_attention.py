"""Micro-benchmark of paged decode attention: GB/s of KV read against the HBM roofline.

Run from the repository root: `python -m bench.bench_attention [--dry-run] [--out results.json]`.

Decode attention is memory-bound: one call must read every sequence's K and V once,
bytes = 2 x sum(context) x kv_heads x head_dim x elem. "ours" is the Triton split-KV kernel
(kernels/paged_attention.py) reading blocks through shuffled block tables; the baseline is the twin
the server runs on CPU (gather each context with index_select, then SDPA), which reads the same bytes
and writes and re-reads a gathered copy. Default shape: Llama-3-8B's attention (32 query heads, 8 KV
heads, head_dim 128), bf16, 16-token blocks, contexts 512 to 8k at 1 to 64 sequences.

`--dry-run` runs the same code on CPU with tiny shapes (the kernel through TRITON_INTERPRET=1, set
here before triton is imported) so the GPU run works first time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass


@dataclass
class Result:
    seqs: int
    context: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    splits: int
    kv_mb: float
    ours_us: float
    twin_us: float
    ours_gbps: float
    twin_gbps: float
    pct_of_peak: float | None
    max_abs_err: float  # ours vs the twin on this very input


def main(argv: list[str] | None = None) -> list[Result]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    p.add_argument("--contexts", type=int, nargs="+", default=None)
    p.add_argument("--seqs", type=int, nargs="+", default=None)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported below

    import torch

    from bench.bench_kernels import hbm_peak_gbps
    from kernels.paged_attention import decode_config, decode_splits, paged_attention_ref, paged_decode_attention

    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        sys.exit("bench_attention: no CUDA device; use --dry-run for the CPU smoke run")
    if args.dry_run:
        contexts, seqs, heads, kv_heads, head_dim, iters = [40, 100], [1, 2], 4, 2, 16, 1
        dtype = torch.float32
    else:
        contexts = args.contexts or [512, 1024, 2048, 4096, 8192]
        seqs = args.seqs or [1, 8, 32, 64]
        heads, kv_heads, head_dim, iters = args.heads, args.kv_heads, args.head_dim, args.iters or 50
        dtype = getattr(torch, args.dtype or "bfloat16")
    bs = args.block_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    peak = hbm_peak_gbps(name)
    print(f"device: {name}; dtype {str(dtype).removeprefix('torch.')}; heads {heads}/{kv_heads} x {head_dim}; "
          f"block {bs}" + (f"; HBM peak {peak:.0f} GB/s" if peak else ""))

    def timed(fn) -> float:
        for _ in range(max(1, iters // 10)):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(3):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for _ in range(iters):
                    fn()
                e.record()
                torch.cuda.synchronize()
                best = min(best, s.elapsed_time(e) * 1e3 / iters)
            return best
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e6 / iters

    head = (f"{'seqs':>4} {'ctx':>5} {'splits':>6} | {'KV MB':>8} {'ours us':>8} {'GB/s':>7} {'%peak':>6} | "
            f"{'twin us':>8} {'GB/s':>7} | {'err':>8}")
    print(head + "\n" + "-" * len(head))
    results = []
    elem = torch.empty((), dtype=dtype).element_size()

    def measure(n: int, ctx: int) -> Result:
        blocks_each = -(-ctx // bs)
        num_blocks = n * blocks_each + 1
        torch.manual_seed(n * 10007 + ctx)  # random data made on the device (GBs at 64 x 8k)
        k_cache = torch.randn(num_blocks, bs, kv_heads, head_dim, device=device, dtype=dtype)
        v_cache = torch.randn(num_blocks, bs, kv_heads, head_dim, device=device, dtype=dtype)
        perm = torch.randperm(num_blocks - 1)[: n * blocks_each]  # shuffled: blocks are not contiguous
        tables = perm.view(n, blocks_each).to(torch.int32).to(device)
        q = torch.randn(n, heads, head_dim, device=device, dtype=dtype)
        i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
        q_start, ctx_len, zeros = i32(list(range(n))), i32([ctx] * n), i32([0] * n)
        out = torch.empty_like(q)
        scale = head_dim ** -0.5
        splits = decode_splits(device, n, kv_heads, blocks_each * bs, decode_config(device, head_dim)[0])

        def ours() -> None:
            paged_decode_attention(q, k_cache, v_cache, tables, q_start, ctx_len, zeros, scale=scale, out=out)

        flat_k = k_cache.view(-1, kv_heads, head_dim)
        flat_v = v_cache.view(-1, kv_heads, head_dim)
        slots = (tables.long()[:, :, None] * bs + torch.arange(bs, device=device)).view(n, -1)[:, :ctx]

        def twin() -> torch.Tensor:  # the server's CPU path: gather, then grouped SDPA
            kd = flat_k.index_select(0, slots.reshape(-1)).view(n, ctx, kv_heads, head_dim).transpose(1, 2)
            vd = flat_v.index_select(0, slots.reshape(-1)).view(n, ctx, kv_heads, head_dim).transpose(1, 2)
            qd = q.view(n, kv_heads, heads // kv_heads, head_dim)
            return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, scale=scale)

        ours()
        want = twin().reshape(n, heads, head_dim)
        err = (out.float() - want.float()).abs().max().item()
        if args.dry_run:  # the slow but exact spec as well
            ref = paged_attention_ref(q, k_cache, v_cache, tables, q_start, i32([1] * n), ctx_len, zeros,
                                      scale=scale)
            err = max(err, (out.float() - ref.float()).abs().max().item())
        ours_us, twin_us = timed(ours), timed(twin)
        kv_bytes = 2 * n * ctx * kv_heads * head_dim * elem
        r = Result(seqs=n, context=ctx, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                   dtype=str(dtype).removeprefix("torch."), splits=splits, kv_mb=kv_bytes / 1e6,
                   ours_us=ours_us, twin_us=twin_us, ours_gbps=kv_bytes / ours_us / 1e3,
                   twin_gbps=kv_bytes / twin_us / 1e3,
                   pct_of_peak=100 * kv_bytes / ours_us / 1e3 / peak if peak else None, max_abs_err=err)
        pct = f"{r.pct_of_peak:5.1f}%" if peak else "     -"
        print(f"{n:>4} {ctx:>5} {splits:>6} | {r.kv_mb:8.2f} {ours_us:8.1f} {r.ours_gbps:7.1f} {pct} | "
              f"{twin_us:8.1f} {r.twin_gbps:7.1f} | {err:8.1e}")
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        if err > tol:
            sys.exit(f"bench_attention: kernel disagrees with the twin by {err:.2e} (> {tol}) at seqs {n} ctx {ctx}")
        return r

    for n in seqs:
        for ctx in contexts:
            results.append(measure(n, ctx))
    print("GB/s = K+V bytes of the contexts / time per call; %peak vs the datasheet HBM bandwidth")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "peak_gbps": peak, "results": [asdict(r) for r in results]}, f, indent=1)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
