"""Diagnostic helpers of bench/gpu_e2e.py: graph-vs-eager divergence, an fp32 reference, profiler tables.

Pure functions over outputs and logits (unit-tested on CPU in tests/bench/test_gpu_diag.py) plus the float32
Hugging Face twin the teacher-forced check compares against. Imports no web stack (the GPU machine has none).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

LORA_PROJ = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def first_diffs(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """Per sequence, the index of the first output token where `a` and `b` differ (None: equal), and its
    min / median and how many sequences differ already at token 0 (the prefill's token) or token 1."""
    idx: list[int | None] = []
    for x, y in zip(a, b, strict=True):
        n = min(len(x), len(y))
        i = next((k for k in range(n) if x[k] != y[k]), None)
        idx.append(n if i is None and len(x) != len(y) else i)
    d = [i for i in idx if i is not None]
    return {"seqs": len(idx), "differ": len(d), "first_diff": idx, "min": min(d) if d else None,
            "median": statistics.median(d) if d else None,
            "at_token_0": sum(i == 0 for i in d), "at_token_1": sum(i == 1 for i in d)}


def compare_logits(ref: torch.Tensor, other: torch.Tensor) -> dict[str, Any]:
    """How far `other` [rows, vocab] is from `ref`: max / mean |diff|, the logits' scale (max |ref|), their ratio,
    the fraction of rows whose argmax agrees, and the top-1 minus top-2 margins of ref (median over all rows,
    largest over the rows that flipped: a flip whose margin is below the diff is a near tie, not a wrong row)."""
    ref, other = ref.detach().float().cpu(), other.detach().float().cpu()
    if ref.shape != other.shape or ref.dim() != 2 or ref.shape[0] == 0:
        raise ValueError(f"compare_logits needs two equal [rows, vocab] shapes, got {tuple(ref.shape)} and "
                         f"{tuple(other.shape)}")
    diff = (other - ref).abs()
    row_max = diff.max(-1).values
    scale = float(ref.abs().max())
    top2 = ref.topk(min(2, ref.shape[1]), dim=-1).values
    margin = top2[:, 0] - top2[:, -1]
    flips = other.argmax(-1) != ref.argmax(-1)
    max_abs = float(diff.max())
    return {"rows": int(ref.shape[0]), "max_abs": max_abs, "mean_abs": float(diff.mean()), "scale": scale,
            "rel": max_abs / scale if scale else float("inf"), "argmax_agree": 1.0 - float(flips.float().mean()),
            "flips": int(flips.sum()), "row_max_abs_median": float(row_max.median()),
            "margin_median": float(margin.median()),
            "flip_margin_max": float(margin[flips].max()) if bool(flips.any()) else None}


def verdict(tf: dict[str, Any], ref: dict[str, Any] | None, *, ratio_ok: float = 2.0) -> dict[str, Any]:
    """Graph decode vs eager for one workload, from the teacher-forced comparison `tf` (compare_logits(eager,
    graphs)) and, when there is one, `ref`: {"eager": compare_logits(fp32, eager), "graphs": ...}.

    ok: with a reference, the graph path's error against fp32 is at most `ratio_ok` x the eager path's
    (and every flip is a near tie); without one, the rows agree to within 5 % of the logits' scale.
    A flip is a near tie when eager's top-1 minus top-2 margin there is at most 3x the median row's max |diff|
    (typical rounding could swap them); a larger margin flipped means that row is wrong, not rounded.
    """
    near_ties = tf["flips"] == 0 or (tf["flip_margin_max"] is not None
                                     and tf["flip_margin_max"] <= 3 * tf["row_max_abs_median"])
    if ref is not None:
        e, g = ref["eager"]["max_abs"], ref["graphs"]["max_abs"]
        ratio = g / e if e else (1.0 if g == 0 else float("inf"))
        ok = ratio <= ratio_ok and near_ties
        text = (f"graph err vs fp32 {g:.3g} = {ratio:.2f}x eager's {e:.3g} "
                f"({'rounding' if ok else 'SUSPECT: graph path less accurate'})")
    else:
        ratio = None
        ok = tf["rel"] <= 0.05 and near_ties
        text = f"no fp32 reference; graph vs eager rel {tf['rel']:.3g} ({'rounding?' if ok else 'SUSPECT'})"
    text += (f"; teacher-forced argmax agree {100 * tf['argmax_agree']:.1f} % ({tf['flips']} flips"
             + (f", max flip margin {tf['flip_margin_max']:.3g} vs median row diff {tf['row_max_abs_median']:.3g})"
                if tf["flips"] else ")"))
    return {"ok": ok, "near_ties": near_ties, "graph_over_eager_err": ratio, "text": text}


def top_ops(averages: Any, steps: int, device: bool, k: int = 12) -> dict[str, Any]:
    """The top `k` entries of a profiler's key_averages(): with `device`, CUDA kernels by self device time,
    else CPU ops by self CPU time; per step: calls and microseconds."""
    from torch.autograd import DeviceType

    want = DeviceType.CUDA if device else DeviceType.CPU
    rows = []
    for e in averages:
        if getattr(e, "device_type", DeviceType.CPU) != want:
            continue
        if device:
            us = getattr(e, "self_device_time_total", None)
            us = getattr(e, "self_cuda_time_total", 0) if us is None else us
        else:
            us = e.self_cpu_time_total
        rows.append({"name": e.key[:90], "calls_per_step": e.count / steps, "us_per_step": us / steps})
    rows.sort(key=lambda r: r["us_per_step"], reverse=True)
    return {"activity": "cuda kernels" if device else "cpu ops", "steps": steps,
            "total_us_per_step": sum(r["us_per_step"] for r in rows), "top": rows[:k]}


class Fp32Twin:
    """The checkpoint as a float32 Hugging Face model (weights rounded to the runner's dtype first, so the
    comparison isolates compute rounding), with LoRA deltas added by forward hooks in float32."""

    def __init__(self, model_dir: str, device: torch.device, weight_dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(p.to(weight_dtype).float())
        self.device = device
        self.weight_dtype = weight_dtype
        self.adapter: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
        layers = self.model.model.layers
        for layer, block in enumerate(layers):
            for name, parent in LORA_PROJ.items():
                getattr(getattr(block, parent), name).register_forward_hook(self._hook(layer, name))

    def _hook(self, layer: int, name: str):  # noqa: ANN202
        def add(_mod: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            w = self.adapter.get((layer, name))
            return out if w is None else out + w[2] * (inputs[0] @ w[0].T) @ w[1].T
        return add

    def set_adapter(self, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] | None) -> None:
        """weights: {(layer, module): (A, B, scaling)} (rounded to the runner's dtype, as it holds them); None: base."""
        self.adapter = {k: (a.to(self.weight_dtype).float().to(self.device),
                            b.to(self.weight_dtype).float().to(self.device), float(s))
                        for k, (a, b, s) in (weights or {}).items()}

    @torch.no_grad()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """float32 logits [len(token_ids), vocab] of one sequence."""
        ids = torch.tensor([token_ids], device=self.device)
        return self.model(input_ids=ids).logits[0].float()
