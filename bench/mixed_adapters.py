"""Mixed-adapter throughput: the same requests served base-only, with K distinct adapters, and by `peft`.

    .venv/bin/python -m bench.mixed_adapters                   # 32 requests x (64 in, 32 out), hidden 1024
    .venv/bin/python -m bench.mixed_adapters --quick           # tiny smoke run (K = 1, 2)

Workloads, all greedy with a fixed output length, all prompts submitted at once:
  (a) our engine, base model only;
  (b) our engine, K distinct LoRA adapters (rank 16, all 7 projections), request i uses adapter i % K;
  (c) `peft` one adapter at a time: the requests grouped by adapter, one batched `generate` per group,
      groups run one after another (`set_adapter` over a PeftModel holding all K adapters);
  (d) `peft` mixed batch: one batched `generate(..., adapter_names=[...])`;
  and through our engine K prefix-tuning adapters, K prompt-tuning adapters, and a mix of
  base + LoRA + prefix + prompt requests (request i: kind i % 4); K IA3 adapters (k, v, down_proj; down
  feed-forward), K DoRA adapters (rank 16, all 7 projections), K AdapterHub bottleneck adapters (SeqBn,
  reduction_factor 16), and the all-families mix (base, LoRA, prefix, prompt, IA3, DoRA, bottleneck: kind i % 7).

`--residency` runs the many-adapters benchmark instead (issue 18): a closed loop of 32 concurrent requests
over K = 8, 32, 64, 128 distinct LoRA adapters (rank 16; `--mixed-ranks`: r=8 and r=64 alternating) with
`--adapter-memory` sized for 64 rank-16 adapters, tokens/s and TTFT p50/p99 against K = 8 timed alternately
on a reference engine that never loads; K = 128 also against K = 64 (what fits) on that engine; and
`--max-adapters 8` at K = 32 against the 8-sequence bound (8 concurrent requests, K = 8, no loads).
Each row runs `--rounds` interleaved A/B rounds (order flipped every round) and prints the best-of ratio
and the median [min-max] of the per-round ratios, of wall-clock tokens/s and of tokens per CPU second of the
process (the work itself, far less moved by other processes on a shared machine); the K = 8 row is the same
configuration on both sides (the noise row). Every timed run sends fresh random prompts, so no run hits the
prefix cache with what an earlier run sent (each row prints the cached prompt tokens of both sides: 0).

"ideal(mem)" is the memory-bound ideal of a decode step: base bytes (weights + KV read) over base plus
the adapters' extra bytes (distinct LoRA A/B, prefix / virtual-token KV). "ideal(flop)" is the same
ratio for FLOPs, which is closer to what bounds a 2-core CPU in fp32 at this batch size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

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
from server.threads import engine_threads

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_CACHE = "/tmp/peftserve-bench/adapters"


# ---- adapters, made with peft on the bench checkpoint (cached on disk) ---------------------------------------
def _load_base(model_dir: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _save_atomic(model: Any, out_dir: str) -> None:
    tmp = out_dir + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    os.rename(tmp, out_dir)


def _adapter_dirs(model_dir: str, root: str, stem: str, k: int) -> tuple[list[str], list[str]]:
    """(the K cached adapter dirs `<root>/<model>/<stem>-<i>`, those not written yet); creates the parent."""
    base = os.path.join(root, os.path.basename(os.path.normpath(model_dir)))
    dirs = [os.path.join(base, f"{stem}-{i}") for i in range(k)]
    missing = [d for d in dirs if not os.path.isfile(os.path.join(d, "adapter_config.json"))]
    if missing:
        os.makedirs(base, exist_ok=True)
    return dirs, missing


def make_lora_adapters(model_dir: str, k: int, rank: int, root: str = ADAPTER_CACHE) -> list[str]:
    """K LoRA adapters (random A and B as `init_lora_weights=False` leaves them), seed i for adapter i."""
    from peft import LoraConfig, get_peft_model

    dirs, missing = _adapter_dirs(model_dir, root, f"lora-r{rank}", k)
    if missing:
        model = get_peft_model(_load_base(model_dir), LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, init_lora_weights=False, lora_dropout=0.0,
            task_type="CAUSAL_LM"))
        for d in missing:
            torch.manual_seed(int(d.rsplit("-", 1)[1]))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))  # nn.Linear's own init
            _save_atomic(model, d)
    return dirs


def make_prompt_learning_adapters(model_dir: str, kind: str, k: int, num_virtual_tokens: int,
                                  root: str = ADAPTER_CACHE) -> list[str]:
    """K prefix-tuning ("prefix") or prompt-tuning ("prompt") adapters with random weights."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    dirs, missing = _adapter_dirs(model_dir, root, f"{kind}-v{num_virtual_tokens}", k)
    if missing:
        cls = {"prefix": PrefixTuningConfig, "prompt": PromptTuningConfig}[kind]
        model = get_peft_model(_load_base(model_dir), cls(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens))
        for d in missing:
            torch.manual_seed(int(d.rsplit("-", 1)[1]))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        p.normal_(0.0, 1.0 if "embedding" in name else 0.5)
            _save_atomic(model, d)
    return dirs


