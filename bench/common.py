"""Shared pieces of the benchmark runners: a synthetic checkpoint, prompts, and engine driving."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from typing import Any

import torch

from server.engine.async_engine import AsyncEngine
from server.engine.sequence import SamplingParams
from server.model.default_model import save_llama_family
from server.model.runner import ModelRunner
from server.threads import claim_for_engine


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """The model shape and request shape every runner takes."""
    ap.add_argument("--model", help="HF checkpoint dir (default: a random Llama of --hidden/--layers)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)


def bench_model(hidden: int, layers: int, heads: int, kv_heads: int, cache: str = "/tmp/peftserve-bench") -> str:
    """A random Llama checkpoint of the given shape (cached), with the byte tokenizer."""
    path = os.path.join(cache, f"llama-h{hidden}-l{layers}-a{heads}-kv{kv_heads}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        cfg = dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                   num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096)
        tmp = path + f".tmp{os.getpid()}"
        save_llama_family(tmp, "llama", cfg, seed=0)
        os.rename(tmp, path)
    return path


def random_prompts(n: int, length: int, vocab: int = 256, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def make_engine(model_dir: str, *, max_num_seqs: int, max_model_len: int, max_adapters: int | None = 8,
                max_rank: int = 64, max_batch_tokens: int = 2048, num_blocks: int | None = None,
                prefix_caching: bool = True, adapter_memory: int | str | None = None) -> AsyncEngine:
    """Our engine as the server builds it: on CPU the worker thread owns every torch thread (server.threads);
    the calling thread is left single-threaded, so run torch baselines in another process."""
    cuda = torch.cuda.is_available()
    threads = None if cuda else claim_for_engine()
    runner = ModelRunner(model_dir, device="cuda" if cuda else "cpu", dtype="auto",
                         max_model_len=max_model_len, max_adapters=max_adapters, max_rank=max_rank,
                         num_blocks=num_blocks, adapter_memory=adapter_memory)
    return AsyncEngine(runner, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens, torch_threads=threads,
                       prefix_caching=prefix_caching)


def run_engine(engine: AsyncEngine, prompts: list[list[int]], output_len: int,
               adapters: list[Any] | None = None) -> dict[str, float]:
    """Submit all prompts at once (greedy, fixed output length); return tokens/s and latency."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    adapters = adapters or [None] * len(prompts)

    async def one(p: list[int], a: Any) -> int:
        n = 0
        async for d in engine.generate(p, params, a):
            n += len(d.token_ids)
        return n

    async def main() -> list[int]:
        return await asyncio.gather(*(one(p, a) for p, a in zip(prompts, adapters, strict=True)))

    engine.start()
    cpu0 = engine.worker_cpu_seconds()
    t0 = time.perf_counter()
    counts = asyncio.run(main())
    dt = time.perf_counter() - t0
    cpu1 = engine.worker_cpu_seconds()
    assert all(c == output_len for c in counts), counts
    out = {"tokens": float(sum(counts)), "seconds": dt, "tok_per_s": sum(counts) / dt}
    if cpu0 is not None and cpu1 is not None and cpu1 > cpu0:
        # the engine thread's CPU time: what a shared machine's load inflates far less than wall time
        out["cpu_seconds"] = cpu1 - cpu0
        out["tok_per_cpu_s"] = sum(counts) / (cpu1 - cpu0)
    return out


def run_isolated(fn: Any, *args: Any) -> Any:
    """Run fn(*args) in a fresh (spawned) process and return its result: torch baselines run there so that
    the engine's worker is the only thread of this process with an OpenMP team (see server.threads)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def hf_generate(model: Any, prompts: list[list[int]], output_len: int, pad_id: int,
                **gen_kwargs: Any) -> dict[str, float]:
    """Batched transformers generate with left padding and a fixed output length."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, pad_token_id=pad_id, **gen_kwargs)
    dt = time.perf_counter() - t0
    tokens = (out.shape[1] - width) * len(prompts)
    return {"tokens": float(tokens), "seconds": dt, "tok_per_s": tokens / dt}
