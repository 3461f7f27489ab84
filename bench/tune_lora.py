"""Bounded sweep of the fixed-shape / fused LoRA launches' tuning knobs (`kernels.capturable.LaunchConfig`) at
decode shapes: each configuration replayed from a CUDA graph, checked against the default configuration's output.

Run from the repository root: `python -m bench.tune_lora [--dry-run] [--budget-s 90] [--out F | --into F]`.

Shapes (r=16 adapters in a 64-slot pool of 8-rank pages, as the server's): per model (hidden 2048 = the
gpu_e2e Llama, kv 512, MLP 8192; hidden 4096 = Llama-3-8B, kv 1024, MLP 14336) the fused q/k/v launch pair,
the fused gate/up pair and the fixed down pair; tokens x distinct adapters (64x64 = the e2e's decode step first,
then 1x1, 16x8, 64x8, 16x1, 64x1). Per shape the sweep is coordinate-wise, so it fits a budget:
  1. shrink: BLOCK_K {64, 128, 256} x split-K {auto, 1, 2x auto, auto / 2} (expand at its default);
  2. shrink warps {2, 8} and stages {2, 4} around the best of 1;
  3. expand: BLOCK_N {64, 128, 256} x warps {2, 4, 8} on the best shrink;
then the default and the best are timed again, alternated (paired: the speed-up survives drift).
Each configuration's output (y0 + delta, bf16) must match the default's within 2 bf16 ulps of the largest
value (split-K only reorders fp32 sums); one that does not is listed under `wrong` and never chosen. The
default itself is held to a float32 torch reference (`default_err`). Times are per launch pair, from a graph of
`--reps` back-to-back applications (device time as a decode graph sees it: no host launch cost). The
applications of one graph rotate over `--copies` copies of the A/B pools and as many slot sets (each shifted
by D slots), so the adapters' weights come from HBM rather than L2 as in a decode step, where the whole model
streams between two uses of a layer's adapters (64x64 at hidden 2048: 8 x 10.5 MB per replay against a ~50 MB
L2; the smallest cases stay L2-resident and launch-bound). bench_fused replays one application on one pool
(L2-warm), so its figures are not these.

`--budget-s` (default 90, compiles included) is checked before each configuration: the sweep stops there and
still writes what it has; the JSON is rewritten after every shape, so even a killed run leaves the shapes done.
`--into FILE` stores the result under the key "tune" of an existing JSON (gpu_check.sh: bench_fused.json).
`--dry-run`: CPU, Triton interpreter, fp32, tiny shapes (one 2x2 case), the same sweep over a one-value grid
(BLOCK_K 32 with split-K 1 and 2, warps 2, stages 2, BLOCK_N 32): plumbing and the check only; times are one
interpreted call each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CASES = [(64, 64), (1, 1), (16, 8), (64, 8), (16, 1), (64, 1)]  # (tokens, distinct adapters), most wanted first
MODELS = {"h2048": (2048, 512, 8192), "h4096": (4096, 1024, 14336)}  # hidden, kv out, MLP
DRY_MODELS = {"tiny": (64, 16, 128)}
GROUPS = ("qkv", "gate_up", "down")  # swept by default
ALL_GROUPS = GROUPS + ("o",)  # o: fixed, K = N = hidden (--groups o)
# the sweep's values per stage (None, the default, is always tried first)
GRID = dict(block_k=(64, 128, 256), shrink_warps=(2, 8), shrink_stages=(2, 4), block_n=(64, 128, 256),
            expand_warps=(2, 4, 8))
DRY_GRID = dict(block_k=(32,), shrink_warps=(2,), shrink_stages=(2,), block_n=(32,), expand_warps=(2,))


@dataclass
class Trial:
    label: str  # the overridden fields ("default" when none)
    launch: dict[str, int]  # the resolved knobs: block_k, split_k, shrink_warps, block_n, expand_warps
    us: float | None = None
    max_err: float | None = None
    ok: bool = False
    error: str | None = None


@dataclass
class ShapeResult:
    model: str
    group: str
    k: int
    ns: list[int]
    tokens: int
    adapters: int
    ideal_mb: float
    tol: float
    default_err: float  # the default's max |err| against the float32 torch reference
    default_us: float | None = None  # paired re-time (alternated with the best)
    best_us: float | None = None
    best_label: str = "default"
    best_launch: dict[str, int] = field(default_factory=dict)
    speedup: float | None = None
    best_gbps: float | None = None
    best_pct_roof: float | None = None
    default_pct_roof: float | None = None
    wrong: list[str] = field(default_factory=list)
    trials: list[Trial] = field(default_factory=list)


def group_shape(group: str, hidden: int, kv: int, inter: int) -> tuple[int, list[int]]:
    """(K, output widths) of a module group."""
    return {"qkv": (hidden, [hidden, kv, kv]), "gate_up": (hidden, [inter, inter]), "down": (inter, [hidden]),
            "o": (hidden, [hidden])}[group]


class Tuner:
    """The sweep's state: device, pools, budget clock and the result document."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from bench.bench_kernels import hbm_peak_gbps

        self.torch, self.args = torch, args
        self.t_start = time.perf_counter()
        self.cuda = torch.cuda.is_available() and not args.dry_run
        if not self.cuda and not args.dry_run:
            raise SystemExit("tune_lora: no CUDA device; use --dry-run for the CPU smoke run")
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        name = torch.cuda.get_device_name() if self.cuda else "cpu (interpreter)"
        self.peak = hbm_peak_gbps(name) if self.cuda else None
        self.models = DRY_MODELS if args.dry_run else {m: MODELS[m] for m in (args.models or MODELS)}
        self.reps = args.reps or (16 if self.cuda else 1)
        self.copies = args.copies or (8 if self.cuda else 2)  # dry run: 2, so the rotation is exercised
        self.rank, self.slots, self.page_rank = (16, 64, 8) if self.cuda else (16, 8, 8)
        mp = -(-self.rank // self.page_rank)
        self.pages = torch.arange(self.slots * mp, dtype=torch.int32, device=self.device).view(self.slots, mp)
        self.ranks = torch.full((self.slots,), self.rank, dtype=torch.int32, device=self.device)
        self.scales = torch.full((self.slots,), 2.0, device=self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(0)
        self.host_gen = torch.Generator().manual_seed(1)
        self.pools: dict[tuple[str, str], list[list[tuple[Any, Any]]]] = {}
        # bf16: 2 ulps (eps 2^-7) of the largest output; fp32 (interpreter): 1e-4 relative to it
        self.rel_tol = 2 * 2.0 ** -7 if self.dtype == torch.bfloat16 else 1e-4
        self.stop: str | None = None
        self.result: dict[str, Any] = {
            "device": name, "dtype": str(self.dtype), "peak_gbps": self.peak, "budget_s": args.budget_s,
            "reps": self.reps, "copies": self.copies, "rank": self.rank, "slots": self.slots,
            "page_rank": self.page_rank, "dry_run": args.dry_run, "complete": False, "stopped": None, "shapes": []}

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t_start > self.args.budget_s

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.perf_counter() - self.t_start, 1)
        if self.args.out:
            _write(self.args.out, self.result)
        elif self.args.into:
            doc = {}
            if os.path.isfile(self.args.into):
                with open(self.args.into) as f:
                    doc = json.load(f)
            doc["tune"] = self.result
            _write(self.args.into, doc)

    def pool(self, model: str, group: str) -> list[list[tuple[Any, Any]]]:
        """`copies` x per module (A pool [P, PR, K], B pool [P, N, PR] view), random, built once per model and
        group."""
        torch = self.torch
        if (model, group) not in self.pools:
            k, ns = group_shape(group, *self.models[model])
            copies = []
            for _ in range(self.copies):
                mods = []
                for n in ns:
                    shape = (self.slots * self.pages.shape[1], self.page_rank)
                    a = torch.randn(*shape, k, generator=self.gen, device=self.device) / k ** 0.5
                    b = torch.randn(*shape, n, generator=self.gen, device=self.device) / self.rank ** 0.5
                    mods.append((a.to(self.dtype), b.to(self.dtype).transpose(1, 2)))
                copies.append(mods)
            self.pools[(model, group)] = copies
        return self.pools[(model, group)]

    def time_fn(self, fn: Callable[[int], None]) -> float:
        """µs per call of fn(j): on CUDA from a graph of fn(0) .. fn(reps - 1) (best of 5 replays); on CPU one
        eager call of fn(1) (the dry run: the rotation's second copy)."""
        torch = self.torch
        if not self.cuda:
            t0 = time.perf_counter()
            fn(1)
            return (time.perf_counter() - t0) * 1e6
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for j in range(self.reps):
                fn(j)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(5):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) * 1e3 / self.reps)
        del graph
        return best

    def shape(self, model: str, group: str, t: int, d: int) -> ShapeResult:
        """Sweep one shape: returns its result (also when the budget ran out part-way; self.stop says so)."""
        torch = self.torch
        from kernels.capturable import FixedLoRAMeta, LaunchConfig, fixed_tiles, max_fixed_tiles
        from kernels.metadata import LoRAMeta
        from kernels.triton_shrink import _split_k

        k, ns = group_shape(group, *self.models[model])
        copies = self.pool(model, group)
        used = torch.randperm(self.slots, generator=self.host_gen)[:d].tolist()
        fms = []
        for j in range(self.copies):  # rotation j: the slot set shifted by j * D (distinct slots within a step)
            meta = LoRAMeta.from_token_slots([(used[i % d] + j * d) % self.slots for i in range(t)],
                                             device=self.device)
            tiles = fixed_tiles(meta)
            tiles += [(0, 0, 0, 0, 0)] * (max_fixed_tiles(t, self.slots) - len(tiles))
            fms.append(FixedLoRAMeta(token_indices=meta.token_indices, num_tokens=t,
                                     tiles=torch.tensor(tiles, dtype=torch.int32, device=self.device).view(-1, 5)))
        fm, mods = fms[0], copies[0]
        x = torch.randn(t, k, generator=self.host_gen).to(self.dtype).to(self.device)
        y0 = torch.randn(t, sum(ns), generator=self.host_gen).to(self.dtype).to(self.device)
        programs = len(ns) * fm.tiles.shape[0] * -(-self.rank // 16)
        run = _Shape(self, fms, x, y0, copies, ns, programs)
        ref = y0.clone()
        run.apply(ref, None)
        want = _torch_reference(x, y0, mods, [used[i % d] for i in range(t)], ns, self.pages, self.rank, self.scales)
        ideal = x.element_size() * (t * k + d * self.rank * sum(k + n for n in ns) + 2 * t * sum(ns))
        res = ShapeResult(model=model, group=group, k=k, ns=ns, tokens=t, adapters=d, ideal_mb=ideal / 1e6,
                          tol=self.rel_tol * float(ref.float().abs().max()),
                          default_err=float((ref.float() - want).abs().max()))
        run.ref, run.res = ref, res
        default = LaunchConfig()
        grid = DRY_GRID if self.args.dry_run else GRID
        stage1 = [run.trial(default)]  # 1. shrink: BLOCK_K x split-K {auto, 1, 2x auto, auto / 2}
        for bk in grid["block_k"]:
            auto = _split_k(programs, k, bk, self.device)
            for sk in (None, 1, 2 * auto, max(1, auto // 2)):
                stage1.append(run.trial(LaunchConfig(block_k=bk, split_k=sk)))
        b1 = _best(stage1)
        base = run.cfgs[b1.label] if b1 else default
        stage2 = [b1] + [run.trial(dataclasses.replace(base, shrink_warps=w)) for w in grid["shrink_warps"]]
        stage2 += [run.trial(dataclasses.replace(base, shrink_stages=st)) for st in grid["shrink_stages"]]
        b2 = _best(stage2)  # 2. shrink warps, stages around the best of 1
        base = run.cfgs[b2.label] if b2 else base
        for bn in grid["block_n"]:  # 3. expand on the best shrink
            for w in grid["expand_warps"]:
                run.trial(dataclasses.replace(base, block_n=bn, expand_warps=w))
        best = _best(res.trials)
        if best is None:
            return res
        best_cfg = run.cfgs[best.label]
        if self.cuda and not self.stop and not self.over_budget():  # paired re-time: default and best alternated
            d_us, b_us = [], []
            for _ in range(3):
                d_us.append(run.time(default))
                b_us.append(run.time(best_cfg))
            res.default_us, res.best_us = min(d_us), min(b_us)
        else:
            dflt = next((tr for tr in res.trials if tr.label == "default"), None)
            res.default_us, res.best_us = (dflt.us if dflt else None), best.us
        res.best_label, res.best_launch = best.label, best.launch
        if res.default_us and res.best_us:
            res.speedup = res.default_us / res.best_us
            res.best_gbps = ideal / res.best_us / 1e3
            if self.peak:
                res.best_pct_roof = 100 * res.best_gbps / self.peak
                res.default_pct_roof = 100 * ideal / res.default_us / 1e3 / self.peak
        return res


class _Shape:
    """One shape's inputs and its trials (deduplicated by the launch they resolve to)."""

    def __init__(self, tuner: Tuner, fms: list, x: Any, y0: Any, copies: list, ns: list[int], programs: int
                 ) -> None:
        self.tuner, self.fms, self.x, self.y0, self.copies, self.ns = tuner, fms, x, y0, copies, ns
        self.programs = programs
        self.cols = [0]
        for n in ns:
            self.cols.append(self.cols[-1] + n)
        self.seen: dict[tuple, Trial] = {}
        self.cfgs: dict[str, Any] = {}  # trial label -> the configuration it ran
        self.ref: Any = None
        self.res: ShapeResult | None = None

    def apply(self, y: Any, cfg: Any, j: int = 0) -> None:
        """y += the LoRA deltas of rotation j (pool copy j, slot set j); the check and the reference use 0."""
        from kernels import capturable, fused_lora  # looked up per call (tests wrap them)

        tn = self.tuner
        mods, fm = self.copies[j % len(self.copies)], self.fms[j % len(self.fms)]
        ys = [y[:, self.cols[i]:self.cols[i + 1]] for i in range(len(self.ns))]
        if len(self.ns) == 1:
            a, b = mods[0]
            capturable.lora_apply_fixed(self.x, ys[0], a, b, tn.ranks, tn.scales, fm, pages=tn.pages, config=cfg)
        else:
            fused_lora.lora_apply_fused(self.x, ys, [(a, b, tn.ranks, tn.scales, tn.pages) for a, b in mods], fm,
                                        config=cfg)

    def time(self, cfg: Any) -> float:
        buf = self.y0.clone()
        return self.tuner.time_fn(lambda j: self.apply(buf, cfg, j))

    def resolved(self, cfg: Any) -> dict[str, int]:
        from kernels.capturable import expand_launch, shrink_launch

        sl = shrink_launch(self.x.shape[1], self.programs, self.tuner.device, cfg)
        bn, _, kw = expand_launch(16, max(self.ns), cfg)
        return dict(block_k=sl.block_k, split_k=sl.split_k, shrink_warps=sl.kw["num_warps"], block_n=bn,
                    expand_warps=kw["num_warps"])

    def trial(self, cfg: Any) -> Trial | None:
        """Run cfg once against the default's output, then time it if it matches; None when out of budget."""
        tn, res, torch = self.tuner, self.res, self.tuner.torch
        assert res is not None
        launch = self.resolved(cfg)
        key = tuple(sorted(launch.items())) + (cfg.shrink_stages, cfg.expand_stages)
        if key in self.seen:  # an override that resolves to a launch already tried
            return self.seen[key]
        if tn.stop or tn.over_budget():
            tn.stop = tn.stop or (f"budget of {tn.args.budget_s:.0f} s spent during {res.model} {res.group} "
                                  f"{res.tokens}x{res.adapters}")
            return None
        tr = Trial(label=cfg.label(), launch=launch)
        try:
            y = self.y0.clone()
            self.apply(y, cfg)
            tr.max_err = float((y.float() - self.ref.float()).abs().max())
            tr.ok = bool(torch.isfinite(y).all()) and tr.max_err <= res.tol
            if tr.ok:
                tr.us = self.time(cfg)
        except Exception as e:  # noqa: BLE001 - a config that fails is reported, the sweep goes on
            tr.ok, tr.error = False, f"{type(e).__name__}: {str(e)[:200]}"
            if tn.cuda:
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 - the context is gone: nothing more can run
                    tn.stop = f"CUDA error at {tr.label}: {tr.error}"
        if not tr.ok:
            res.wrong.append(tr.label)
        self.seen[key] = tr
        self.cfgs[tr.label] = cfg
        res.trials.append(tr)
        return tr


def _best(trials: list[Trial | None]) -> Trial | None:
    """The fastest trial whose output matched the default's (a wrong one is never chosen)."""
    good = [tr for tr in trials if tr is not None and tr.ok and tr.us is not None]
    return min(good, key=lambda tr: tr.us) if good else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--budget-s", type=float, default=90.0, help="stop the sweep after this many seconds")
    ap.add_argument("--models", nargs="+", default=None, choices=list(MODELS))
    ap.add_argument("--groups", nargs="+", default=None, choices=ALL_GROUPS)
    ap.add_argument("--cases", nargs="+", default=None, help="TxD, e.g. 64x64 1x1 (default: the six decode cases)")
    ap.add_argument("--reps", type=int, default=None, help="applications per timed graph (default 16)")
    ap.add_argument("--copies", type=int, default=None,
                    help="A/B pool copies (and slot sets) the applications rotate over (default 8: L2-cold)")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--out", default=None, help="write the JSON here")
    out.add_argument("--into", default=None, help="store the JSON under 'tune' of this (existing or new) JSON file")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    cases = ([tuple(int(v) for v in c.split("x")) for c in args.cases] if args.cases else
             ([(2, 2)] if args.dry_run else CASES))
    tn = Tuner(args)
    print(f"device: {tn.result['device']}; dtype {tn.dtype}; r={tn.rank}, {tn.slots} slots, page rank "
          f"{tn.page_rank}; budget {args.budget_s:.0f} s; {tn.reps} applications per timed graph over "
          f"{tn.copies} pool copies"
          + (f"; HBM peak {tn.peak:.0f} GB/s" if tn.peak else ""))
    head = (f"{'model':<6} {'group':<7} {'T':>3} {'D':>3} | {'default':>8} {'best':>8} {'x':>5} | {'GB/s':>6} "
            f"{'%roof':>5} | {'tried':>5} {'wrong':>5} | best config")
    print(head + "\n" + "-" * len(head))
    for t, d in cases:
        for model in tn.models:
            for group in args.groups or GROUPS:
                if tn.stop or d > t or d > tn.slots:
                    continue
                if tn.over_budget():
                    tn.stop = f"budget of {args.budget_s:.0f} s spent before {model} {group} {t}x{d}"
                    continue
                res = tn.shape(model, group, t, d)
                if res.trials:
                    tn.result["shapes"].append(dataclasses.asdict(res))
                    tn.save()
                    _print_row(res)
    result = tn.result
    result["complete"], result["stopped"] = tn.stop is None, tn.stop
    result["summary"] = _summary(result["shapes"])
    tn.save()
    if tn.stop:
        print(f"tune_lora: stopped: {tn.stop}")
    print(f"tune_lora: {len(result['shapes'])} shapes in {result['elapsed_s']} s; times in µs per launch pair "
          f"(graph of {tn.reps}); x = default / best (paired re-time); GB/s and %roof of the best")
    for line in result["summary"]["lines"]:
        print(line)
    if args.out or args.into:
        print(f"wrote {args.out or args.into}" + (" (key 'tune')" if args.into else ""))
    return result


def _torch_reference(x: Any, y0: Any, mods: list, token_slots: list[int], ns: list[int], pages: Any, rank: int,
                     scales: Any) -> Any:
    """y0 + scale * (x @ A_s.T) @ B_s.T per token in float32, through the page table."""
    import torch

    out = y0.float().clone()
    t = len(token_slots)
    slot = torch.tensor(token_slots, device=x.device)
    col = 0
    for (a, b), n in zip(mods, ns, strict=True):
        pg = pages[slot].long()  # [T, MP]
        a_t = a[pg].float().reshape(t, -1, a.shape[2])[:, :rank]  # [T, r, K]
        b_t = b[pg].float().permute(0, 1, 3, 2).reshape(t, -1, n)[:, :rank]  # [T, r, N]
        h = torch.einsum("tk,trk->tr", x.float(), a_t)
        out[:, col:col + n] += scales[slot, None] * torch.einsum("tr,trn->tn", h, b_t)
        col += n
    return out


def _summary(shapes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per group the median speed-up and the most frequent best launch (what to make the default)."""
    lines, per_group = [], {}
    for group in ALL_GROUPS:
        rows = [s for s in shapes if s["group"] == group and s["speedup"]]
        if not rows:
            continue
        labels = [s["best_label"] for s in rows]
        common = max(set(labels), key=labels.count)
        per_group[group] = dict(shapes=len(rows), median_speedup=statistics.median(s["speedup"] for s in rows),
                                most_common_best=common, times_best=labels.count(common))
        lines.append(f"  {group:<7}: {len(rows)} shapes, median speed-up {per_group[group]['median_speedup']:.2f}x; "
                     f"most often best: {common} ({labels.count(common)}/{len(rows)})")
    wrong = sum(len(s["wrong"]) for s in shapes)
    lines.append(f"  configurations refused (output off the default's or failed): {wrong}")
    return {"groups": per_group, "wrong": wrong, "lines": lines}


def _print_row(r: ShapeResult) -> None:
    def f(v: float | None, w: int = 8, p: int = 1) -> str:
        return f"{v:{w}.{p}f}" if v is not None else f"{'-':>{w}}"

    print(f"{r.model:<6} {r.group:<7} {r.tokens:>3} {r.adapters:>3} | {f(r.default_us)} {f(r.best_us)} "
          f"{f(r.speedup, 5, 2)} | {f(r.best_gbps, 6, 0)} {f(r.best_pct_roof, 5)} | {len(r.trials):>5} "
          f"{len(r.wrong):>5} | {r.best_label} {r.best_launch}", flush=True)


def _write(path: str, doc: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
