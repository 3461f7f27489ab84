"""Micro-benchmark of the LoRA q/k/v launches at decode shapes: per-module eager (host tile tables), per-module
fixed-shape (capturable), and fused (one shrink + one expand for q, k and v), each also replayed from a CUDA
graph where the launches allow it (fixed and fused; on CUDA only).

Run from the repository root: `python -m bench.bench_fused [--dry-run] [--out results.json]`.

Shapes: Llama-3-8B attention (hidden 4096; q 4096, k/v 1024 outputs), rank 16 on all three, a 64-slot paged
pool; tokens 1-64, 1-64 distinct adapters (tokens interleaved). Ideal bytes: x read once, each used adapter's
own-rank A and B of every module read, each module's output read and written. `--dry-run`: tiny shapes
through the Triton interpreter on CPU (plumbing only; times measure the interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass


@dataclass
class Row:
    tokens: int
    adapters: int
    eager_us: float  # 3 x (shrink + expand), host tile tables (built once; the step's memo)
    fixed_us: float  # 3 x (shrink + expand), fixed-shape metadata
    fused_us: float  # 1 shrink + 1 expand for q, k, v
    fixed_graph_us: float | None  # the fixed launches replayed from a CUDA graph
    fused_graph_us: float | None
    ideal_mb: float
    fused_gbps: float
    fused_graph_pct_roof: float | None


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--adapters", type=int, nargs="+", default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

    import torch

    from bench.bench_kernels import _timer, hbm_peak_gbps
    from kernels import LoRAMeta
    from kernels.capturable import FixedLoRAMeta, fixed_tiles, lora_apply_fixed, max_fixed_tiles
    from kernels.fused_lora import lora_apply_fused
    from kernels.triton_expand import lora_expand_triton
    from kernels.triton_shrink import lora_shrink_triton

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("bench_fused: no CUDA device; use --dry-run for the CPU smoke run")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    hidden, kv, rank, slots, page_rank = (4096, 1024, 16, 64, 8) if cuda else (64, 16, 4, 4, 4)
    tokens = args.tokens or ([1, 8, 32, 64] if cuda else [1, 4])
    adapters = args.adapters or ([1, 8, 64] if cuda else [1, 4])
    iters = args.iters or (50 if cuda else 1)
    timer = _timer(device, iters, warmup=max(3, iters // 5) if cuda else 1, repeats=5 if cuda else 1)
    name = torch.cuda.get_device_name() if cuda else "cpu (interpreter)"
    peak = hbm_peak_gbps(name) if cuda else None
    g = torch.Generator().manual_seed(0)
    mp = -(-rank // page_rank)
    pages = torch.arange(slots * mp, dtype=torch.int32).view(slots, mp).to(device)  # slot s: pages s*MP...
    outs = {"q": hidden, "k": kv, "v": kv}
    mods = {}
    for m, n in outs.items():
        a = (torch.randn(slots * mp, page_rank, hidden, generator=g) / hidden ** 0.5).to(dtype).to(device)
        b = (torch.randn(slots * mp, page_rank, n, generator=g) / rank ** 0.5).to(dtype).to(device).transpose(1, 2)
        mods[m] = (a, b, torch.full((slots,), rank, dtype=torch.int32), torch.full((slots,), 2.0, device=device))
    print(f"device: {name}; dtype {dtype}; hidden {hidden}, q/k/v out {hidden}/{kv}/{kv}, rank {rank}, "
          f"{slots} slots" + (f"; HBM peak {peak:.0f} GB/s" if peak else ""))
    head = (f"{'T':>3} {'D':>3} | {'eager':>8} {'fixed':>8} {'fused':>8} | {'fixed g':>8} {'fused g':>8} | "
            f"{'ideal MB':>8} {'GB/s':>7} {'%roof(g)':>8}")
    print(head + "\n" + "-" * len(head))

    def case(t: int, d: int) -> Row:
        used = torch.randperm(slots, generator=g)[:d].tolist()
        token_slots = [used[i % d] for i in range(t)]
        meta = LoRAMeta.from_token_slots(token_slots, device=device)
        tiles = fixed_tiles(meta)
        n_tiles = max_fixed_tiles(t, slots)
        tiles += [(0, 0, 0, 0, 0)] * (n_tiles - len(tiles))
        fm = FixedLoRAMeta(token_indices=meta.token_indices,
                           tiles=torch.tensor(tiles, dtype=torch.int32, device=device).view(-1, 5), num_tokens=t)
        x = torch.randn(t, hidden, generator=g).to(dtype).to(device)
        fused_out = torch.zeros(t, hidden + 2 * kv, dtype=dtype, device=device)
        ys = [fused_out[:, :hidden], fused_out[:, hidden:hidden + kv], fused_out[:, hidden + kv:]]
        dev_ranks = {m: v[2].to(device) for m, v in mods.items()}

        def eager() -> None:
            for (a, b, r, sc), y in zip(mods.values(), ys, strict=True):
                lora_expand_triton(lora_shrink_triton(x, a, r, meta, pages=pages), b, r, sc, meta, y, pages=pages)

        def fixed() -> None:
            for (m, (a, b, _, sc)), y in zip(mods.items(), ys, strict=True):
                lora_apply_fixed(x, y, a, b, dev_ranks[m], sc, fm, pages=pages)

        def fused() -> None:
            lora_apply_fused(x, ys, [(a, b, dev_ranks[m], sc, pages) for m, (a, b, _, sc) in mods.items()], fm)

        def graphed(fn):  # noqa: ANN001, ANN202
            fn()  # compile outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            return graph.replay

        e_us, f_us, u_us = timer(eager), timer(fixed), timer(fused)
        fg_us = timer(graphed(fixed)) if cuda else None
        ug_us = timer(graphed(fused)) if cuda else None
        bpe = x.element_size()
        ideal = bpe * (t * hidden + d * rank * sum(hidden + n for n in outs.values())
                       + 2 * t * sum(outs.values()))
        best = ug_us if ug_us is not None else u_us
        pct = 100 * ideal / (peak * 1e3) / best if peak else None
        return Row(tokens=t, adapters=d, eager_us=e_us, fixed_us=f_us, fused_us=u_us, fixed_graph_us=fg_us,
                   fused_graph_us=ug_us, ideal_mb=ideal / 1e6, fused_gbps=ideal / best / 1e3,
                   fused_graph_pct_roof=pct)

    rows: list[Row] = []
    for t in tokens:
        for d in adapters:
            if d > t:
                continue
            r = case(t, d)
            rows.append(r)
            fmt = (lambda v: f"{v:8.1f}" if v is not None else f"{'-':>8}")  # noqa: E731
            print(f"{t:>3} {d:>3} | {r.eager_us:8.1f} {r.fixed_us:8.1f} {r.fused_us:8.1f} | {fmt(r.fixed_graph_us)} "
                  f"{fmt(r.fused_graph_us)} | {r.ideal_mb:8.3f} {r.fused_gbps:7.1f} {fmt(r.fused_graph_pct_roof)}")
    print("times in us per q/k/v LoRA application; 'g' = replayed from a CUDA graph; GB/s and %roof of the best fused")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "dtype": str(dtype), "peak_gbps": peak, "rows": [asdict(r) for r in rows]},
                      f, indent=1)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