def make_ia3_adapters(model_dir: str, k: int, root: str = ADAPTER_CACHE) -> list[str]:
    """K IA3 adapters on k_proj, v_proj and down_proj (down scales its input), random vectors around 1."""
    from peft import IA3Config, get_peft_model

    dirs, missing = _adapter_dirs(model_dir, root, "ia3-kvd", k)
    if missing:
        model = get_peft_model(_load_base(model_dir), IA3Config(
            task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
            init_ia3_weights=False))
        for d in missing:
            torch.manual_seed(int(d.rsplit("-", 1)[1]))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "ia3_l" in name:
                        p.copy_(1.0 + 0.2 * torch.randn_like(p))
            _save_atomic(model, d)
    return dirs


def make_dora_adapters(model_dir: str, k: int, rank: int, root: str = ADAPTER_CACHE) -> list[str]:
    """K DoRA adapters (use_dora=True) on all 7 projections, random A/B and magnitudes."""
    from peft import LoraConfig, get_peft_model

    dirs, missing = _adapter_dirs(model_dir, root, f"dora-r{rank}", k)
    if missing:
        model = get_peft_model(_load_base(model_dir), LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, init_lora_weights=False, use_dora=True,
            lora_dropout=0.0, task_type="CAUSAL_LM"))
        for d in missing:
            torch.manual_seed(int(d.rsplit("-", 1)[1]))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_magnitude_vector" in name:
                        p.mul_(0.9 + 0.2 * torch.rand_like(p))
                    elif "lora_" in name:
                        torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            _save_atomic(model, d)
    return dirs


def make_bottleneck_adapters(model_dir: str, k: int, reduction_factor: int, root: str = ADAPTER_CACHE) -> list[str]:
    """K bottleneck adapters in AdapterHub's format (what save_adapter(..., use_safetensors=True) writes for a
    SeqBnConfig), written directly: the `adapters` library cannot share this venv. Their serving is held
    exactly to that library by tests/e2e/test_families_serving.py; here only the cost matters."""
    from safetensors.torch import save_file

    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    d_model, layers = hf["hidden_size"], hf["num_hidden_layers"]
    width = d_model // reduction_factor
    dirs, missing = _adapter_dirs(model_dir, root, f"seqbn-r{reduction_factor}", k)
    for i, d in enumerate(dirs):
        if d not in missing:
            continue
        name = f"seqbn{i}"
        cfg = {"config": {"mh_adapter": False, "output_adapter": True, "reduction_factor": reduction_factor,
                          "non_linearity": "relu", "original_ln_before": True, "original_ln_after": True,
                          "residual_before_ln": True, "adapter_residual_before_ln": False, "ln_before": False,
                          "ln_after": False, "is_parallel": False, "scaling": 1.0, "use_gating": False,
                          "phm_layer": False, "leave_out": [], "dropout": 0.0},
               "name": name, "hidden_size": d_model, "model_type": hf["model_type"],
               "model_class": "LlamaForCausalLM", "version": "adapters.1.3.0"}
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(layers):
            pre = f"model.layers.{layer}.output_adapters.adapters.{name}."
            tensors[pre + "adapter_down.0.weight"] = torch.randn(width, d_model, generator=g) / math.sqrt(d_model)
            tensors[pre + "adapter_down.0.bias"] = torch.zeros(width)
            tensors[pre + "adapter_up.weight"] = torch.randn(d_model, width, generator=g) * 0.02
            tensors[pre + "adapter_up.bias"] = torch.zeros(d_model)
        tmp = d + f".tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(cfg, f)
        save_file(tensors, os.path.join(tmp, "adapter.safetensors"))
        os.rename(tmp, d)
    return dirs


# ---- ideal ratios ---------------------------------------------------------------------------------------------
@dataclass
class Extra:
    """What a workload adds to a decode step over base: distinct LoRA adapters, extra KV positions read."""

    lora_adapters: int = 0
    lora_rank: int = 0
    extra_kv_positions: int = 0  # summed over requests (prefix / virtual tokens each request attends to)


