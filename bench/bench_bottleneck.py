"""Micro-benchmark of the bottleneck-adapter kernels at decode/prefill shapes against a padded gather-and-bmm.

Run from the repository root: `python -m bench.bench_bottleneck [--quick] [--out results.json]`.
On CUDA `ours` is the Triton kernels (kernels/bottleneck.py); elsewhere the torch twin (the switch decides).

Ideal bytes of one application: x [T, D] read, each distinct adapter's own-width down [m, D] + up [D, m]
(+ biases) read, y [T, D] read and written. The baseline gathers every token's max-width-padded weights.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.bench_kernels import _peak, _timer
from kernels.bottleneck import bottleneck_apply
from kernels.metadata import LoRAMeta

WIDTH_MODES = {"w64": [64], "w256": [256], "mixed": [16, 64, 128, 256]}  # reduction 16 at hidden 4096: 256


def baseline(x: torch.Tensor, y: torch.Tensor, wd: torch.Tensor, bd: torch.Tensor, wu: torch.Tensor,
             bu: torch.Tensor, scales: torch.Tensor, tok_slots: torch.Tensor) -> torch.Tensor:
    """Per-token gather of the padded weights by slot, two bmm (what a loop-free server without segments does)."""
    h = torch.relu(torch.bmm(x.unsqueeze(1), wd[tok_slots].transpose(1, 2)).squeeze(1) + bd[tok_slots])
    d = torch.bmm(h.unsqueeze(1), wu[tok_slots].transpose(1, 2)).squeeze(1) + bu[tok_slots]
    return y.add_(d * scales[tok_slots, None])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.quick:
        tokens, adapters, modes, hidden, iters = [1, 16], [1, 4], ["mixed"], 256, 5
    else:
        tokens, adapters, modes, hidden, iters = [1, 16, 64, 256], [1, 8, 64], ["w64", "w256", "mixed"], 4096, 30
    slots = max(64, max(adapters))
    m_max = max(max(v) for v in WIDTH_MODES.values())
    name, peak = _peak(device)
    timer = _timer(device, iters, warmup=max(3, iters // 5))
    print(f"device: {name}; dtype {str(dtype).removeprefix('torch.')}; hidden {hidden}; pool {slots} x width {m_max}")
    head = (f"{'T':>4} {'D':>3} {'widths':>6} | {'ours us':>8} {'baseline':>9} {'speedup':>7} | "
            f"{'ideal MB':>8} {'GB/s':>7}")
    print(head + "\n" + "-" * len(head))
    out = []
    for t in tokens:
        for d in adapters:
            if d > t:
                continue
            for mode in modes:
                g = torch.Generator().manual_seed(t * 100 + d)
                cyc = WIDTH_MODES[mode]
                widths = torch.tensor([cyc[i % len(cyc)] for i in range(slots)], dtype=torch.int32)
                wd = (torch.randn(slots, m_max, hidden, generator=g) / hidden**0.5).to(dtype).to(device)
                bd = torch.zeros(slots, m_max, dtype=dtype, device=device)
                wu = (torch.randn(slots, hidden, m_max, generator=g) * 0.02).to(dtype).to(device)
                bu = torch.zeros(slots, hidden, dtype=dtype, device=device)
                acts = torch.ones(slots, dtype=torch.int32, device=device)  # relu
                scales = torch.ones(slots, device=device)
                x = torch.randn(t, hidden, generator=g).to(dtype).to(device)
                y = torch.zeros(t, hidden, dtype=dtype, device=device)
                used = torch.randperm(slots, generator=g)[:d].tolist()
                token_slots = [used[i % d] for i in range(t)]
                meta = LoRAMeta.from_token_slots(token_slots, device=device)
                ts = torch.tensor(token_slots, device=device)
                ours = timer(lambda: bottleneck_apply(x, y, wd, bd, wu, bu, widths, acts, scales, meta))  # noqa: B023
                base = timer(lambda: baseline(x, y, wd, bd, wu, bu, scales, ts))  # noqa: B023
                own = sum(int(widths[s]) for s in used)
                ideal = x.element_size() * (t * hidden + own * (2 * hidden + 1) + d * hidden + 2 * t * hidden)
                row = {"tokens": t, "adapters": d, "widths": mode, "hidden": hidden, "ours_us": ours,
                       "baseline_us": base, "ideal_mb": ideal / 1e6, "ours_gbps": ideal / ours / 1e3}
                out.append(row)
                print(f"{t:>4} {d:>3} {mode:>6} | {ours:8.1f} {base:9.1f} {base / ours:6.2f}x | "
                      f"{ideal / 1e6:8.3f} {ideal / ours / 1e3:7.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "dtype": str(dtype), "results": out}, f, indent=1)
    return out


if __name__ == "__main__":
    main()
