"""Adapter load latency per tier on the real default model (SmolLM2-135M, 30 layers): rank-16 LoRA on all 7
projections.

  disk -> CPU:    `adapters_store.loader.load_adapter` (validate the config, read and check the safetensors);
  CPU -> device:  `ModelRunner.load_adapter` into pages of the LoRA pool (what the engine does on a load).

    .venv/bin/python -m bench.adapter_load                       # 8 adapters, 3 rounds
    .venv/bin/python -m bench.adapter_load --rank 64 --count 4

Each disk read is of a file written by another process a while ago, so it is usually in the page cache:
the figure is the parse + validate + copy cost, not the disk's (drop caches for a cold read).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from bench.mixed_adapters import make_lora_adapters
from server.model.default_model import DEFAULT_MODEL_NAME, ensure_default_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint dir (default: the default model in .cache/peftserve)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--count", type=int, default=8, help="distinct adapters")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from adapters_store.loader import load_adapter
    from server.model.runner import ModelRunner

    model_dir = args.model or ensure_default_model(os.path.join(REPO, ".cache", "peftserve"))
    dirs = make_lora_adapters(model_dir, args.count, args.rank)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runner = ModelRunner(model_dir, device=device, max_adapters=None, max_rank=64, num_blocks=64,
                         adapter_memory=None)
    info = runner.info
    pages_each = -(-args.rank // info.adapter_page_rank)
    disk, dev = [], []
    size = sum(os.path.getsize(os.path.join(dirs[0], f)) for f in os.listdir(dirs[0]))
    for _ in range(args.rounds):
        for i, d in enumerate(dirs):
            t0 = time.perf_counter()
            adapter = load_adapter(d, info.shapes, max_rank=64)
            disk.append(time.perf_counter() - t0)
            slot = i % info.max_adapters
            pages = list(range(slot * pages_each, (slot + 1) * pages_each))
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner.load_adapter(slot, adapter, pages=pages)
            if device == "cuda":
                torch.cuda.synchronize()
            dev.append(time.perf_counter() - t0)

    def ms(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {"p50_ms": 1e3 * statistics.median(xs), "p90_ms": 1e3 * xs[int(0.9 * (len(xs) - 1))],
                "min_ms": 1e3 * xs[0]}

    name = DEFAULT_MODEL_NAME if args.model is None else os.path.basename(model_dir)
    res = {"model": name, "device": device, "threads": args.threads, "rank": args.rank,
           "adapter_bytes_on_disk": size, "pages": pages_each, "loads": len(disk),
           "disk_to_cpu": ms(disk), "cpu_to_device": ms(dev), "loadavg": open("/proc/loadavg").read().strip()}
    print(f"{res['model']} rank {args.rank} all 7 projections ({size / 2**20:.1f} MiB on disk, {pages_each} pages), "
          f"{device}, {args.threads} thread(s), {len(disk)} loads, load average {res['loadavg']}")
    for tier in ("disk_to_cpu", "cpu_to_device"):
        t = res[tier]
        print(f"  {tier.replace('_to_', ' -> '):<14} p50 {t['p50_ms']:7.1f} ms  p90 {t['p90_ms']:7.1f} ms  "
              f"min {t['min_ms']:7.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