def ideal_ratios(info: Any, elem: int, num_requests: int, avg_ctx: float, extra: Extra) -> tuple[float, float]:
    """(memory-bound, FLOP-bound) ideal throughput ratio of a decode step vs base, from the KERNELS.md roofline."""
    kv_per_pos = 2 * info.num_layers * info.num_key_value_heads * info.head_dim  # elements (K and V, all layers)
    kn = sum(k * n for k, n in map(info.module_shape, LORA_TARGETS)) * info.num_layers
    r_kn = sum(k + n for k, n in map(info.module_shape, LORA_TARGETS)) * info.num_layers
    lm_head = info.vocab_size * info.hidden_size
    base_bytes = elem * (kn + lm_head + num_requests * avg_ctx * kv_per_pos)
    extra_bytes = elem * (extra.lora_adapters * extra.lora_rank * r_kn + extra.extra_kv_positions * kv_per_pos)
    # FLOPs: 2 per weight per token; attention ~ 2 * 2 * q_dim per KV position per layer (QK^T and PV).
    q_dim = info.num_attention_heads * info.head_dim
    attn_per_pos = 4 * q_dim * info.num_layers
    base_flops = num_requests * (2 * (kn + lm_head)) + num_requests * avg_ctx * attn_per_pos
    lora_tokens = num_requests if extra.lora_adapters else 0
    extra_flops = lora_tokens * 2 * extra.lora_rank * r_kn + extra.extra_kv_positions * attn_per_pos
    return base_bytes / (base_bytes + extra_bytes), base_flops / (base_flops + extra_flops)


# ---- measurement ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    system: str  # "ours" | "peft"
    kind: str  # "base" | "lora" | "prefix" | "prompt" | "mix"
    k: int
    tok_per_s: float
    seconds: float
    ideal_mem: float | None = None
    ideal_flop: float | None = None
    paired_base: float | None = None  # tok/s of the base runs timed alternately with this workload
    ratios: dict[str, float] = field(default_factory=dict)
    # tokens per CPU second of the engine thread (best run) and of its paired base: with --threads 1, a ratio
    # the machine's other load barely moves (the wall-clock one above swings with it)
    tok_per_cpu_s: float | None = None
    paired_base_cpu: float | None = None


def best_of(n: int, fn: Any) -> dict[str, float]:
    runs = [fn() for _ in range(max(1, n))]
    return max(runs, key=lambda r: r["tok_per_s"])


def peft_baselines(args: argparse.Namespace, model_dir: str, prompts: list[list[int]], lora_dirs: list[str],
                   ks: list[int], pad: int, dtype: Any, device: str) -> list[Row]:
    """transformers / peft baselines. Run in a child process (run_isolated): our engine's worker thread
    must be the only thread of this process with an OpenMP team (see server.threads)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    n = len(prompts)
    rows: list[Row] = []
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    hf_generate(model, prompts[:2], 2, pad)  # warm-up
    res = best_of(args.repeat, lambda: hf_generate(model, prompts, args.output_len, pad))
    rows.append(Row("transformers base", "peft", "base", 0, res["tok_per_s"], res["seconds"]))
    print(f"  {'transformers base':<44} {res['tok_per_s']:9.1f} tok/s", flush=True)
    names = [f"a{i}" for i in range(max(ks))]
    pm = PeftModel.from_pretrained(model, lora_dirs[0], adapter_name=names[0]).eval()
    for nm, d in zip(names[1:], lora_dirs[1:], strict=True):
        pm.load_adapter(d, adapter_name=nm)
    pm.eval()
    for k in ks:
        groups: dict[int, list[list[int]]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(i % k, []).append(p)

        def one_at_a_time(groups: dict[int, list[list[int]]] = groups) -> dict[str, float]:
            tokens = seconds = 0.0
            for a, ps in groups.items():
                pm.set_adapter(names[a])
                r = hf_generate(pm, ps, args.output_len, pad)
                tokens += r["tokens"]
                seconds += r["seconds"]
            return {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds}

        pm.set_adapter(names[0])
        hf_generate(pm, prompts[:2], 2, pad)  # warm-up
        res = best_of(args.repeat, one_at_a_time)
        rows.append(Row(f"peft one-at-a-time K={k}", "peft", "lora", k, res["tok_per_s"], res["seconds"]))
        print(f"  {rows[-1].name:<44} {res['tok_per_s']:9.1f} tok/s", flush=True)
        if not args.skip_peft_mixed:
            an = [names[i % k] for i in range(n)]
            res = best_of(args.repeat, lambda an=an: hf_generate(pm, prompts, args.output_len, pad,
                                                                 adapter_names=an))
            rows.append(Row(f"peft mixed batch K={k}", "peft", "lora", k, res["tok_per_s"], res["seconds"]))
            print(f"  {rows[-1].name:<44} {res['tok_per_s']:9.1f} tok/s", flush=True)
    return rows


def _loadavg() -> str | None:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return None


# ---- residency: many adapters over a byte budget (--residency) ----------------------------------------------
def closed_loop(engine: Any, prompts: list[list[int]], output_len: int, handles: list[Any], concurrency: int
                ) -> dict[str, Any]:
    """`concurrency` clients, each submitting its share of the requests one after another (greedy, fixed
    length): tokens/s, TTFT percentiles, and the engine's adapter loads/evictions/prefetches during the run."""
    import asyncio
    import time

    from server.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    ttft: list[float] = []
    tokens = cached = 0

    async def client(jobs: list[tuple[list[int], Any]]) -> None:
        nonlocal tokens, cached
        for p, h in jobs:
            t0, first = time.perf_counter(), None
            async for d in engine.generate(p, params, h):
                if first is None and d.token_ids:
                    first = time.perf_counter() - t0
                tokens += len(d.token_ids)
                cached += d.cached_tokens
            ttft.append(first if first is not None else float("nan"))

    jobs = list(zip(prompts, handles, strict=True))
    engine.start()
    sm = engine.slots
    before = (sm.loads, sm.evictions, sm.prefetches)

    kv_peak = 0

    async def sample_kv() -> None:  # peak KV blocks in use: how much of its pool the KV cache really needed
        nonlocal kv_peak
        while True:
            kv_peak = max(kv_peak, engine.allocator.num_used)
            await asyncio.sleep(0.01)

    async def main() -> None:
        sampler = asyncio.ensure_future(sample_kv())
        await asyncio.gather(*(client(jobs[c::concurrency]) for c in range(concurrency)))
        sampler.cancel()

    t0, c0 = time.perf_counter(), time.process_time()
    asyncio.run(main())
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    ttft.sort()

    def pct(q: float) -> float:
        return ttft[min(len(ttft) - 1, int(q * len(ttft)))]

    # tokens per CPU second of this process (engine thread + clients, one torch thread): what the work costs,
    # much less moved than wall time by other processes competing for the cores
    return {"tok_per_s": tokens / dt, "tok_per_cpu_s": tokens / max(cpu, 1e-9), "seconds": dt, "cpu_seconds": cpu,
            "ttft_p50": pct(0.5), "ttft_p99": pct(0.99), "cached_prompt_tokens": cached,
            "loads": sm.loads - before[0], "evictions": sm.evictions - before[1],
            "prefetches": sm.prefetches - before[2], "resident": sm.num_resident, "pages_used": sm.pages_used,
            "kv_peak_blocks": kv_peak, "kv_blocks": engine.allocator.num_blocks}


