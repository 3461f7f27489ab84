"""Fine-tuning on the resident base: training tokens/s, and serving tok/s with and without a job running.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.finetune --threads 1 [--model DIR] [--shares 0.25,0.5]

The server is built as `peftserve serve` builds it (build_state: engine, store, fine-tuning), without HTTP.
Per round, paired in the same run: 8 concurrent greedy base streams alone (the baseline), then the same
8 streams while a LoRA job trains at each --train-share. Training throughput is measured alone (idle engine,
where the job takes the whole engine thread). RSS: after serving warm-up without a job, and the peak while
a job runs (the base weights are shared, so the difference is the adapter, its optimizer state and
activations). Default model: SmolLM2-135M-Instruct from the repo's .cache (tests/real_model.py).

The micro-step bound (`--train-max-step-tokens`): on long samples (`--long-words`), a job at each cap of
`--bound-caps` (a huge cap = one whole sample a micro-step, as before the cap) runs `--bound-steps` optimizer
steps on the idle engine; printed: the longest one micro-step held the engine thread, the most tokens one ran,
and training tokens/s (the cost of the exact chunked backward: chunks are run forward twice).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import tempfile
import threading
import time
from typing import Any

import torch


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def dataset(n: int, words: int) -> bytes:
    rows = []
    for i in range(n):
        q = f"Question {i}: tell me something about the number {i} " + "and more " * (words // 4)
        a = f"Aye! The number {i} " + " ".join(["is fine"] * (words // 2))
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def serve_streams(engine: Any, n: int, prompt_len: int, output_len: int) -> float:
    """n concurrent greedy base streams; tokens/s over the whole burst."""
    from server.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    prompts = [[(7 * i + j) % 200 + 10 for j in range(prompt_len)] for i in range(n)]

    async def one(p: list[int]) -> int:
        k = 0
        async for d in engine.generate(p, params):
            assert d.error is None
            k += len(d.token_ids)
        return k

    async def burst() -> list[int]:
        return await asyncio.gather(*(one(p) for p in prompts))

    t0 = time.perf_counter()
    counts = asyncio.run(burst())
    dt = time.perf_counter() - t0
    assert counts == [output_len] * n, counts
    return sum(counts) / dt


def start_job(ft: Any, fid: str, base: str, share: float) -> str:
    ft.train_share = share
    job = ft.create({"model": base, "training_file": fid, "suffix": "bench", "seed": 0,
                     "method": {"type": "supervised", "supervised": {"hyperparameters": {
                         "n_epochs": 50, "batch_size": 1}}}})
    return job["id"]


def wait_training(ft: Any, micro: int = 1, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not (ft.trainer is not None and ft.trainer.progress.micro >= micro):
        if time.monotonic() > deadline:
            raise RuntimeError("the job did not start training")
        time.sleep(0.01)


def stop_job(ft: Any, jid: str, timeout: float = 600) -> None:
    ft.cancel(jid)
    deadline = time.monotonic() + timeout
    while ft.running is not None or (ft.jobs.get(jid) or {}).get("status") not in ("cancelled", "failed"):
        if time.monotonic() > deadline:
            raise RuntimeError("the job did not stop")
        time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint dir (default: SmolLM2-135M-Instruct from the repo cache)")
    ap.add_argument("--shares", default="0.25,0.5")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--train-micro-steps", type=int, default=20, help="micro-steps timed for training tokens/s")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--words", type=int, default=24, help="rough size of each sample")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--step-tokens", type=int, default=256, help="--train-max-step-tokens of the share rounds")
    ap.add_argument("--bound-caps", default="64,100000", help="caps compared on long samples ('' skips)")
    ap.add_argument("--long-words", type=int, default=160, help="rough size of each long sample")
    ap.add_argument("--bound-steps", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from server.api.state import build_state
    from server.config import Settings

    model = args.model
    if model is None:
        from tests.real_model import real_model_path

        model = real_model_path()
    store = tempfile.mkdtemp(prefix="peftserve-bench-ft-")
    state = build_state(Settings(model=model, adapters_dir=store, max_model_len=512, kv_cache_blocks=256))
    engine, ft = state.engine, state.finetune
    engine.start()
    ft.start()
    data = dataset(args.samples, args.words)
    rec = ft.files.add(data, filename="bench.jsonl", purpose="fine-tune", lines=args.samples, fmt="chat")
    ft.max_step_tokens = args.step_tokens
    serve_streams(engine, args.streams, args.prompt_len, 4)  # warm-up
    rss_idle = _rss_mb()
    out: dict[str, Any] = {"model": os.path.basename(model), "threads": torch.get_num_threads(),
                           "engine_threads": engine.torch_threads,
                           "loadavg_start": open("/proc/loadavg").read().split()[:3],
                           "rss_mb_serving_no_job": round(rss_idle, 1)}

    peak = [rss_idle]
    stop_rss = threading.Event()

    def sample_rss() -> None:  # the peak while jobs run (sampled every 50 ms)
        while not stop_rss.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    # training throughput alone: the job has the idle engine thread to itself
    jid = start_job(ft, rec.id, state.base_name, 0.5)
    wait_training(ft, 2)  # past model build and the first (slower) step
    p = ft.trainer.progress
    tok0, t0, sec0 = p.trained_tokens, time.perf_counter(), p.train_seconds
    wait_training(ft, 2 + args.train_micro_steps)
    wall = time.perf_counter() - t0
    out["train_tokens_per_s"] = round((p.trained_tokens - tok0) / wall, 1)
    out["train_tokens_per_s_in_steps"] = round((p.trained_tokens - tok0) / (p.train_seconds - sec0), 1)
    out["micro_step_ms"] = round(1000 * (p.train_seconds - sec0) / args.train_micro_steps, 1)
    stop_job(ft, jid)

    caps = [int(c) for c in args.bound_caps.split(",") if c]
    if caps:
        long = ft.files.add(dataset(8, args.long_words), filename="long.jsonl", purpose="fine-tune", lines=8,
                            fmt="chat")
        bound = []
        for cap in caps:
            ft.max_step_tokens = cap
            jid = start_job(ft, long.id, state.base_name, 0.5)
            wait_training(ft, 1)
            trainer = ft.trainer
            trainer.progress.longest_micro_seconds = 0.0  # past the first micro-step's one-time costs
            deadline = time.monotonic() + 1800
            while trainer.progress.step < args.bound_steps and time.monotonic() < deadline:
                time.sleep(0.05)
            p = trainer.progress
            row = {"cap": cap, "optimizer_steps": p.step, "micro_steps": p.micro,
                   "largest_micro_step_tokens": p.largest_micro_tokens,
                   "longest_micro_step_s": round(p.longest_micro_seconds, 3),
                   "mean_micro_step_s": round(p.train_seconds / max(1, p.micro), 3),
                   "train_tokens_per_s_in_steps": round(p.trained_tokens / max(p.train_seconds, 1e-9), 1),
                   "sample_tokens": max(len(e.ids) for e in trainer.examples)}
            stop_job(ft, jid)
            bound.append(row)
            print(json.dumps(row), flush=True)
        out["micro_step_bound"] = bound
        ft.max_step_tokens = args.step_tokens

    shares = [float(s) for s in args.shares.split(",")]
    rows = []
    for r in range(args.rounds):
        base_tps = serve_streams(engine, args.streams, args.prompt_len, args.output_len)
        row: dict[str, Any] = {"round": r, "base_tok_per_s": round(base_tps, 2)}
        for share in shares:
            jid = start_job(ft, rec.id, state.base_name, share)
            wait_training(ft, 1)
            micro0 = ft.trainer.progress.micro
            tps = serve_streams(engine, args.streams, args.prompt_len, args.output_len)
            micro = ft.trainer.progress.micro - micro0
            stop_job(ft, jid)
            row[f"share_{share}_tok_per_s"] = round(tps, 2)
            row[f"share_{share}_ratio"] = round(tps / base_tps, 3)
            row[f"share_{share}_micro_steps_meanwhile"] = micro
        rows.append(row)
        print(json.dumps(row), flush=True)
    stop_rss.set()
    sampler.join()
    out["rss_mb_peak_with_job"] = round(peak[0], 1)
    out["maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["rounds"] = rows
    for share in shares:
        ratios = sorted(r[f"share_{share}_ratio"] for r in rows)
        if not ratios:
            continue
        mid = len(ratios) // 2
        out[f"share_{share}_ratio_median"] = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    out["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    ft.shutdown()
    engine.stop()


if __name__ == "__main__":
    main()
