"""Per-request composition (issue 15): what `cat` costs at serving time, and what a TIES merge costs once.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.compose --threads 1            # both parts
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.compose --threads 1 --skip-merge --hidden 512

Part 1 (random Llama of --hidden x --layers): 32 requests (64 in, 32 out, greedy, all submitted at once), request
i composing 2 of 8 LoRA adapters (r16, all 7 projections) with `cat` (weights 0.7 / 0.3; pairs (i, i+1+i//8)
mod 8: 32 distinct ordered compositions of rank 32), timed alternately with the same requests each on its first source
alone (8 distinct adapters of rank 16), best of --repeat each; the ratio is taken per pair (ratios survive other
load on the machine, absolute numbers do not). The compositions are built before timing (their one-time cost
is part 2's subject); the engine serves them as ordinary rank-32 LoRAs.

Part 2 (the real default model, SmolLM2-135M-Instruct: 30 layers, 7 projections each): the one-time cost of
merging two r16 LoRAs with TIES (density 0.5) by our `derived_lora`, paired with peft's `add_weighted_adapter`
(same arguments) in the same process, plus `cat` (and with --svd, `ties_svd`: a full SVD per module, minutes
on one thread). Median of --merge-repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from bench.common import add_workload_args, bench_model, make_engine, random_prompts, run_engine
from bench.mixed_adapters import make_lora_adapters


def serving(args: argparse.Namespace) -> dict[str, Any]:
    from adapters_store.loader import load_adapter
    from server.compose.merge import MergeParams, derived_lora
    from server.engine.registry import AdapterRegistry

    model_dir = args.model or bench_model(args.hidden, args.layers, args.heads, args.kv_heads)
    dirs = make_lora_adapters(model_dir, 8, args.rank)
    n = args.num_requests
    engine = make_engine(model_dir, max_num_seqs=n, max_model_len=args.prompt_len + args.output_len + 8,
                         max_adapters=n + 16, max_rank=2 * args.rank, max_batch_tokens=max(2048, n))
    info = engine.info.shapes
    reg = AdapterRegistry(max_cpu=256)
    singles = [reg.put(f"lora{i}", load_adapter(d, info, max_rank=args.rank)) for i, d in enumerate(dirs)]
    pairs = [(i % 8, (i + 1 + i // 8) % 8) for i in range(n)]
    comps: dict[tuple[int, int], Any] = {}
    t0 = time.perf_counter()
    for a, b in sorted(set(pairs)):
        src = [(singles[a].adapter, 0.7), (singles[b].adapter, 0.3)]
        comps[(a, b)] = reg.put(f"cat{a}-{b}", derived_lora(src, MergeParams("cat"), info, 2 * args.rank))
    build_s = time.perf_counter() - t0
    prompts = random_prompts(n, args.prompt_len)
    cat_hs = [comps[p] for p in pairs]
    single_hs = [singles[a] for a, _ in pairs]
    run_engine(engine, prompts[:2], 2)
    run_engine(engine, prompts, 2, cat_hs)  # warm-up: every composition into its slot
    run_engine(engine, prompts, 2, single_hs)
    rounds = []
    for _ in range(args.repeat):
        s = run_engine(engine, prompts, args.output_len, single_hs)["tok_per_s"]
        c = run_engine(engine, prompts, args.output_len, cat_hs)["tok_per_s"]
        rounds.append({"single_tok_s": s, "cat_tok_s": c, "ratio": c / s})
        print(f"  single {s:8.1f} tok/s   cat {c:8.1f} tok/s   ratio {c / s:.3f}", flush=True)
    engine.stop()
    return {"model": model_dir, "hidden": args.hidden, "layers": args.layers, "rank": args.rank,
            "num_requests": n, "distinct_compositions": len(comps), "build_all_compositions_s": build_s,
            "rounds": rounds, "median_ratio": statistics.median(r["ratio"] for r in rounds),
            "best_single_tok_s": max(r["single_tok_s"] for r in rounds),
            "best_cat_tok_s": max(r["cat_tok_s"] for r in rounds)}


def merge_cost(args: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters_store.loader import load_adapter
    from server.compose.merge import MergeParams, derived_lora
    from server.model.spec import spec_from_config
    from tests.real_model import real_model_path

    path = real_model_path()
    root = "/tmp/peftserve-bench/compose-real"
    dirs = []
    for i in range(2):
        d = os.path.join(root, f"r16-{i}")
        if not os.path.isfile(os.path.join(d, "adapter_config.json")):
            torch.manual_seed(100 + i)
            m = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), LoraConfig(
                r=16, lora_alpha=32, init_lora_weights=False, task_type="CAUSAL_LM",
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
            m.save_pretrained(d)
        dirs.append(d)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    info = spec_from_config(hf.config).base_info()
    ours = [load_adapter(d, info, max_rank=64) for d in dirs]
    peft_model = PeftModel.from_pretrained(hf, dirs[0], adapter_name="src0")
    peft_model.load_adapter(dirs[1], adapter_name="src1")
    out: dict[str, Any] = {"model": path, "layers": info.num_layers, "rank": 16}
    cases = [("ties", dict(density=0.5)), ("cat", {})] + ([("ties_svd", dict(density=0.5))] if args.svd else [])
    for method, kw in cases:
        p = MergeParams(method, density=kw.get("density"))
        times, peft_times = [], []
        for k in range(args.merge_repeat if method != "ties_svd" else 1):
            t0 = time.perf_counter()
            derived_lora([(ours[0], 0.6), (ours[1], 0.4)], p, info, 64)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            peft_model.add_weighted_adapter(["src0", "src1"], [0.6, 0.4], f"{method}{k}", combination_type=method, **kw)
            peft_times.append(time.perf_counter() - t0)
            peft_model.delete_adapter(f"{method}{k}")
        ours_s, peft_s = statistics.median(times), statistics.median(peft_times)
        out[method] = {"ours_s": ours_s, "peft_add_weighted_adapter_s": peft_s}
        print(f"  {method:<9} ours {ours_s * 1000:9.1f} ms   peft add_weighted_adapter {peft_s * 1000:9.1f} ms",
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--merge-repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip-serving", action="store_true")
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--svd", action="store_true", help="also time ties_svd once (minutes on the real model)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"loadavg_start": open("/proc/loadavg").read().split()[:3],
                              "threads": torch.get_num_threads()}
    if not args.skip_merge:
        print("one-time merge cost, real default model (2 x r16, all 7 projections):", flush=True)
        result["merge"] = merge_cost(args)
    if not args.skip_serving:
        print(f"serving: {args.num_requests} requests, cat of 2 of 8 r{args.rank} adapters vs single adapters:",
              flush=True)
        result["serving"] = serving(args)
        print(f"  median cat/single ratio {result['serving']['median_ratio']:.3f}", flush=True)
    result["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    print(f"load average start {result['loadavg_start']} end {result['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