RUN_KEYS = ("tok_per_s", "tok_per_cpu_s", "ttft_p50", "ttft_p99", "loads", "cached_prompt_tokens")


def residency(args: argparse.Namespace) -> None:
    """The many-adapters table (see the module docstring)."""
    import random

    from adapters_store.loader import load_adapter
    from server.engine.registry import AdapterRegistry
    from server.model.adapter_pages import page_bytes
    from server.model.loader import load_spec, resolve_dtype

    load_start = _loadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    model_dir = args.model or bench_model(args.hidden, args.layers, args.heads, args.kv_heads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = load_spec(model_dir)[0]
    info = spec.base_info()
    dtype = resolve_dtype("auto", device, spec.torch_dtype)
    memory = args.fit * 2 * page_bytes(info, dtype)  # `--fit` rank-16 adapters: 2 pages of 8 rank rows each
    c, n_req = args.num_requests, args.total_requests
    max_len = args.prompt_len + args.output_len + 8
    if args.mixed_ranks:
        r8, r64 = make_lora_adapters(model_dir, max(ks) // 2, 8), make_lora_adapters(model_dir, max(ks) // 2, 64)
        dirs = [d for pair in zip(r8, r64, strict=True) for d in pair]
        label = "r8/r64"
    else:
        dirs = make_lora_adapters(model_dir, max(ks), args.rank)
        label = f"r{args.rank}"
    registry = AdapterRegistry(max_cpu=len(dirs) + 1)
    handles = [registry.put(f"lora{i}", load_adapter(d, info, max_rank=args.max_rank)) for i, d in enumerate(dirs)]
    rng = random.Random(0)
    runs_started = iter(range(1, 1 << 30))

    def order(k: int) -> list[Any]:
        out: list[Any] = []
        while len(out) < n_req:
            cycle = list(range(k))
            rng.shuffle(cycle)
            out += cycle
        return [handles[i] for i in out[:n_req]]

    def engine(**kw: Any) -> Any:
        kw.setdefault("max_num_seqs", c)
        return make_engine(model_dir, max_model_len=max_len, max_rank=args.max_rank,
                           max_batch_tokens=max(2048, c), **kw)

    print(f"device={device} threads={torch.get_num_threads()} model={model_dir} adapters={label} "
          f"memory={memory} bytes ({args.fit} rank-16 adapters) concurrency={c} requests/row={n_req} "
          f"prompt={args.prompt_len} output={args.output_len} rounds={max(1, args.rounds or args.repeat)} "
          f"load={load_start}")
    t_start = time.perf_counter()
    ref = engine(max_adapters=None, adapter_memory=memory)  # K = 8 and K = fit: resident after warm-up
    main_eng = engine(max_adapters=None, adapter_memory=memory)
    capped = engine(max_adapters=8, adapter_memory=memory)
    bound8 = engine(max_adapters=None, adapter_memory=memory, max_num_seqs=8)
    fit = min(args.fit, max(ks))

    def timed(eng: Any, k: int) -> dict[str, Any]:
        # fresh prompts every run: a prompt resent with the adapter it had in an earlier run would hit the
        # prefix cache, which happens far more often at K = 8 than at K = 64 (1 - (7/8)^runs against
        # 1 - (63/64)^runs) and would time the cache, not the adapter count
        prompts = random_prompts(n_req, args.prompt_len, seed=next(runs_started))
        return closed_loop(eng, prompts, args.output_len, order(k), c)

    for eng, k in ((ref, 8), (ref, fit), (bound8, 8)):
        timed(eng, k)  # warm-up: loads what the reference engines keep resident
    rows: list[dict[str, Any]] = []

    rounds = max(1, args.rounds or args.repeat)

    def row(name: str, eng: Any, k: int, ref_eng: Any, ref_k: int, ref_name: str) -> None:
        runs, pairs = [], []
        timed(eng, k)  # warm-up (for K <= fit: every adapter resident afterwards)
        for i in range(rounds):  # interleaved A/B rounds, the order flipped every round (ABBA...): drift cancels
            if i % 2 == 0:
                runs.append(timed(eng, k))
                pairs.append(timed(ref_eng, ref_k))
            else:
                pairs.append(timed(ref_eng, ref_k))
                runs.append(timed(eng, k))
        res = max(runs, key=lambda r: r["tok_per_s"])
        pr = max(pairs, key=lambda r: r["tok_per_s"])
        ratios = [a["tok_per_s"] / b["tok_per_s"] for a, b in zip(runs, pairs, strict=True)]
        p99s = [a["ttft_p99"] / b["ttft_p99"] for a, b in zip(runs, pairs, strict=True)]
        cpus = [a["tok_per_cpu_s"] / b["tok_per_cpu_s"] for a, b in zip(runs, pairs, strict=True)]
        out = {"name": name, "k": k, **res, "ref": ref_name, "ref_tok_per_s": pr["tok_per_s"],
               "ref_ttft_p99": pr["ttft_p99"], "ref_loads": pr["loads"],
               "tput_ratio": res["tok_per_s"] / pr["tok_per_s"], "ttft_p99_ratio": res["ttft_p99"] / pr["ttft_p99"],
               # per round (each run over the reference run next to it): what the spread of one pairing is
               "rounds": rounds, "tput_ratios": ratios, "tput_ratio_median": statistics.median(ratios),
               "tput_ratio_min": min(ratios), "tput_ratio_max": max(ratios),
               "ttft_p99_ratios": p99s, "ttft_p99_ratio_median": statistics.median(p99s),
               "cpu_ratios": cpus, "cpu_ratio_median": statistics.median(cpus), "cpu_ratio_min": min(cpus),
               "cpu_ratio_max": max(cpus),
               "runs": [{kk: r[kk] for kk in RUN_KEYS} for r in runs],
               "ref_runs": [{kk: r[kk] for kk in RUN_KEYS} for r in pairs]}
        rows.append(out)
        print(f"  {name:<34} {res['tok_per_s']:8.1f} tok/s  TTFT p50 {res['ttft_p50']:6.2f}s p99 "
              f"{res['ttft_p99']:6.2f}s  /{ref_name} {out['tput_ratio']:.2f} (p99 x{out['ttft_p99_ratio']:.2f})  "
              f"median of {rounds} rounds {out['tput_ratio_median']:.2f} [{min(ratios):.2f}-{max(ratios):.2f}] "
              f"(p99 x{out['ttft_p99_ratio_median']:.2f})  tok/CPU-s median {out['cpu_ratio_median']:.2f} "
              f"[{min(cpus):.2f}-{max(cpus):.2f}]  "
              f"loads {res['loads']} evictions {res['evictions']} prefetched {res['prefetches']} "
              f"resident {res['resident']} KV peak {res['kv_peak_blocks']}/{res['kv_blocks']} blocks "
              f"cached prompt tokens {res['cached_prompt_tokens']}/{pr['cached_prompt_tokens']} "
              f"(ref loads {pr['loads']})", flush=True)

    for k in ks:
        row(f"{label} K={k}" + (" (noise: same config)" if k == 8 else ""), main_eng, k, ref, 8, "K=8")
    if max(ks) > fit:
        row(f"{label} K={max(ks)} vs resident", main_eng, max(ks), ref, fit, f"K={fit} resident")
    k_cap = min(32, max(ks))
    if not args.no_capped:
        row(f"{label} --max-adapters 8, K={k_cap}", capped, k_cap, bound8, 8, "8-seq bound")
    for e in (ref, main_eng, capped, bound8):
        e.stop()
    elapsed = time.perf_counter() - t_start
    print(f"load average: start {load_start}, end {_loadavg()}; {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "args": vars(args), "memory": memory, "rows": rows,
                       "loadavg_start": load_start, "loadavg_end": _loadavg(), "seconds": elapsed}, f, indent=2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--ks", default="1,8,32", help="comma-separated numbers of distinct adapters")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-rank", type=int, default=64, help="engine LoRA slot rank (and loader limit)")
    ap.add_argument("--num-virtual-tokens", type=int, default=16, help="prefix / prompt tuning length")
    ap.add_argument("--mix-k", type=int, default=8, help="adapters of each kind in the base+LoRA+prefix+prompt mix")
    ap.add_argument("--max-adapters", type=int, default=0, help="engine slots (0 = enough for every workload)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per workload; the best is reported")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only our workloads whose name has "
                    "one (base always runs)")
    ap.add_argument("--no-pairing", action="store_true", help="don't time base alongside each workload")
    ap.add_argument("--skip-peft", action="store_true", help="skip the transformers/peft baselines")
    ap.add_argument("--skip-peft-mixed", action="store_true", help="skip peft's mixed-batch generate (d)")
    ap.add_argument("--skip-prompt-learning", action="store_true", help="skip prefix / prompt / mix workloads")
    ap.add_argument("--skip-families", action="store_true", help="skip IA3 / DoRA / bottleneck workloads")
    ap.add_argument("--reduction-factor", type=int, default=16, help="bottleneck adapters' reduction_factor")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, K = 1, 2: a smoke run")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--residency", action="store_true", help="the many-adapters benchmark (module docstring)")
    ap.add_argument("--mixed-ranks", action="store_true", help="--residency: adapters alternate rank 8 and 64")
    ap.add_argument("--fit", type=int, default=64, help="--residency: --adapter-memory holds this many rank-16")
    ap.add_argument("--total-requests", type=int, default=128, help="--residency: requests per timed run")
    ap.add_argument("--no-capped", action="store_true", help="--residency: skip the --max-adapters 8 row")
    ap.add_argument("--rounds", type=int, default=0, help="--residency: interleaved A/B rounds per row (default "
                    "--repeat); each row prints the best-of ratio and the median [min-max] of the per-round ratios")
    args = ap.parse_args(argv)
    if args.residency:
        if args.ks == "1,8,32":
            args.ks = "8,32,64,128"
        residency(args)
        return
    load_start = _loadavg()
    if args.quick:
        args.hidden, args.layers, args.heads, args.kv_heads = 64, 2, 4, 2
        args.num_requests, args.prompt_len, args.output_len = 8, 16, 8
        args.ks, args.num_virtual_tokens, args.mix_k, args.repeat = "1,2", 4, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    n = args.num_requests
    slots = args.max_adapters or max(max(ks), 6 * args.mix_k)

    model_dir = args.model or bench_model(args.hidden, args.layers, args.heads, args.kv_heads)
    prompts = random_prompts(n, args.prompt_len)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device={device} threads={torch.get_num_threads()} model={model_dir}")
    print(f"requests={n} prompt_len={args.prompt_len} output_len={args.output_len} K={ks} rank={args.rank} "
          f"virtual_tokens={args.num_virtual_tokens} slots={slots} max_rank={args.max_rank} repeat={args.repeat}")

    lora_dirs = make_lora_adapters(model_dir, max(ks), args.rank)
    pl_k = max(max(ks), args.mix_k)
    pl_dirs = {} if args.skip_prompt_learning else {
        kind: make_prompt_learning_adapters(model_dir, kind, pl_k, args.num_virtual_tokens)
        for kind in ("prefix", "prompt")}
    fam_dirs = {} if args.skip_families else {
        "ia3": make_ia3_adapters(model_dir, pl_k), "dora": make_dora_adapters(model_dir, pl_k, args.rank),
        "bottleneck": make_bottleneck_adapters(model_dir, pl_k, args.reduction_factor)}

    # transformers / peft in a child process, so that only our engine's thread uses OpenMP here.
    from server.model.loader import load_spec, load_tokenizer, resolve_dtype

    pad = load_tokenizer(model_dir).pad_token_id
    dtype = resolve_dtype("auto", device, load_spec(model_dir)[0].torch_dtype)
    rows: list[Row] = []
    if not args.skip_peft:
        rows += run_isolated(peft_baselines, args, model_dir, prompts, lora_dirs, ks, pad, dtype, device)

    from adapters_store.loader import load_adapter
    from server.engine.registry import AdapterRegistry

    max_len = args.prompt_len + args.output_len + args.num_virtual_tokens + 8

    def new_engine() -> Any:
        return make_engine(model_dir, max_num_seqs=n, max_model_len=max_len, max_adapters=slots,
                           max_rank=args.max_rank, max_batch_tokens=max(2048, n))

    engine = new_engine()
    info = engine.info.shapes
    elem = torch.empty((), dtype=getattr(torch, engine.info.dtype)).element_size()
    avg_ctx = args.prompt_len + args.output_len / 2
    registry = AdapterRegistry()
    handles: dict[str, list[Any]] = {
        "lora": [registry.put(f"lora{i}", load_adapter(d, info, max_rank=args.max_rank))
                 for i, d in enumerate(lora_dirs)]}
    for kind, dirs in {**pl_dirs, **fam_dirs}.items():
        handles[kind] = [registry.put(f"{kind}{i}", load_adapter(d, info, max_rank=args.max_rank))
                         for i, d in enumerate(dirs)]

    # (name, kind, K, per-request handles, Extra)
    nvt = args.num_virtual_tokens
    workloads: list[tuple[str, str, int, list[Any], Extra | None]] = [("ours base", "base", 0, [None] * n, Extra())]
    for k in ks:
        workloads.append((f"ours LoRA K={k}", "lora", k, [handles["lora"][i % k] for i in range(n)],
                          Extra(min(k, n), args.rank)))
    if pl_dirs:
        for kind in ("prefix", "prompt"):
            for k in ks:
                workloads.append((f"ours {kind} K={k}", kind, k, [handles[kind][i % k] for i in range(n)],
                                  Extra(extra_kv_positions=n * nvt)))
        mk = args.mix_k
        mix: list[Any] = []
        for i in range(n):
            kind = ("base", "lora", "prefix", "prompt")[i % 4]
            mix.append(None if kind == "base" else handles[kind][(i // 4) % mk])
        n_lora = len({id(h) for h in mix if h is not None and h.adapter.kind == "lora"})
        n_pl = sum(1 for h in mix if h is not None and h.adapter.kind != "lora")
        workloads.append((f"ours mix base+LoRA+prefix+prompt ({mk} each)", "mix", mk, mix,
                          Extra(n_lora, args.rank, n_pl * nvt)))
    if fam_dirs:
        # no roofline model for these: their ideal columns stay empty
        for kind, label in (("ia3", "IA3"), ("dora", "DoRA"), ("bottleneck", "bottleneck")):
            for k in ks:
                workloads.append((f"ours {label} K={k}", kind, k, [handles[kind][i % k] for i in range(n)], None))
        if pl_dirs:
            mk = args.mix_k
            kinds = ("base", "lora", "prefix", "prompt", "ia3", "dora", "bottleneck")
            mix = [None if kinds[i % 7] == "base" else handles[kinds[i % 7]][(i // 7) % mk] for i in range(n)]
            workloads.append((f"ours mix all 7 families ({mk} each)", "mix", mk, mix, None))

    # Each adapter workload is timed alternately with base (best of --repeat each), and its ratio is taken
    # against that paired base: other processes sharing the CPU then bias both sides alike.
    if args.only:
        keys = [x.strip() for x in args.only.split(",") if x.strip()]
        workloads = [w for w in workloads if w[1] == "base" or any(x in w[0] for x in keys)]
    base_runs: list[dict[str, float]] = []
    paired: dict[str, float] = {}
    paired_cpu: dict[str, float] = {}
    run_engine(engine, prompts[:2], 2)  # warm-up
    failures: dict[str, str] = {}
    for name, kind, k, hs, extra in workloads:
        runs, pair = [], []
        try:
            run_engine(engine, prompts, 2, hs)  # warm-up: loads every adapter of the workload into its slot
            for _ in range(max(1, args.repeat)):
                runs.append(run_engine(engine, prompts, args.output_len, hs))
                if kind != "base" and not args.no_pairing:
                    pair.append(run_engine(engine, prompts, args.output_len))
        except Exception as e:  # noqa: BLE001 - report the failure, measure the other workloads
            failures[name] = f"{type(e).__name__}: {e}"
            print(f"  {name:<44} FAILED: {failures[name]}", flush=True)
            if engine.dead is not None or not engine.alive:
                engine.stop()
                engine = new_engine()
                run_engine(engine, prompts[:2], 2)
            if not runs:
                continue
        base_runs.extend(runs if kind == "base" else pair)
        res = max(runs, key=lambda r: r["tok_per_s"])
        if pair:
            paired[name] = max(r["tok_per_s"] for r in pair)
            if all("tok_per_cpu_s" in r for r in pair):
                paired_cpu[name] = max(r["tok_per_cpu_s"] for r in pair)
        im, ifl = ideal_ratios(info, elem, n, avg_ctx, extra) if extra is not None else (None, None)
        cpu = max((r["tok_per_cpu_s"] for r in runs if "tok_per_cpu_s" in r), default=None)
        rows.append(Row(name, "ours", kind, k, res["tok_per_s"], res["seconds"], im, ifl, tok_per_cpu_s=cpu))
        extra_txt = f"  (paired base {paired[name]:.1f})" if name in paired else ""
        if name in paired_cpu and cpu is not None:
            extra_txt += f"  cpu: {cpu:.1f} tok/cpu-s, /paired {cpu / paired_cpu[name]:.2f}"
        print(f"  {name:<44} {res['tok_per_s']:9.1f} tok/s{extra_txt}", flush=True)
    best_base = max(base_runs, key=lambda r: r["tok_per_s"])
    ours_base = next(r for r in rows if r.name == "ours base")
    ours_base.tok_per_s, ours_base.seconds = best_base["tok_per_s"], best_base["seconds"]
    rows.sort(key=lambda r: r.system != "ours")  # stable: our workloads first, then transformers / peft
    dtype = engine.info.dtype
    loads, evictions = engine.slots.loads, engine.slots.evictions
    engine.stop()

    # ---- ratios and table ----
    by_name = {r.name: r for r in rows}
    base = by_name["ours base"].tok_per_s
    for r in rows:
        r.paired_base = paired.get(r.name)
        r.ratios["vs_our_base"] = r.tok_per_s / paired.get(r.name, base)  # paired base where there is one
        r.paired_base_cpu = paired_cpu.get(r.name)
        if r.tok_per_cpu_s is not None and r.paired_base_cpu is not None:
            r.ratios["cpu_vs_our_base"] = r.tok_per_cpu_s / r.paired_base_cpu
        r.ratios["vs_best_base"] = r.tok_per_s / base
        if r.system == "ours" and r.kind == "lora":
            for ref in ("one-at-a-time", "mixed batch"):
                other = by_name.get(f"peft {ref} K={r.k}")
                if other is not None:
                    r.ratios[f"vs_peft_{ref.replace(' ', '_').replace('-', '_')}"] = r.tok_per_s / other.tok_per_s
    hf_base = by_name.get("transformers base")
    if hf_base is not None:
        by_name["ours base"].ratios["vs_transformers_base"] = base / hf_base.tok_per_s

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    header = (f"{'workload':<44} {'tok/s':>9} {'paired base':>11} {'/paired':>8} {'/best base':>10} "
              f"{'/peft 1by1':>10} {'/peft mixed':>11} {'ideal(mem)':>10} {'ideal(flop)':>11} {'/paired cpu':>11}")
    threads = engine_threads()
    print(f"\n== mixed adapters ({device}, {str(dtype).replace('torch.', '')}, engine threads={threads}, "
          f"hidden={info.hidden_size}, layers={info.num_layers}, {n} req x {args.prompt_len}+{args.output_len} tok)")
    print(header)
    print("-" * len(header))
    for r in rows:
        paired_txt = "-" if r.paired_base is None else f"{r.paired_base:.1f}"
        print(f"{r.name:<44} {r.tok_per_s:9.1f} {paired_txt:>11} {fmt(r.ratios['vs_our_base']):>8} "
              f"{fmt(r.ratios['vs_best_base']):>10} "
              f"{fmt(r.ratios.get('vs_peft_one_at_a_time')):>10} {fmt(r.ratios.get('vs_peft_mixed_batch')):>11} "
              f"{fmt(r.ideal_mem):>10} {fmt(r.ideal_flop):>11} {fmt(r.ratios.get('cpu_vs_our_base')):>11}")
    print(f"engine slot loads={loads} evictions={evictions}; /paired = tok/s over the base runs timed alternately "
          f"with that workload (best of {args.repeat}), the ratio the targets use; /best base = over the best of "
          f"all {len(base_runs)} base runs ({base:.1f} tok/s, the 'ours base' row)")
    print("ideal(mem) = memory-bound ideal of a decode step (weights + KV bytes); ideal(flop) = FLOP-bound ideal")
    print("/paired cpu = the same ratio in tokens per CPU second of the engine thread (best of each): with "
          "--threads 1 the machine's other load barely moves it")

    targets: dict[str, Any] = {}
    if info.hidden_size >= 1024:
        r8, r32 = by_name.get("ours LoRA K=8"), by_name.get("ours LoRA K=32")
        if r8 is not None:
            v = r8.ratios["vs_our_base"]
            targets["b_over_a_K8"] = {"value": v, "target": 0.85, "met": v >= 0.85}
        if r32 is not None and "vs_peft_one_at_a_time" in r32.ratios:
            v = r32.ratios["vs_peft_one_at_a_time"]
            targets["b_over_c_K32"] = {"value": v, "target": 5.0, "met": v >= 5.0}
        for label, target in (("IA3", 0.95), ("DoRA", 0.85), ("bottleneck", 0.85)):
            r = by_name.get(f"ours {label} K=8")
            if r is not None:
                v = r.ratios["vs_our_base"]
                targets[f"{label}_K8"] = {"value": v, "target": target, "met": v >= target}
                if "cpu_vs_our_base" in r.ratios:
                    v = r.ratios["cpu_vs_our_base"]
                    targets[f"{label}_K8_cpu"] = {"value": v, "target": target, "met": v >= target}
        for key, t in targets.items():
            print(f"target {key}: {t['value']:.2f} (>= {t['target']}) {'MET' if t['met'] else 'NOT MET'}")

    for name, err in failures.items():
        print(f"FAILED {name}: {err}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "dtype": str(dtype), "threads": torch.get_num_threads(), "args": vars(args),
                       "best_base_tok_per_s": base, "base_runs_tok_per_s": [r["tok_per_s"] for r in base_runs],
                       "loadavg_start": load_start, "loadavg_end": _loadavg(),
                       "slot_loads": loads, "slot_evictions": evictions, "targets": targets, "failures": failures,
                       "rows": [r.__dict__ for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
