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

Diagnostics (in the JSON's "diagnostics" and printed after the table; `bench/gpu_diag.py`):
  graphs vs eager  per sequence the first differing greedy token; the mixed eager run repeated (does eager
                   even repeat itself?); teacher-forced decode steps (same tokens, positions and KV history)
                   through the graphs and eagerly: max |logit diff| against the logits' scale and argmax
                   agreement; both against a float32 Hugging Face twin on `--ref-seqs` sequences; a verdict
                   (rounding when the graph path's error vs fp32 is <= 2x eager's and flips are near ties);
  prefill          per step of each measured run: wall, host (execute returned) and build_step ms, graph
                   captures and caching-allocator counters; the mixed prefill alternated with and without the
                   graphs attached after every capture, then again with every captured graph dropped;
  --profile        torch.profiler over a few decode steps (mixed eager, mixed graphs, base graphs) and the
                   mixed prefill (eager, graphs attached): top CUDA kernels and top CPU-side calls per step.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any


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
    # per prefill step of the measured run: wall ms (synced), host ms (execute returned), build_step ms
    prefill_ms: list[float] = field(default_factory=list)
    prefill_host_ms: list[float] = field(default_factory=list)
    prefill_build_ms: list[float] = field(default_factory=list)
    graph_captures: int = 0  # during the measured runs (0 expected: the warm-up captured)
    allocator: dict[str, int] = field(default_factory=dict)  # caching-allocator counter deltas, measured runs


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


def block_tables(runner, n: int, total_len: int) -> list[list[int]]:  # noqa: ANN001
    """Disjoint block tables for n sequences of up to total_len tokens."""
    per_seq = -(-total_len // runner.info.block_size)
    return [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(n)]


def _sync(runner) -> None:  # noqa: ANN001
    import torch

    if runner.device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def timed_build(log: list[float]) -> Iterator[None]:
    """Record the host time of every `build_step` the runner calls (the step's metadata), in seconds."""
    import server.model.runner as runner_mod

    orig = runner_mod.build_step

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            log.append(time.perf_counter() - t)

    runner_mod.build_step = timed
    try:
        yield
    finally:
        runner_mod.build_step = orig


def alloc_counters(runner) -> dict[str, int]:  # noqa: ANN001
    """The CUDA caching allocator's cumulative counters (cudaMalloc / cudaFree calls, retries after OOM)."""
    import torch

    if runner.device.type != "cuda":
        return {}
    st = torch.cuda.memory_stats()
    return {k: int(st.get(k, 0)) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries",
                                           "num_sync_all_streams")}


def prefill(runner, prompts: list[list[int]], slots: list[int], budget: int, tables: list[list[int]],  # noqa: ANN001
            builds: list[float] | None = None) -> tuple[list[list[int]], list[float | None], list[dict], float]:
    """Chunked prefill under `budget` tokens per step. Returns the sequences (prompt + first token), the time
    each got its first token (s after the returned start), and per step: tokens, wall ms (synced), host ms
    (until execute returned: build + launches + any sync inside) and build_step ms (when `builds` records)."""
    from server.model.runner import SeqChunk

    n = len(prompts)
    seqs = [list(p) for p in prompts]
    done = [0] * n  # prompt tokens computed
    first: list[float | None] = [None] * n
    steps: list[dict] = []
    _sync(runner)
    t0 = time.perf_counter()
    while any(d < len(p) for d, p in zip(done, prompts, strict=True)):
        chunks, left = [], budget
        for i, p in enumerate(prompts):
            if done[i] < len(p) and left > 0:
                k = min(len(p) - done[i], left)
                chunks.append(SeqChunk(i, p[done[i]:done[i] + k], done[i], tables[i], done[i] + k == len(p),
                                       adapter_slot=slots[i]))
                left -= k
        nb = len(builds) if builds is not None else 0
        ts = time.perf_counter()
        logits = runner.execute(chunks)
        th = time.perf_counter()
        nxt = logits.argmax(-1).tolist()  # syncs: the step is complete
        now = time.perf_counter()
        steps.append({"tokens": sum(len(c.token_ids) for c in chunks), "seqs": len(chunks),
                      "ms": 1e3 * (now - ts), "host_ms": 1e3 * (th - ts),
                      "build_ms": 1e3 * builds[-1] if builds is not None and len(builds) > nb else None})
        for c in [c for c in chunks if c.want_logits]:
            seqs[c.seq_id].append(nxt.pop(0))
            first[c.seq_id] = now - t0
        for c in chunks:
            done[c.seq_id] += len(c.token_ids)
    return seqs, first, steps, t0


def decode_step(runner, seqs: list[list[int]], tables: list[list[int]], slots: list[int]):  # noqa: ANN001, ANN201
    """Logits (device tensor, not synced) of one decode step over every sequence's last token."""
    from server.model.runner import SeqChunk

    return runner.execute([SeqChunk(i, [s[-1]], len(s) - 1, tables[i], True, adapter_slot=slots[i])
                           for i, s in enumerate(seqs)])


def decode_bytes_bound(params: int, adapters: list, distinct: int, itemsize: int) -> dict[str, float]:  # noqa: ANN001
    """What a memory-bound decode step reads: the base weights once, plus the A/B of every distinct adapter in
    the batch (the first `distinct` adapters; all alike here). `ratio` = base / (base + LoRA) bytes: the
    mixed/base tokens/s a step reaches when both stream their weights at the same bandwidth (KV ignored)."""
    lora = sum(sum(w.a.numel() + w.b.numel() for w in ad.modules.values()) for ad in adapters[:distinct]) * itemsize
    base = params * itemsize
    return {"base_mb": base / 1e6, "lora_mb": lora / 1e6, "distinct": distinct, "ratio": base / (base + lora)}


def run_workload(runner, prompts: list[list[int]], slots: list[int], output_len: int, budget: int,  # noqa: ANN001
                 builds: list[float] | None = None) -> dict:
    """Prefill (chunked under `budget` tokens per step), then decode all; timings in seconds."""
    n = len(prompts)
    tables = block_tables(runner, n, max(len(p) for p in prompts) + output_len)
    seqs, first, pre_steps, t0 = prefill(runner, prompts, slots, budget, tables, builds)
    itl = []
    for _ in range(output_len - 1):
        t1 = time.perf_counter()
        nxt = decode_step(runner, seqs, tables, slots).argmax(-1).tolist()  # .tolist() syncs: the step is complete
        itl.append(time.perf_counter() - t1)
        for s, t in zip(seqs, nxt, strict=True):
            s.append(t)
    total = time.perf_counter() - t0
    return {"tokens": n * output_len, "seconds": total, "ttft": [f for f in first if f is not None], "itl": itl,
            "prefill_steps": pre_steps, "outputs": [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]}


def teacher_forced(runner, graphs, prompts: list[list[int]], slots: list[int], steps: int,  # noqa: ANN001
                   budget: int, total_len: int) -> dict:
    """The same decode steps (tokens, positions, KV history) through the graphs and eagerly: prefill eagerly,
    then per step run the graph path, then the eager one (whose K/V for that position is what stays) and feed
    eager's argmax. Returns the [steps, seqs, vocab] float32 logits of both (on the host) and the sequences."""
    import torch

    tables = block_tables(runner, len(prompts), total_len)
    runner.graphs = None
    seqs, _, _, _ = prefill(runner, prompts, slots, budget, tables)
    eager, graph = [], []
    for _ in range(steps):
        runner.graphs = graphs
        g = decode_step(runner, seqs, tables, slots).float().cpu()
        runner.graphs = None
        e = decode_step(runner, seqs, tables, slots).float().cpu()
        eager.append(e)
        graph.append(g)
        for s, t in zip(seqs, e.argmax(-1).tolist(), strict=True):
            s.append(t)
    return {"eager": torch.stack(eager), "graphs": torch.stack(graph), "seqs": seqs}


def profile_steps(runner, graphs, prompts: list[list[int]], slots: list[int], budget: int, mode: str,  # noqa: ANN001
                  phase: str, steps: int, total_len: int) -> dict:
    """torch.profiler over the whole chunked prefill (`phase` "prefill") or over `steps` decode steps after the
    prefill and one unprofiled step ("decode"). Returns per step: the top CUDA kernels by device time (on CUDA)
    and the top CPU-side entries by self CPU time (ops and CUDA runtime calls: a cudaMalloc or a stream sync
    shows there), plus the wall ms per step under the profiler (`bench.gpu_diag.top_ops`)."""
    from torch.profiler import ProfilerActivity, profile

    from bench.gpu_diag import top_ops

    runner.graphs = graphs if mode == "graphs" else None
    tables = block_tables(runner, len(prompts), total_len)
    cuda = runner.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if phase == "prefill":
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            _, _, pre, _ = prefill(runner, prompts, slots, budget, tables)
            wall = time.perf_counter() - t
        steps = len(pre)
    else:
        seqs, _, _, _ = prefill(runner, prompts, slots, budget, tables)

        def step() -> None:
            for s, t in zip(seqs, decode_step(runner, seqs, tables, slots).argmax(-1).tolist(), strict=True):
                s.append(t)

        step()
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                step()
            wall = time.perf_counter() - t
    avg = prof.key_averages()
    return {"phase": phase, "steps": steps, "wall_ms_per_step": 1e3 * wall / steps,  # with the profiler's overhead
            "kernels": top_ops(avg, steps, True) if cuda else None, "cpu": top_ops(avg, steps, False)}


def graph_divergence(runner, graphs, twin, adapters: list, prompts: list[list[int]], slots: list[int],  # noqa: ANN001
                     args: argparse.Namespace, total_len: int) -> dict[str, Any]:
    """Teacher-forced eager vs graphs logits of one workload, and (with `twin`) both against the float32 twin on
    the first `--ref-seqs` sequences; the verdict (`bench.gpu_diag.verdict`)."""
    import torch

    from bench.gpu_diag import compare_logits, verdict

    tf = teacher_forced(runner, graphs, prompts, slots, args.tf_steps, args.budget, total_len)
    out: dict[str, Any] = {"teacher_forced": compare_logits(tf["eager"].flatten(0, 1), tf["graphs"].flatten(0, 1))}
    ref = None
    if twin is not None:
        refs, es, gs = [], [], []
        p = args.prompt_len
        for i in range(min(args.ref_seqs, args.num_seqs)):
            twin.set_adapter(adapters[slots[i]].weights() if slots[i] >= 0 else None)
            # decode step k fed token p + k at position p + k: the twin's row p + k predicts the same token
            refs.append(twin.logits(tf["seqs"][i][:p + args.tf_steps])[p:p + args.tf_steps].cpu())
            es.append(tf["eager"][:, i])
            gs.append(tf["graphs"][:, i])
        ref_rows = torch.cat(refs)
        ref = out["fp32"] = {"eager": compare_logits(ref_rows, torch.cat(es)),
                             "graphs": compare_logits(ref_rows, torch.cat(gs))}
    out["verdict"] = verdict(out["teacher_forced"], ref)
    return out


def _p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


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
    ap.add_argument("--tf-steps", type=int, default=8,
                    help="teacher-forced decode steps compared eager vs graphs (0: skip the divergence check)")
    ap.add_argument("--ref-seqs", type=int, default=4,
                    help="sequences per workload also compared against a float32 Hugging Face twin (0: none)")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over a few decode steps (mixed eager, mixed graphs, base graphs) and over "
                         "the mixed prefill (eager, graphs attached): top kernels and CPU-side calls")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--cache", default="/tmp/peftserve-bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.hidden, args.layers, args.heads, args.kv_heads, args.inter = 64, 2, 4, 2, 128
        args.adapters, args.rank, args.num_seqs, args.prompt_len, args.output_len, args.budget = 4, 4, 6, 9, 4, 24
        args.tf_steps, args.ref_seqs, args.profile_steps = min(args.tf_steps, 2), min(args.ref_seqs, 2), 1
    if args.tf_steps >= args.output_len or args.profile_steps + 1 >= args.output_len:
        ap.error(f"--tf-steps {args.tf_steps} and --profile-steps {args.profile_steps} + 1 must be < --output-len "
                 f"{args.output_len} (the KV tables' length)")

    import torch

    from bench.gpu_diag import Fp32Twin, first_diffs
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
    adapters = [random_lora(runner.info.shapes, args.rank, seed=s) for s in range(args.adapters)]
    for s, adapter in enumerate(adapters):
        runner.load_adapter(s, adapter)
    params = sum(t.numel() for t in runner.decoder.__dict__.values() if isinstance(t, torch.Tensor))
    params += sum(t.numel() for w in runner.decoder.layers for t in w.__dict__.values() if isinstance(t, torch.Tensor))
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu (dry run)'}; dtype {runner.dtype}; "
          f"{params / 1e9:.2f}B params; {args.adapters} adapters r{args.rank}; "
          f"set-up {time.perf_counter() - t_build:.1f}s")
    bound = decode_bytes_bound(params, adapters, min(args.num_seqs, args.adapters), runner.dtype.itemsize)
    print(f"a full decode step reads {bound['base_mb']:.1f} MB of base weights and {bound['lora_mb']:.1f} MB of "
          f"LoRA A/B ({bound['distinct']} distinct adapters): mixed/base is at most {bound['ratio']:.2f} when "
          "both run at the same bandwidth")

    import random

    rng = random.Random(0)
    vocab = runner.spec.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(args.num_seqs)]
    workloads = {"base": [-1] * args.num_seqs, "mixed": [i % args.adapters for i in range(args.num_seqs)]}
    total_len = args.prompt_len + args.output_len
    rows: list[Row] = []
    outputs: dict[tuple[str, str], list] = {}
    builds: list[float] = []
    diag: dict[str, Any] = {}
    with timed_build(builds):
        for mode in ("eager", "graphs"):
            runner.graphs = graphs if mode == "graphs" else None
            for name, slots in workloads.items():
                # warm-up: compiles the kernels and captures the full-batch and batch-1 decode graphs
                run_workload(runner, prompts, slots, 2, args.budget)
                run_workload(runner, prompts[:1], slots[:1], 2, args.budget)
                replays0, lora0, captures0, alloc0 = graphs.replays, graphs.lora_replays, graphs.captures, \
                    alloc_counters(runner)
                r = run_workload(runner, prompts, slots, args.output_len, args.budget, builds)
                b1 = run_workload(runner, prompts[:1], slots[:1], max(4, args.output_len // 4), args.budget)
                alloc1 = alloc_counters(runner)
                outputs[(name, mode)] = r["outputs"]
                pre = r["prefill_steps"]
                rows.append(Row(workload=name, mode=mode, seqs=args.num_seqs, tok_per_s=r["tokens"] / r["seconds"],
                                ttft_p50_ms=1e3 * pct(r["ttft"], 0.5), ttft_p95_ms=1e3 * pct(r["ttft"], 0.95),
                                itl_p50_ms=1e3 * pct(r["itl"], 0.5), itl_p95_ms=1e3 * pct(r["itl"], 0.95),
                                itl_b1_ms=1e3 * statistics.median(b1["itl"]),
                                graph_replays=graphs.replays - replays0 if mode == "graphs" else 0,
                                lora_graph_replays=graphs.lora_replays - lora0 if mode == "graphs" else 0,
                                prefill_ms=[p["ms"] for p in pre], prefill_host_ms=[p["host_ms"] for p in pre],
                                prefill_build_ms=[p["build_ms"] for p in pre if p["build_ms"] is not None],
                                graph_captures=graphs.captures - captures0,
                                allocator={k: alloc1[k] - alloc0[k] for k in alloc1}))
        # eager twice: if eager does not even repeat itself (split-K atomics), graphs cannot be asked to
        runner.graphs = None
        again = run_workload(runner, prompts, workloads["mixed"], args.output_len, args.budget)
        diag["eager_repeat_mixed"] = {k: v for k, v in first_diffs(outputs[("mixed", "eager")],
                                                                   again["outputs"]).items() if k != "first_diff"}
        # question 2: prefill never replays a graph, so run the same mixed prefill alternately with and without
        # the graphs attached, after every capture: equal times -> state (captures, allocator), else the path
        probe: dict[str, list[float]] = {"eager": [], "graphs": []}
        probe_host: dict[str, list[float]] = {"eager": [], "graphs": []}
        probe_build: dict[str, list[float]] = {"eager": [], "graphs": []}
        alloc0 = alloc_counters(runner)
        for mode in ("eager", "graphs", "eager", "graphs"):
            runner.graphs = graphs if mode == "graphs" else None
            steps = run_workload(runner, prompts, workloads["mixed"], 1, args.budget, builds)["prefill_steps"]
            probe[mode] += [p["ms"] for p in steps]
            probe_host[mode] += [p["host_ms"] for p in steps]
            probe_build[mode] += [p["build_ms"] for p in steps if p["build_ms"] is not None]
        alloc1 = alloc_counters(runner)
        diag["prefill_probe_mixed"] = {
            mode: {"step_ms_p50": _p50(probe[mode]), "host_ms_p50": _p50(probe_host[mode]),
                   "build_ms_p50": _p50(probe_build[mode]), "step_ms": probe[mode]} for mode in probe}
        diag["prefill_probe_mixed"]["allocator"] = {k: alloc1[k] - alloc0[k] for k in alloc1}
        # then without any captured graph (their private memory pool freed): fast again -> the captures' state
        dropped = len(graphs.graphs)
        graphs.graphs.clear()  # the next graph step captures anew
        if cuda:
            torch.cuda.empty_cache()
        runner.graphs = None
        after: list[float] = []
        for _ in range(2):
            r = run_workload(runner, prompts, workloads["mixed"], 1, args.budget)
            after += [p["ms"] for p in r["prefill_steps"]]
        diag["prefill_probe_mixed"]["eager_after_dropping_graphs"] = {"graphs_dropped": dropped,
                                                                      "step_ms_p50": _p50(after), "step_ms": after}

    # question 1: the same tokens either way (greedy)? where they part, and whether that is rounding
    diverge: dict[str, Any] = {}
    twin = None
    if args.tf_steps and args.ref_seqs:
        try:
            twin = Fp32Twin(model, runner.device, runner.dtype)
        except Exception as e:  # noqa: BLE001 - the reference is optional: say why it is missing
            diag["fp32_twin_error"] = f"{type(e).__name__}: {e}"
            print(f"fp32 twin unavailable: {diag['fp32_twin_error']}")
    for name, slots in workloads.items():
        fd = first_diffs(outputs[(name, "eager")], outputs[(name, "graphs")])
        entry: dict[str, Any] = {"first_diff": fd}
        if args.tf_steps:
            try:  # a diagnostic that fails must not cost the run's other figures: say why and go on
                entry.update(graph_divergence(runner, graphs, twin, adapters, prompts, slots, args, total_len))
            except Exception as e:  # noqa: BLE001
                entry["error"] = f"{type(e).__name__}: {e}"
                print(f"{name} teacher-forced check failed: {entry['error']}")
        diverge[name] = entry
        row = next(r for r in rows if r.workload == name and r.mode == "graphs")
        row.notes.append(f"{args.num_seqs - fd['differ']}/{args.num_seqs} sequences equal to eager")
        if fd["differ"]:
            row.notes.append(f"first differing token min {fd['min']} median {fd['median']} "
                             f"({fd['at_token_0']} at token 0, {fd['at_token_1']} at 1)")
        v = entry.get("verdict")
        if v is not None:
            x = v["graph_over_eager_err"]
            row.notes.append(f"verdict: {'rounding' if v['ok'] else 'SUSPECT'} (teacher-forced argmax agree "
                             f"{100 * entry['teacher_forced']['argmax_agree']:.0f} %"
                             + (f", err vs fp32 {x:.2f}x eager's)" if x is not None else ")"))
    diag["graphs_vs_eager"] = diverge
    del twin

    if args.profile:
        prof = {}
        for name, mode, phase in (("mixed", "eager", "decode"), ("mixed", "graphs", "decode"),
                                  ("base", "graphs", "decode"), ("mixed", "eager", "prefill"),
                                  ("mixed", "graphs", "prefill")):
            try:
                prof[f"{name} {mode} {phase}"] = profile_steps(runner, graphs, prompts, workloads[name], args.budget,
                                                               mode, phase, args.profile_steps, total_len)
            except Exception as e:  # noqa: BLE001
                diag.setdefault("errors", []).append(f"profile {name} {mode} {phase}: {type(e).__name__}: {e}")
                print(diag["errors"][-1])
        diag["profile"] = prof
    runner.graphs = graphs

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
    print_diagnostics(rows, diag)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "dtype": str(runner.dtype), "params": params, "decode_bytes_bound": bound,
                       "rows": [asdict(r) for r in rows], "diagnostics": diag}, f, indent=1)
        print(f"wrote {args.out}")
    return rows


