"""The GPU run's diagnostics, on CPU: divergence statistics, the rounding-or-bug verdict, the profiler table,
the float32 twin the verdict trusts, and the summary rows built from them (bench/gpu_diag.py, gpu_summary.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from bench.gpu_diag import Fp32Twin, compare_logits, first_diffs, top_ops, verdict


def test_first_diffs_reports_where_each_sequence_parts() -> None:
    a = [[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9], [1, 2]]
    b = [[1, 2, 3, 4], [1, 2, 0, 4], [0, 6, 7, 8], [9, 0, 0, 0], [1, 2, 3]]
    d = first_diffs(a, b)
    assert d["first_diff"] == [None, 2, 0, 1, 2]  # a shorter output differs where it ends
    assert (d["seqs"], d["differ"], d["min"], d["median"]) == (5, 4, 0, 1.5)
    assert (d["at_token_0"], d["at_token_1"]) == (1, 1)
    assert first_diffs(a, a)["differ"] == 0 and first_diffs(a, a)["min"] is None


def _logits(rows: int = 64, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 4


def test_verdict_tells_rounding_from_a_wrong_path() -> None:
    ref = _logits()
    g = torch.Generator().manual_seed(1)
    eager = ref + 0.01 * torch.randn(ref.shape, generator=g)
    graphs = ref + 0.01 * torch.randn(ref.shape, generator=g)
    tf = compare_logits(eager, graphs)
    assert tf["rows"] == 64 and 0 < tf["max_abs"] < 0.1 and tf["rel"] == tf["max_abs"] / tf["scale"]
    fp32 = {"eager": compare_logits(ref, eager), "graphs": compare_logits(ref, graphs)}
    ok = verdict(tf, fp32)
    assert ok["ok"] and 0.5 < ok["graph_over_eager_err"] < 2 and "rounding" in ok["text"]

    # a graph path that is 10x less accurate than eager: not rounding, whatever the argmax says
    worse = ref + 0.1 * torch.randn(ref.shape, generator=g)
    bad = verdict(compare_logits(eager, worse), {"eager": fp32["eager"], "graphs": compare_logits(ref, worse)})
    assert not bad["ok"] and bad["graph_over_eager_err"] > 2 and "SUSPECT" in bad["text"]

    # one row computed for the wrong adapter: its argmax flips with a margin far above the rounding noise
    wrong = graphs.clone()
    row = int((ref.topk(2).values[:, 0] - ref.topk(2).values[:, 1]).argmax())  # the row with the widest margin
    wrong[row] = ref[row].flip(0)
    flipped = compare_logits(eager, wrong)
    assert flipped["flips"] >= 1 and flipped["flip_margin_max"] > 3 * flipped["row_max_abs_median"]
    no_ref = verdict(flipped, None)
    assert not no_ref["ok"] and not no_ref["near_ties"] and no_ref["graph_over_eager_err"] is None


def test_top_ops_counts_calls_and_time_per_step() -> None:
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):  # two "steps" of three matmuls and one add
            y = x @ x @ x @ x
            y.add_(1)
    out = top_ops(prof.key_averages(), steps=2, device=False, k=5)
    assert out["activity"] == "cpu ops" and out["steps"] == 2 and len(out["top"]) <= 5
    mm = next(t for t in out["top"] if t["name"] == "aten::mm")
    assert mm["calls_per_step"] == 3.0 and mm["us_per_step"] > 0
    assert out["top"] == sorted(out["top"], key=lambda t: -t["us_per_step"])
    assert out["total_us_per_step"] >= sum(t["us_per_step"] for t in out["top"])


def test_fp32_twin_matches_the_runner_with_and_without_a_lora(tiny_root: str) -> None:
    """The reference the verdict trusts: HF + hooked LoRA deltas give the fp32 runner's logits, and the
    adapter changes them."""
    from bench.gpu_e2e import random_lora
    from server.model.runner import ModelRunner, SeqChunk
    from tests.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(tiny_root)
    runner = ModelRunner(path, device="cpu", dtype="float32", num_blocks=8, max_model_len=64, max_adapters=1,
                         max_rank=4)
    adapter = random_lora(runner.info.shapes, 4, seed=3)
    runner.load_adapter(0, adapter)
    twin = Fp32Twin(path, torch.device("cpu"), torch.float32)
    tokens = [5, 17, 99, 3, 42, 7, 250, 11]
    got = {}
    for slot in (-1, 0):
        got[slot] = runner.execute([SeqChunk(slot + 1, tokens, 0, [slot + 1], True, adapter_slot=slot,
                                             logits_from=0)])
    twin.set_adapter(None)
    base = twin.logits(tokens)
    twin.set_adapter(adapter.weights())
    lora = twin.logits(tokens)
    assert (lora - base).abs().max() > 0.1  # the adapter changes the output
    torch.testing.assert_close(got[-1], base, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0], lora, atol=1e-4, rtol=1e-4)


def test_summary_rows_from_the_diagnostics(tmp_path: Path) -> None:
    """gpu_summary turns gpu_e2e's diagnostics into rows: a verdict per workload, prefill graphs/eager, the
    profiled decode gap; a bug-like graph path is marked NO."""
    from bench.gpu_e2e import Row
    from bench.gpu_summary import summarise

    def row(workload: str, mode: str, prefill: list[float]) -> dict:
        return asdict(Row(workload=workload, mode=mode, seqs=4, tok_per_s=100.0, ttft_p50_ms=1.0, ttft_p95_ms=1.0,
                          itl_p50_ms=1.0, itl_p95_ms=1.0, itl_b1_ms=2.0 if mode == "eager" else 0.5,
                          graph_replays=3, prefill_ms=prefill, prefill_host_ms=[p / 2 for p in prefill]))

    ref = _logits(8)
    eager, graphs = ref + 0.01, ref.clone()
    graphs[0] = ref[0].flip(0)  # one wrong row
    tf = compare_logits(eager, graphs)
    fp32 = {"eager": compare_logits(ref, eager), "graphs": compare_logits(ref, graphs)}
    diag = {
        "eager_repeat_mixed": {k: v for k, v in first_diffs([[1, 2]] * 4, [[1, 2]] * 4).items() if k != "first_diff"},
        "graphs_vs_eager": {
            "base": {"first_diff": first_diffs([[1, 2]] * 4, [[1, 2]] * 4)},
            "mixed": {"first_diff": first_diffs([[1, 2]] * 4, [[1, 3]] * 4), "teacher_forced": tf, "fp32": fp32,
                      "verdict": verdict(tf, fp32)}},
        "prefill_probe_mixed": {**{m: {"step_ms_p50": 50.0} for m in ("eager", "graphs")},
                                "eager_after_dropping_graphs": {"graphs_dropped": 4, "step_ms_p50": 25.0}},
        "profile": {f"{w} graphs decode": {"phase": "decode", "steps": 2, "wall_ms_per_step": 9.0, "cpu": None,
                                           "kernels": {"activity": "cuda kernels", "steps": 2, "total_us_per_step": us,
                                                       "top": [{"name": "lora_kernel", "calls_per_step": 32.0,
                                                                "us_per_step": us}]}}
                    for w, us in (("mixed", 5000.0), ("base", 2500.0))},
        "errors": ["profile base graphs decode: RuntimeError: CUPTI"],
    }
    for mode, us in (("eager", 8000.0), ("graphs", 12000.0)):
        diag["profile"][f"mixed {mode} prefill"] = {
            "phase": "prefill", "steps": 4, "wall_ms_per_step": us / 1e3,
            "kernels": {"activity": "cuda kernels", "steps": 4, "total_us_per_step": us, "top": []},
            "cpu": {"activity": "cpu ops", "steps": 4, "total_us_per_step": 1.0,
                    "top": [{"name": "cudaMalloc", "calls_per_step": 9.0, "us_per_step": 700.0}]}}
    e2e = {"args": {"dry_run": False}, "rows": [row("base", "eager", [10.0] * 4), row("mixed", "eager", [30.0] * 4),
                                                 row("base", "graphs", [10.0] * 4), row("mixed", "graphs", [60.0] * 4)],
           "diagnostics": diag, "decode_bytes_bound": {"base_mb": 1946.0, "lora_mb": 1443.0, "distinct": 64,
                                                        "ratio": 0.574}}
    (tmp_path / "gpu_e2e.json").write_text(json.dumps(e2e))
    rows = {r["name"]: r for r in summarise(str(tmp_path))}
    v = rows["graph decode vs eager (mixed): teacher-forced argmax agree %"]
    assert v["met"] is False and v["value"] == 100 * tf["argmax_agree"] < 100
    assert "0/4 sequences equal, first differing token min 1" in v["detail"] and "again: 4/4 equal" in v["detail"]
    assert rows["graph decode vs eager (base)"]["detail"].startswith("4/4 sequences equal")
    p = rows["mixed prefill step, graphs mode / eager (no prefill graph)"]
    assert p["value"] == 2.0 and p["met"] is False and "host 15.0 -> 30.0 ms" in p["detail"]
    assert "graphs 50.0 ms, eager with no captured graph 25.0 ms" in p["detail"]
    gap = rows["mixed - base profiled cuda kernels time per decode step, graphs (ms)"]
    assert gap["value"] == 2.5 and gap["met"] is None and "lora_kernel 5000 us" in gap["detail"]
    pp = rows["mixed prefill profiled cuda kernels per step, graphs attached / eager"]
    assert pp["value"] == 1.5 and "8.0 -> 12.0 ms/step" in pp["detail"] and "cudaMalloc 700 us" in pp["detail"]
    assert "bytes bound 0.57 (1443 MB LoRA / 1946 MB base a step)" in rows[
        "mixed 64 adapters / base tokens/s (graphs mode)"]["detail"]
    err = rows["gpu_e2e diagnostics that failed"]
    assert err["value"] == 1 and err["met"] is False and "CUPTI" in err["detail"]


def test_decode_bytes_bound_counts_each_distinct_adapter_once(tmp_path: Path) -> None:
    """The mixed/base ceiling of a memory-bound decode step: base weights + the A/B of the distinct adapters
    in the batch, by hand for a 2-layer shape; and the summary row names it."""
    from bench.gpu_e2e import decode_bytes_bound, random_lora
    from server.model.shapes import BaseModelInfo

    info = BaseModelInfo(model_type="llama", num_layers=2, hidden_size=64, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)
    adapters = [random_lora(info, 4, seed=s) for s in range(3)]
    # per layer: A = r x (5 x 64 + 128 + 64 (o's input: 4 heads x 16)), B = r x (64 + 32 + 32 + 64 + 128 + 128 + 64)
    per_adapter = 2 * 4 * ((64 * 5 + 128 + 64) + (64 + 32 + 32 + 64 + 128 + 128 + 64))
    got = decode_bytes_bound(10_000, adapters, 2, 2)
    assert got["lora_mb"] * 1e6 == 2 * per_adapter * 2  # two distinct adapters, 2 bytes an element
    assert got["ratio"] == 20_000 / (20_000 + 4 * per_adapter)
    assert decode_bytes_bound(10_000, adapters, 3, 2)["ratio"] < got["ratio"]  # one more adapter, more bytes
