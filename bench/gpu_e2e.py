"""End to end on the GPU path: a ~1B random Llama with 64 distinct r=16 adapters, base vs mixed, eager vs graphs.

Run from the repository root: `python -m bench.gpu_e2e [--dry-run] [--out results.json]`.

Drives the ModelRunner step by step, as the engine's worker does (scheduling is not what is measured
here): all sequences are prefilled in chunks under a token budget, then decoded together with greedy
argmax until each has `--output-len` tokens. Reported per workload: tokens/s of the whole run
(prefill included), TTFT (start to the step that returns a sequence's first token; p50/p95),
ITL (decode step time; p50/p95), and a batch-1 decode ITL. Workloads:
  base   every sequence on the base model;
  mixed  sequence i uses LoRA adapter i % 64 (rank 16 on all 7 projections, 64 device slots);
each eagerly (`--enforce-eager`) and with CUDA graphs for decode: base steps replay the base graph of
their bucket, mixed steps the LoRA graph (fixed-shape LoRA metadata, `kernels/capturable.py`), so the
batch-1 ITL is compared eager vs graphs for both workloads.

Default model: hidden 2048, 16 layers, 32 heads / 8 KV heads (head_dim 64), MLP 8192 (~0.97B
parameters without the embedding; byte vocabulary). `--dry-run`: tiny shapes on CPU, attention
through the Triton interpreter, the graph path through its eager template (same buffers, same
padding), so the GPU run works first time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Row:
    workload: str
    mode: str  # eager | graphs
    seqs: int
    tok_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    itl_p95_ms: float
    itl_b1_ms: float
    graph_replays: int
    lora_graph_replays: int = 0
    notes: list[str] = field(default_factory=list)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def build_model(root: str, hidden: int, layers: int, heads: int, kv_heads: int, inter: int) -> str:
    from server.model.default_model import save_llama_family

    path = os.path.join(root, f"llama-h{hidden}-l{layers}-a{heads}-kv{kv_heads}-i{inter}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        tmp = path + f".tmp{os.getpid()}"
        save_llama_family(tmp, "llama", dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=inter,
                                              num_attention_heads=heads, num_key_value_heads=kv_heads,
                                              max_position_embeddings=4096), seed=0)
        os.rename(tmp, path)
    return path


def random_lora(info, rank: int, seed: int):  # noqa: ANN001, ANN201
    """A LoRA adapter on all 7 projections with random A [r, in], B [out, r] at an nn.Linear-like scale."""
    import torch

    from server.families import LORA, AdapterSpec
    from server.families.lora import LoraAdapter, LoraModuleWeights

    g = torch.Generator().manual_seed(seed)
    shapes = {m: info.module_shape(m) for m in
              ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    modules = {(layer, m): LoraModuleWeights(torch.randn(rank, n_in, generator=g) / n_in ** 0.5,
                                             torch.randn(n_out, rank, generator=g) / rank ** 0.5, 2.0)
               for layer in range(info.num_layers) for m, (n_in, n_out) in shapes.items()}
    return LoraAdapter(family=LORA, spec=AdapterSpec("LORA", None), modules=modules)


def run_workload(runner, prompts: list[list[int]], slots: list[int], output_len: int, budget: int) -> dict:  # noqa: ANN001
    """Prefill (chunked under `budget` tokens per step), then decode all; timings in seconds."""
    import torch

    from server.model.runner import SeqChunk

    bs = runner.info.block_size
    n = len(prompts)
    per_seq = -(-(max(len(p) for p in prompts) + output_len) // bs)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(n)]
    seqs = [list(p) for p in prompts]
    done = [0] * n  # prompt tokens computed
    first: list[float | None] = [None] * n
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    while any(d < len(p) for d, p in zip(done, prompts, strict=True)):
        chunks, left = [], budget
        for i, p in enumerate(prompts):
            if done[i] < len(p) and left > 0:
                k = min(len(p) - done[i], left)
                chunks.append(SeqChunk(i, p[done[i]:done[i] + k], done[i], tables[i], done[i] + k == len(p),
                                       adapter_slot=slots[i]))
                left -= k
        logits = runner.execute(chunks)
        nxt = logits.argmax(-1).tolist()
        now = time.perf_counter()
        for c in [c for c in chunks if c.want_logits]:
            seqs[c.seq_id].append(nxt.pop(0))
            first[c.seq_id] = now - t0
        for c in chunks:
            done[c.seq_id] += len(c.token_ids)
    itl = []
    for _ in range(output_len - 1):
        chunks = [SeqChunk(i, [s[-1]], len(s) - 1, tables[i], True, adapter_slot=slots[i]) for i, s in enumerate(seqs)]
        t1 = time.perf_counter()
        nxt = runner.execute(chunks).argmax(-1).tolist()  # .tolist() syncs: the step is complete
        itl.append(time.perf_counter() - t1)
        for s, t in zip(seqs, nxt, strict=True):
            s.append(t)
    total = time.perf_counter() - t0
    return {"tokens": n * output_len, "seconds": total, "ttft": [f for f in first if f is not None], "itl": itl,
            "outputs": [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]}


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (interpreter), whole path")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--inter", type=int, default=8192)
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--num-seqs", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--budget", type=int, default=2048, help="tokens per prefill step")
    ap.add_argument("--cache", default="/tmp/peftserve-bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.hidden, args.layers, args.heads, args.kv_heads, args.inter = 64, 2, 4, 2, 128
        args.adapters, args.rank, args.num_seqs, args.prompt_len, args.output_len, args.budget = 4, 4, 6, 9, 4, 24

    import torch

    from server.model.runner import ModelRunner

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        sys.exit("gpu_e2e: no CUDA device; use --dry-run for the CPU smoke run")
    t_build = time.perf_counter()
    model = build_model(args.cache, args.hidden, args.layers, args.heads, args.kv_heads, args.inter)
    max_len = args.prompt_len + args.output_len + 16
    blocks = args.num_seqs * (-(-max_len // 16)) + 8
    runner = ModelRunner(model, device="cuda" if cuda else "cpu", dtype="auto", block_size=16, num_blocks=blocks,
                         max_model_len=max_len, max_adapters=args.adapters, max_rank=args.rank,
                         max_num_seqs=args.num_seqs, max_batch_tokens=max(args.budget, args.num_seqs),
                         attention_backend="triton", enforce_eager=False,
                         graph_template=not cuda)  # CPU dry run: the graphs' padded templates, eagerly
    graphs = runner.graphs
    assert graphs is not None
    for s in range(args.adapters):
        runner.load_adapter(s, random_lora(runner.info.shapes, args.rank, seed=s))
    params = sum(t.numel() for t in runner.decoder.__dict__.values() if isinstance(t, torch.Tensor))
    params += sum(t.numel() for w in runner.decoder.layers for t in w.__dict__.values() if isinstance(t, torch.Tensor))
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu (dry run)'}; dtype {runner.dtype}; "
          f"{params / 1e9:.2f}B params; {args.adapters} adapters r{args.rank}; "
          f"set-up {time.perf_counter() - t_build:.1f}s")

    import random

    rng = random.Random(0)
    vocab = runner.spec.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(args.num_seqs)]
    workloads = {"base": [-1] * args.num_seqs, "mixed": [i % args.adapters for i in range(args.num_seqs)]}
    rows: list[Row] = []
    outputs: dict[tuple[str, str], list] = {}
    for mode in ("eager", "graphs"):
        runner.graphs = graphs if mode == "graphs" else None
        for name, slots in workloads.items():
            # warm-up: compiles the kernels and captures the full-batch and batch-1 decode graphs
            run_workload(runner, prompts, slots, 2, args.budget)
            run_workload(runner, prompts[:1], slots[:1], 2, args.budget)
            replays0, lora0 = graphs.replays, graphs.lora_replays
            r = run_workload(runner, prompts, slots, args.output_len, args.budget)
            b1 = run_workload(runner, prompts[:1], slots[:1], max(4, args.output_len // 4), args.budget)
            outputs[(name, mode)] = r["outputs"]
            notes = []
            rows.append(Row(workload=name, mode=mode, seqs=args.num_seqs, tok_per_s=r["tokens"] / r["seconds"],
                            ttft_p50_ms=1e3 * pct(r["ttft"], 0.5), ttft_p95_ms=1e3 * pct(r["ttft"], 0.95),
                            itl_p50_ms=1e3 * pct(r["itl"], 0.5), itl_p95_ms=1e3 * pct(r["itl"], 0.95),
                            itl_b1_ms=1e3 * statistics.median(b1["itl"]),
                            graph_replays=graphs.replays - replays0 if mode == "graphs" else 0,
                            lora_graph_replays=graphs.lora_replays - lora0 if mode == "graphs" else 0, notes=notes))
    # the same tokens either way (greedy): graphs change nothing but launch overhead
    for name in workloads:
        same = sum(a == b for a, b in zip(outputs[(name, "eager")], outputs[(name, "graphs")], strict=True))
        rows[-1 if name == "mixed" else -2].notes.append(f"{same}/{args.num_seqs} sequences equal to eager")

    head = (f"{'workload':<8} {'mode':<6} | {'tok/s':>9} {'vs base':>7} | {'TTFT p50':>8} {'p95':>8} | "
            f"{'ITL p50':>8} {'p95':>8} | {'ITL b=1':>8} | notes")
    print(head + "\n" + "-" * len(head))
    base = {r.mode: r.tok_per_s for r in rows if r.workload == "base"}
    for r in rows:
        print(f"{r.workload:<8} {r.mode:<6} | {r.tok_per_s:9.1f} {r.tok_per_s / base[r.mode]:6.2f}x | "
              f"{r.ttft_p50_ms:8.1f} {r.ttft_p95_ms:8.1f} | {r.itl_p50_ms:8.2f} {r.itl_p95_ms:8.2f} | "
              f"{r.itl_b1_ms:8.2f} | {'; '.join(r.notes)}")
    by = {(r.workload, r.mode): r for r in rows}
    for name in workloads:
        e_b1, g_b1 = by[(name, "eager")].itl_b1_ms, by[(name, "graphs")].itl_b1_ms
        print(f"{name}: batch-1 ITL eager/graphs {e_b1 / g_b1:.2f}x (target >= 2x); "
              f"graph replays {by[(name, 'graphs')].graph_replays} (LoRA {by[(name, 'graphs')].lora_graph_replays})")
    for mode in ("eager", "graphs"):
        print(f"mixed/base tokens/s ({mode}): {by[('mixed', mode)].tok_per_s / by[('base', mode)].tok_per_s:.2f} "
              "(target >= 0.8)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "dtype": str(runner.dtype), "params": params,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
