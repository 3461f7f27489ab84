"""Summarise gpu_check.sh's JSON files into summary.md (a short table against issue 20's targets) and summary.json.

    python -m bench.gpu_summary OUT_DIR

Targets: shrink/expand >= 70 % of the HBM roofline at decode shapes (tokens <= 16); paged decode attention
>= 70 % of HBM bandwidth at 4k context; mixed 64 adapters >= 0.8x base tokens/s; CUDA graphs cut the
batch-1 inter-token latency by >= 2x against eager. A missing input shows as "not run".
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
from typing import Any


def _bytes_bound(e: dict[str, Any]) -> str:
    """The workload's mixed/base ceiling when both stream their weights at one bandwidth (gpu_e2e)."""
    b = e.get("decode_bytes_bound")
    if not b:
        return ""
    return f"; bytes bound {b['ratio']:.2f} ({b['lora_mb']:.0f} MB LoRA / {b['base_mb']:.0f} MB base a step)"


def _load(out: str, name: str) -> dict[str, Any] | None:
    path = os.path.join(out, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def summarise(out: str) -> list[dict[str, Any]]:
    """One row per target: name, measured value, target, met (None when not measurable here)."""
    rows: list[dict[str, Any]] = []
    k = _load(out, "bench_kernels.json")
    if k is None:
        rows.append(dict(name="shrink+expand % of HBM roofline, tokens <= 16", value=None, target=">= 70 %",
                         met=None, detail="not run"))
    else:
        dec = [r for r in k["results"] if r["tokens"] <= 16 and r["roofline_us"]]
        vals = [100 * r["roofline_us"] / r["ours_apply_us"] for r in dec]
        med = statistics.median(vals) if vals else None
        rows.append(dict(name="shrink+expand % of HBM roofline, tokens <= 16 (median)", value=med, target=">= 70 %",
                         met=None if med is None else med >= 70,
                         detail=f"{len(vals)} shapes, min {min(vals):.1f} %" if vals else
                         f"no roofline on {k['device']} (CPU or unknown GPU)"))
    fz = _load(out, "bench_fused.json")
    if fz is not None and "rows" in fz:  # fused q/k/v from a CUDA graph (what LoRA decode graphs replay)
        dec = [r for r in fz["rows"] if r["tokens"] <= 16 and r["fused_graph_pct_roof"] is not None]
        vals = [r["fused_graph_pct_roof"] for r in dec]
        med = statistics.median(vals) if vals else None
        gain = [r["fixed_graph_us"] / r["fused_graph_us"] for r in dec if r["fused_graph_us"]]
        rows.append(dict(name="fused q/k/v LoRA in a graph, % of HBM roofline, tokens <= 16 (median)", value=med,
                         target=">= 70 %", met=None if med is None else med >= 70,
                         detail=(f"{len(vals)} shapes; 3 fixed pairs / fused: median "
                                 f"{statistics.median(gain):.2f}x") if gain else f"no graph figures on {fz['device']}"))
    if fz is not None and fz.get("tune"):
        rows.append(_tune_row(fz["tune"]))
    a = _load(out, "bench_attention.json")
    if a is None:
        rows.append(dict(name="paged decode attention % of HBM peak at 4k", value=None, target=">= 70 %",
                         met=None, detail="not run"))
    else:
        at4k = [r for r in a["results"] if r["context"] == 4096 and r["pct_of_peak"] is not None]
        best = max((r["pct_of_peak"] for r in at4k), default=None)
        detail = (", ".join(f"{r['seqs']} seqs {r['ours_gbps']:.0f} GB/s" for r in at4k) if at4k else
                  f"no 4k/peak figures on {a['device']}")
        rows.append(dict(name="paged decode attention % of HBM peak at 4k (best batch)", value=best,
                         target=">= 70 %", met=None if best is None else best >= 70, detail=detail))
    e = _load(out, "gpu_e2e.json")
    if e is None:
        rows.append(dict(name="mixed 64 adapters / base tokens/s", value=None, target=">= 0.8", met=None,
                         detail="not run"))
        rows.append(dict(name="batch-1 ITL eager / graphs", value=None, target=">= 2x", met=None, detail="not run"))
    else:
        by = {(r["workload"], r["mode"]): r for r in e["rows"]}
        tps = {key: r["tok_per_s"] for key, r in by.items()}
        ratio = tps[("mixed", "graphs")] / tps[("base", "graphs")]
        rows.append(dict(name="mixed 64 adapters / base tokens/s (graphs mode)", value=ratio, target=">= 0.8",
                         met=ratio >= 0.8, detail=f"eager: {tps[('mixed', 'eager')] / tps[('base', 'eager')]:.2f}"
                         + _bytes_bound(e)))
        for name in ("base", "mixed"):  # mixed: decode steps replay the LoRA graphs (fixed-shape metadata)
            eager_b1, graph_b1 = by[(name, "eager")]["itl_b1_ms"], by[(name, "graphs")]["itl_b1_ms"]
            lora = by[(name, "graphs")].get("lora_graph_replays", 0)
            rows.append(dict(name=f"batch-1 ITL eager / graphs ({name})", value=eager_b1 / graph_b1, target=">= 2x",
                             met=eager_b1 / graph_b1 >= 2,
                             detail=f"{eager_b1:.2f} ms -> {graph_b1:.2f} ms; LoRA graph replays {lora}"))
        diag = _diagnostic_rows(e)
        rows += diag
        if e["args"].get("dry_run"):  # CPU figures of a tiny model say nothing about the targets
            for r in rows[-3 - len(diag):]:
                r["met"], r["detail"] = None, "dry run on CPU (no CUDA graphs): plumbing only; " + r["detail"]
    return rows


def _tune_row(t: dict[str, Any]) -> dict[str, Any]:
    """bench.tune_lora's sweep (bench_fused.json "tune"): the best fused q/k/v launch config against the default,
    both replayed from a CUDA graph (paired re-time), as the median speed-up over the q/k/v shapes swept."""
    qkv = [s for s in t["shapes"] if s["group"] == "qkv" and s.get("speedup")]
    med = statistics.median(s["speedup"] for s in qkv) if qkv else None
    parts = [f"{s['model']} {s['tokens']}x{s['adapters']}: {s['default_us']:.1f} -> {s['best_us']:.1f} us "
             f"({s['best_label']})" for s in qkv[:3]]
    g = (t.get("summary") or {}).get("groups", {}).get("qkv")
    if g:
        parts.append(f"most often best {g['most_common_best']} ({g['times_best']}/{g['shapes']})")
    wrong = sum(len(s["wrong"]) for s in t["shapes"])
    parts.append(f"{len(t['shapes'])} shapes swept in {t.get('elapsed_s', 0):.0f} s, {wrong} configs refused"
                 + ("" if t.get("complete") else f"; stopped: {t.get('stopped')}"))
    detail = "; ".join(parts) if qkv else "no q/k/v shape finished: " + "; ".join(parts)
    if t.get("dry_run"):
        detail = "dry run on CPU (interpreter): plumbing only; " + detail
    return dict(name="best fused q/k/v config vs default (graph), speed-up (median)", value=med,
                target="(diagnostic)", met=None, detail=detail)


def _diagnostic_rows(e: dict[str, Any]) -> list[dict[str, Any]]:
    """gpu_e2e's diagnostics as rows: graphs vs eager per workload (rounding or a bug), prefill step time with
    the graphs attached vs eager (prefill never replays one), and the profiled decode device time."""
    rows: list[dict[str, Any]] = []
    d = e.get("diagnostics") or {}
    rep = d.get("eager_repeat_mixed")
    for name, g in (d.get("graphs_vs_eager") or {}).items():
        fd, v = g["first_diff"], g.get("verdict")
        detail = (f"{fd['seqs'] - fd['differ']}/{fd['seqs']} sequences equal"
                  + (f", first differing token min {fd['min']} median {fd['median']} ({fd['at_token_0']} at 0, "
                     f"{fd['at_token_1']} at 1)" if fd["differ"] else ""))
        if name == "mixed" and rep:
            detail += f"; eager vs eager again: {rep['seqs'] - rep['differ']}/{rep['seqs']} equal"
        if v is None:
            rows.append(dict(name=f"graph decode vs eager ({name})", value=None, target="rounding", met=None,
                             detail=detail + "; no teacher-forced check"))
            continue
        tf = g["teacher_forced"]
        rows.append(dict(name=f"graph decode vs eager ({name}): teacher-forced argmax agree %",
                         value=100 * tf["argmax_agree"], target="rounding (graph err vs fp32 <= 2x eager's)",
                         met=v["ok"], detail=f"{v['text']}; {detail}"))
    by = {(r["workload"], r["mode"]): r for r in e["rows"]}
    pe, pg = (by.get(("mixed", m), {}).get("prefill_ms") for m in ("eager", "graphs"))
    if pe and pg:
        me, mg = statistics.median(pe), statistics.median(pg)
        he, hg = (statistics.median(by[("mixed", m)]["prefill_host_ms"]) for m in ("eager", "graphs"))
        detail = f"p50 step {me:.1f} -> {mg:.1f} ms (host {he:.1f} -> {hg:.1f} ms)"
        probe = d.get("prefill_probe_mixed")
        if probe:
            detail += (f"; alternated after captures: eager {probe['eager']['step_ms_p50']:.1f}, graphs "
                       f"{probe['graphs']['step_ms_p50']:.1f} ms")
            if "eager_after_dropping_graphs" in probe:
                detail += f", eager with no captured graph {probe['eager_after_dropping_graphs']['step_ms_p50']:.1f} ms"
        rows.append(dict(name="mixed prefill step, graphs mode / eager (no prefill graph)", value=mg / me,
                         target="~1 (<= 1.2)", met=mg / me <= 1.2, detail=detail))
    prof = d.get("profile") or {}
    mixed, base = prof.get("mixed graphs decode"), prof.get("base graphs decode")
    if mixed and base:
        mt, bt = (p["kernels"] or p["cpu"] for p in (mixed, base))
        gap = (mt["total_us_per_step"] - bt["total_us_per_step"]) / 1e3
        top = ", ".join(f"{t['name'][:40]} {t['us_per_step']:.0f} us" for t in mt["top"][:3])
        rows.append(dict(name=f"mixed - base profiled {mt['activity']} time per decode step, graphs (ms)",
                         value=gap, target="(diagnostic)", met=None,
                         detail=f"mixed {mt['total_us_per_step'] / 1e3:.2f} ms, base "
                                f"{bt['total_us_per_step'] / 1e3:.2f} ms; mixed top: {top}"))
    pe_, pg_ = prof.get("mixed eager prefill"), prof.get("mixed graphs prefill")
    if pe_ and pg_:
        te, tg = (p["kernels"] or p["cpu"] for p in (pe_, pg_))
        cpu_top = ", ".join(f"{t['name'][:30]} {t['us_per_step']:.0f} us" for t in pg_["cpu"]["top"][:3])
        rows.append(dict(name=f"mixed prefill profiled {te['activity']} per step, graphs attached / eager",
                         value=tg["total_us_per_step"] / te["total_us_per_step"] if te["total_us_per_step"] else None,
                         target="(diagnostic)", met=None,
                         detail=f"wall {pe_['wall_ms_per_step']:.1f} -> {pg_['wall_ms_per_step']:.1f} ms/step; "
                                f"graphs-attached CPU top: {cpu_top}"))
    errors = list(d.get("errors") or []) + ([f"fp32 twin: {d['fp32_twin_error']}"] if d.get("fp32_twin_error") else [])
    errors += [f"{n}: {g['error']}" for n, g in (d.get("graphs_vs_eager") or {}).items() if g.get("error")]
    if errors:
        rows.append(dict(name="gpu_e2e diagnostics that failed", value=len(errors), target="0", met=False,
                         detail="; ".join(errors)[:400]))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = args[0] if args else "./gpu_out"
    rows = summarise(out)
    device = next((d["device"] for d in (_load(out, n) for n in ("bench_attention.json", "bench_kernels.json"))
                   if d), "unknown")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# gpu_check summary: {stamp}, commit {_commit()}, {device}", "",
             "| target | measured | wanted | met | detail |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        v = "-" if r["value"] is None else f"{r['value']:.2f}"
        met = "n/a" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"| {r['name']} | {v} | {r['target']} | {met} | {r['detail']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"date": stamp, "commit": _commit(), "device": device, "targets": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
