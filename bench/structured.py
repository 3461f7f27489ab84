"""Guided decoding cost on the real default model (SmolLM2-135M-Instruct), CPU, through the engine:
tokens/s of a 32-request batch where half the requests are JSON-schema constrained, against the same batch
with none constrained, timed alternately in one process (ratios survive machine load; absolute numbers do
not). Every request generates exactly --output-len tokens (free ones ignore EOS; the schema needs more
tokens than that: an array with minItems 64), so both batches do the same work apart from the masks.
Also reported: the time spent filling and applying grammar masks, per decode step and as a share of the
constrained batch's wall time (a figure that, unlike the ratio, holds up on a loaded machine).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.structured [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import server.engine.async_engine as ae
import server.engine.sampler as smp
from bench.common import make_engine
from bench.real_model import chat_prompts
from server.engine.sequence import SamplingParams
from server.model.default_model import ensure_default_model
from server.structured.grammar import GuideSpec, compiler_for

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 24},
    "tags": {"type": "array", "minItems": 64, "items": {"type": "string", "maxLength": 12}}},
    "required": ["title", "tags"]}


class MaskTimer:
    """Wall time inside the engine's grammar_masks and the sampler's mask_logits (the guided-decoding cost)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        for mod, name in ((ae, "grammar_masks"), (smp, "mask_logits")):
            setattr(mod, name, self._wrap(getattr(mod, name)))

    def _wrap(self, fn: Any) -> Any:
        def timed(*a: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += fn.__name__ == "grammar_masks"
        return timed


def run(engine: Any, prompts: list[list[int]], params: list[SamplingParams]) -> dict[str, float]:
    async def one(p: list[int], sp: SamplingParams) -> int:
        n = 0
        async for d in engine.generate(p, sp):
            n += len(d.token_ids)
        return n

    async def main() -> list[int]:
        return await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params, strict=True)))

    t0 = time.perf_counter()
    counts = asyncio.run(main())
    dt = time.perf_counter() - t0
    return {"tokens": float(sum(counts)), "seconds": dt, "tok_per_s": sum(counts) / dt,
            "min_tokens_per_request": float(min(counts))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the converted default model)")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    model = a.model or ensure_default_model(os.environ.get("PEFTSERVE_TEST_MODEL_CACHE") or ".cache/peftserve")
    engine = make_engine(model, max_num_seqs=a.num_requests, max_model_len=1024)
    engine.start()
    tok = engine.tokenizer
    prompts = chat_prompts(tok, a.num_requests)
    t0 = time.perf_counter()
    compiler = compiler_for(tok, engine.info.vocab_size, sorted(engine.info.eos_token_ids))
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    guide = compiler.compile(GuideSpec.json_schema(SCHEMA))
    compile_s = time.perf_counter() - t0
    free = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)
    guided = SamplingParams(max_tokens=a.output_len, temperature=0.0, guide=guide)
    none_p = [free] * a.num_requests
    half_p = [guided if i % 2 == 0 else free for i in range(a.num_requests)]
    timer = MaskTimer()
    run(engine, prompts[:4], none_p[:4])  # warm-up
    rows: list[dict[str, Any]] = []
    for r in range(a.repeat):
        none = run(engine, prompts, none_p)
        before_s, before_calls = timer.seconds, timer.calls
        half = run(engine, prompts, half_p)
        mask_s = timer.seconds - before_s
        rows.append({"none": none, "half": half, "ratio": half["tok_per_s"] / none["tok_per_s"],
                     "mask_ms_per_step": 1e3 * mask_s / max(1, timer.calls - before_calls),
                     "mask_share": mask_s / half["seconds"]})
        print(f"repeat {r}: none {none['tok_per_s']:7.1f} tok/s   half constrained {half['tok_per_s']:7.1f} tok/s   "
              f"ratio {rows[-1]['ratio']:.3f}   mask {rows[-1]['mask_ms_per_step']:.2f} ms/step "
              f"({100 * rows[-1]['mask_share']:.1f}% of the constrained batch's wall time) "
              f"(min tokens/request {half['min_tokens_per_request']:.0f})", flush=True)
    engine.stop()
    ratios = sorted(x["ratio"] for x in rows)
    out = {"model": model, "num_requests": a.num_requests, "output_len": a.output_len, "rows": rows,
           "median_ratio": ratios[len(ratios) // 2], "tokenizer_setup_s": setup_s, "schema_compile_s": compile_s,
           "threads": engine.torch_threads, "loadavg": open("/proc/loadavg").read().split()[:3]}
    print(f"median ratio {out['median_ratio']:.3f} (target >= 0.9); tokenizer setup {setup_s:.2f} s, "
          f"schema compile {compile_s * 1e3:.1f} ms; threads {engine.torch_threads}; "
          f"loadavg {' '.join(out['loadavg'])}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
