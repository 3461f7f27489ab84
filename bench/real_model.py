"""The real default model (SmolLM2-135M-Instruct, 30 layers) end to end through the engine:

  (a) base: 32 chats x 64 generated tokens, our engine vs batched `transformers` generate (same run,
      same checkpoint, same prompts, fp32; transformers in its own process, see bench.common.run_isolated);
  (b) mixed LoRA: 3 adapters of ranks 8/16/32 on all 7 projections, request i uses adapter i % 3,
      timed alternately with base (ratio against the paired base run);
  (c) where a decode step's time goes: runner.execute for 1 vs 32 sequences (a step that costs the same
      for 1 and 32 sequences is bound by per-layer Python/dispatch overhead, not by arithmetic).

    .venv/bin/python -m bench.real_model                 # the full run (a few minutes on 2 CPU cores)
    .venv/bin/python -m bench.real_model --quick         # smoke: 4 chats x 8 tokens, no repeats
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from bench.common import make_engine, run_engine, run_isolated
from bench.mixed_adapters import make_lora_adapters
from bench.throughput import hf_baseline
from server.model.batch import SeqChunk
from server.model.default_model import ensure_default_model

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?", "Give one tip for sleeping well.", "What is photosynthesis?",
    "How many legs does a spider have?", "What is the largest ocean?", "Explain gravity in one sentence.",
    "What is a prime number?", "Why is the sky blue?", "What do bees make?", "Name a famous painter.",
    "What is the speed of light?", "How do I boil an egg?", "What is the tallest mountain?",
]


def chat_prompts(tokenizer: Any, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + (" Be brief." if i >= len(QUESTIONS)
                                                                           else "")}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def step_costs(runner: Any, prompts: list[list[int]], repeat: int) -> dict[str, float]:
    """ms of one decode step of 1 and of len(prompts) sequences (after their prefill), best of `repeat`."""
    bs = runner.info.block_size
    out: dict[str, float] = {}
    for n in (1, len(prompts)):
        chunks, tables = [], []
        for i, p in enumerate(prompts[:n]):
            need = -(-(len(p) + 2) // bs)
            tables.append(list(range(i * need, (i + 1) * need)))
            chunks.append(SeqChunk(i, p, 0, tables[i], True))
        runner.execute(chunks)
        dec = [SeqChunk(i, [p[-1]], len(p), tables[i], True) for i, p in enumerate(prompts[:n])]
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            runner.execute(dec)
            best = min(best, time.perf_counter() - t0)
        out[f"decode_step_ms_{n}_seqs"] = best * 1e3
    out["per_layer_ms_1_seq"] = out["decode_step_ms_1_seqs"] / runner.spec.num_layers
    return out


def on_engine_threads(engine: Any, fn: Any) -> Any:
    """fn() on a fresh thread with the engine's torch thread count (the engine is stopped: one OpenMP team)."""
    import threading

    import torch

    out: list[Any] = []

    def run() -> None:
        if engine.torch_threads:
            torch.set_num_threads(engine.torch_threads)
        with torch.inference_mode():
            out.append(fn())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint dir (default: the default model, fetched on first use)")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each side; the best is reported")
    ap.add_argument("--ranks", default="8,16,32")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_requests, args.output_len, args.repeat = 4, 8, 1
    model_dir = args.model or ensure_default_model()
    n = args.num_requests
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = chat_prompts(tokenizer, n)
    max_len = max(len(p) for p in prompts) + args.output_len + 8
    ranks = [int(r) for r in args.ranks.split(",")]
    lora_dirs = [make_lora_adapters(model_dir, 1, r)[0] for r in ranks]

    from adapters_store.loader import load_adapter
    from server.engine.registry import AdapterRegistry

    engine = make_engine(model_dir, max_num_seqs=n, max_model_len=max_len, max_adapters=len(ranks),
                         max_rank=max(ranks), max_batch_tokens=max(2048, n))
    device = engine.info.device
    registry = AdapterRegistry()
    handles = [registry.put(f"lora-r{r}", load_adapter(d, engine.info.shapes, max_rank=max(ranks)))
               for r, d in zip(ranks, lora_dirs, strict=True)]
    mixed = [handles[i % len(handles)] for i in range(n)]
    print(f"device={device} model={model_dir} requests={n} prompt_len~{sum(map(len, prompts)) / n:.0f} "
          f"output_len={args.output_len} (CPU runs: shared machine, figures are indicative)")

    run_engine(engine, prompts[:2], 2)  # warm-up
    run_engine(engine, prompts[:len(ranks)], 2, handles)  # loads each adapter into its slot
    base_runs, lora_runs = [], []
    for i in range(args.repeat):  # alternate, so a noisy neighbour biases both alike
        base_runs.append(run_engine(engine, prompts, args.output_len))
        lora_runs.append(run_engine(engine, prompts, args.output_len, mixed))
        b, m = base_runs[-1]["tok_per_s"], lora_runs[-1]["tok_per_s"]
        print(f"  run {i}: base {b:.1f} tok/s, LoRA mix {m:.1f} tok/s",
              flush=True)
    engine.stop()
    best = lambda runs: max(runs, key=lambda r: r["tok_per_s"])  # noqa: E731
    base, lora = best(base_runs), best(lora_runs)
    paired = max(lr["tok_per_s"] / br["tok_per_s"] for br, lr in zip(base_runs, lora_runs, strict=True))
    print(f"peftserve base        : {base['tok_per_s']:8.1f} tok/s  "
          f"({base['tokens']:.0f} tokens, {base['seconds']:.2f}s)")
    print(f"peftserve LoRA r{'/'.join(map(str, ranks))} mix: {lora['tok_per_s']:8.1f} tok/s  "
          f"(best paired ratio to base {paired:.2f}; best/best {lora['tok_per_s'] / base['tok_per_s']:.2f})")
    result: dict[str, Any] = {"device": device, "args": vars(args), "model": model_dir, "base": base,
                              "lora_mixed": lora, "lora_paired_ratio": paired,
                              "base_runs": base_runs, "lora_runs": lora_runs}
    steps = on_engine_threads(engine, lambda: step_costs(engine.runner, prompts, max(3, args.repeat)))
    print("decode step: " + ", ".join(f"{k}={v:.2f}" for k, v in steps.items()))
    result["steps"] = steps
    if not args.skip_hf:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        hf = run_isolated(hf_baseline, model_dir, "float32", device, pad, prompts, args.output_len, 0, args.repeat)
        print(f"transformers generate : {hf['tok_per_s']:8.1f} tok/s  "
              f"({hf['tokens']:.0f} tokens, {hf['seconds']:.2f}s)")
        print(f"ratio ours/transformers (base): {base['tok_per_s'] / hf['tok_per_s']:.2f}")
        result["transformers"] = hf
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