def print_diagnostics(rows: list[Row], diag: dict[str, Any]) -> None:
    """The prefill-step table (question 2), the graphs-vs-eager verdicts (1) and the profiles (3)."""
    print("\nprefill steps (measured run): p50 of wall ms / host ms (execute returned) / build_step ms")
    print(f"{'workload':<8} {'mode':<6} | {'steps':>5} {'wall':>8} {'host':>8} {'build':>8} | captures | allocator")
    for r in rows:
        print(f"{r.workload:<8} {r.mode:<6} | {len(r.prefill_ms):5d} {_p50(r.prefill_ms):8.2f} "
              f"{_p50(r.prefill_host_ms):8.2f} {_p50(r.prefill_build_ms):8.2f} | {r.graph_captures:8d} | "
              f"{r.allocator or '-'}")
    probe = diag.get("prefill_probe_mixed")
    if probe:
        print("mixed prefill probe (after all captures, modes alternated): "
              + "; ".join(f"{m} wall {probe[m]['step_ms_p50']:.2f} host {probe[m]['host_ms_p50']:.2f} "
                          f"build {probe[m]['build_ms_p50']:.2f} ms" for m in ("eager", "graphs"))
              + f"; allocator {probe['allocator'] or '-'}; eager after dropping "
              f"{probe['eager_after_dropping_graphs']['graphs_dropped']} captured graphs: wall "
              f"{probe['eager_after_dropping_graphs']['step_ms_p50']:.2f} ms")
    rep = diag.get("eager_repeat_mixed")
    if rep:
        print(f"mixed eager run twice: {rep['seqs'] - rep['differ']}/{rep['seqs']} sequences equal"
              + (f" (first differing token min {rep['min']}, median {rep['median']})" if rep["differ"] else ""))
    for name, d in diag.get("graphs_vs_eager", {}).items():
        tf = d.get("teacher_forced")
        if tf is None:
            continue
        line = (f"{name} teacher-forced graphs vs eager: {tf['rows']} rows, max |diff| {tf['max_abs']:.3g} "
                f"(rel {tf['rel']:.2g} of max |logit| {tf['scale']:.3g}), "
                f"argmax agree {100 * tf['argmax_agree']:.1f} %")
        if "fp32" in d:
            fe, fg = d["fp32"]["eager"], d["fp32"]["graphs"]
            line += (f"; vs fp32: eager max {fe['max_abs']:.3g} agree {100 * fe['argmax_agree']:.0f} %, "
                     f"graphs max {fg['max_abs']:.3g} agree {100 * fg['argmax_agree']:.0f} %")
        print(line)
        print(f"{name} verdict: {d['verdict']['text']}")
    for key, p in diag.get("profile", {}).items():
        for table in (p["kernels"], p["cpu"]):
            if table is None:
                continue
            print(f"\nprofile {key}: {p['steps']} steps, {table['activity']} {table['total_us_per_step']:.0f} us/step "
                  f"(wall {p['wall_ms_per_step']:.2f} ms/step under the profiler)")
            print(f"  {'us/step':>9} {'calls/step':>10}  name")
            for t in table["top"]:
                print(f"  {t['us_per_step']:9.1f} {t['calls_per_step']:10.1f}  {t['name']}")


if __name__ == "__main__":
    main()
