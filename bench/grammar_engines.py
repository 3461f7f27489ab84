"""xgrammar vs llguidance on peftserve's sampler path (CPU, the default model's tokenizer).

For each engine: one-time tokenizer setup, compile time per distinct JSON schema (cold), and per decode
step of one constrained row the cost of what the sampler does: fill the row's bitmask, apply it to a
[1, vocab] fp32 logits row, accept the token. The token path is a valid instance of each schema, tokenized
by the model's tokenizer. llguidance is not a dependency (xgrammar was chosen): `pip install llguidance`
first to compare.
Run: OMP_NUM_THREADS=1 .venv/bin/python bench/grammar_engines.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

SCHEMAS = [
    ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
      "required": ["name", "age"]}, {"name": "Ada", "age": 36}),
    ({"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "array", "items": {"type": "integer"}, "maxItems": 5},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                  "required": ["lat", "lon"]}},
      "required": ["city", "unit", "days", "where"]},
     {"city": "Paris", "unit": "celsius", "days": [1, 2, 3], "where": {"lat": 48.85, "lon": 2.35}}),
    ({"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                         "qty": {"type": "integer", "minimum": 1}, "gift": {"type": "boolean"}},
        "required": ["sku", "qty"]}}, "note": {"type": ["string", "null"]}}, "required": ["items"]},
     {"items": [{"sku": "ABC-123", "qty": 2, "gift": True}, {"sku": "XYZ-999", "qty": 1}], "note": None}),
]


def instance_ids(tok, inst) -> list[int]:
    return tok(json.dumps(inst), add_special_tokens=False)["input_ids"]


def bench_xgrammar(tok, vocab: int, eos: int) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[eos])
    comp = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    setup = time.perf_counter() - t0
    compile_s, step_us = [], []
    logits = torch.randn(1, vocab)
    mask = xgr.allocate_token_bitmask(1, vocab)
    for schema, inst in SCHEMAS:
        t0 = time.perf_counter()
        cg = comp.compile_json_schema(json.dumps(schema), any_whitespace=False)
        compile_s.append(time.perf_counter() - t0)
        m = xgr.GrammarMatcher(cg)
        for t in [*instance_ids(tok, inst), eos]:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask, 0)
            xgr.apply_token_bitmask_inplace(logits, mask)
            assert m.accept_token(t), ("xgrammar refused", tok.decode([t]))
            step_us.append((time.perf_counter() - t0) * 1e6)
        assert m.is_terminated()
    return {"setup_s": setup, "compile_s": compile_s, "step_us_mean": statistics.mean(step_us),
            "step_us_p50": statistics.median(step_us),
            "step_us_p95": sorted(step_us)[int(0.95 * len(step_us))], "steps": len(step_us)}


def bench_llguidance(tok, vocab: int, eos: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=eos)
    setup = time.perf_counter() - t0
    compile_s, step_us = [], []
    logits = torch.randn(1, vocab)
    mask = lt.allocate_token_bitmask(1, vocab)
    for schema, inst in SCHEMAS:
        t0 = time.perf_counter()
        fixed = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
        s = dict(schema, **{"x-guidance": fixed})
        grm = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(s))
        m = llguidance.LLMatcher(lltok, grm)
        assert not m.is_error(), m.get_error()
        compile_s.append(time.perf_counter() - t0)
        for t in [*instance_ids(tok, inst), eos]:
            t0 = time.perf_counter()
            lt.fill_next_token_bitmask(m, mask, 0)
            lt.apply_token_bitmask_inplace(logits, mask)
            assert m.consume_token(t), ("llguidance refused", tok.decode([t]), m.get_error())
            step_us.append((time.perf_counter() - t0) * 1e6)
        assert m.is_stopped() or m.is_accepting()
    return {"setup_s": setup, "compile_s": compile_s, "step_us_mean": statistics.mean(step_us),
            "step_us_p50": statistics.median(step_us),
            "step_us_p95": sorted(step_us)[int(0.95 * len(step_us))], "steps": len(step_us)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the converted default model)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    if a.model is None:
        from server.model.default_model import ensure_default_model
        a.model = ensure_default_model(os.environ.get("PEFTSERVE_TEST_MODEL_CACHE") or ".cache/peftserve")
    tok = AutoTokenizer.from_pretrained(a.model)
    vocab, eos = len(tok), tok.eos_token_id
    out = {"xgrammar": bench_xgrammar(tok, vocab, eos), "llguidance": bench_llguidance(tok, vocab, eos),
           "loadavg": open("/proc/loadavg").read().split()[:3]}
    for k in ("xgrammar", "llguidance"):
        r = out[k]
        print(f"{k:10s} setup {r['setup_s']*1e3:8.1f} ms  compile/schema "
              + " ".join(f"{c*1e3:7.1f}" for c in r["compile_s"])
              + f" ms  step mean {r['step_us_mean']:7.1f} us  p50 {r['step_us_p50']:6.1f} us"
              + f"  p95 {r['step_us_p95']:7.1f} us  ({r['steps']} steps)")
    print("loadavg", *out["loadavg"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
