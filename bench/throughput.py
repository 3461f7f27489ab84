"""Throughput: N concurrent greedy requests through our engine vs batched `transformers` generate.

    .venv/bin/python -m bench.throughput --num-requests 32 --prompt-len 64 --output-len 32 --hidden 1024

Both run the same checkpoint and the same prompts in fp32 on this machine's device.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.common import (
    add_workload_args,
    bench_model,
    hf_generate,
    make_engine,
    random_prompts,
    run_engine,
    run_isolated,
)


def hf_baseline(model_dir: str, dtype: str, device: str, pad: int, prompts: list[list[int]], output_len: int,
                threads: int, repeat: int) -> dict[str, float]:
    """Batched transformers generate, in its own process (run_isolated)."""
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    hf_generate(model, prompts[:2], 4, pad)  # warm-up
    return max((hf_generate(model, prompts, output_len, pad) for _ in range(repeat)), key=lambda r: r["tok_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each side; the best is reported")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--json", metavar="PATH", help="write results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or bench_model(args.hidden, args.layers, args.heads, args.kv_heads)
    prompts = random_prompts(args.num_requests, args.prompt_len)
    max_len = args.prompt_len + args.output_len + 8
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device={device} threads={torch.get_num_threads()} model={model_dir}")
    print(f"requests={args.num_requests} prompt_len={args.prompt_len} output_len={args.output_len}")

    engine = make_engine(model_dir, max_num_seqs=args.num_requests, max_model_len=max_len,
                         max_batch_tokens=max(2048, args.num_requests))
    run_engine(engine, prompts[:2], 4)  # warm-up
    ours = max((run_engine(engine, prompts, args.output_len) for _ in range(args.repeat)),
               key=lambda r: r["tok_per_s"])
    engine.stop()
    print(f"peftserve engine : {ours['tok_per_s']:9.1f} tok/s  ({ours['tokens']:.0f} tokens in {ours['seconds']:.2f}s)")
    result = {"device": device, "args": vars(args), "peftserve": ours}
    if not args.skip_hf:
        hf = run_isolated(hf_baseline, model_dir, engine.info.dtype, device,
                          engine.tokenizer.pad_token_id, prompts, args.output_len, args.threads, args.repeat)
        print(f"transformers     : {hf['tok_per_s']:9.1f} tok/s  ({hf['tokens']:.0f} tokens in {hf['seconds']:.2f}s)")
        print(f"ratio ours/hf    : {ours['tok_per_s'] / hf['tok_per_s']:.2f}")
        result["transformers"] = hf
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
