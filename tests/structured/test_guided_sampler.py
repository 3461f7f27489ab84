"""Grammar masking in the sampler (fp32, the tiny byte tokenizer): constrained rows only ever pick tokens
their grammar allows and end in a document that validates; unconstrained rows of the same batch pick exactly
what they pick with no grammar anywhere; the compiled-grammar cache is bounded and keyed by spec."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from server.engine.guided import grammar_masks
from server.engine.sampler import sample
from server.engine.sequence import SamplingParams
from server.structured.grammar import GrammarError, GuideCompiler, GuideSpec
from tests.tiny import tiny_tokenizer

SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"enum": ["a", "bb"]}, "maxItems": 3},
    "inner": {"type": "object", "properties": {"n": {"enum": [1, 22, 333]}}, "required": ["n"]}},
    "required": ["ok", "color", "tags", "inner"]}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def compiler(tok) -> GuideCompiler:
    return GuideCompiler(tok, len(tok), [tok.eos_token_id], cache_size=3)


def run_batch(tok, guides: list, params: list[SamplingParams], steps: int, seed: int = 0):
    """Decode a batch from random logits (fp32) until every constrained row stops; per row its token ids,
    and per step what the unconstrained rows would have picked with no masks at all."""
    g = torch.Generator().manual_seed(seed)
    matchers = [gd.matcher() if gd is not None else None for gd in guides]
    out: list[list[int]] = [[] for _ in guides]
    free_ref: list[list[int]] = [[] for _ in guides]
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(guides))]
    gens_ref = [torch.Generator().manual_seed(100 + i) for i in range(len(guides))]
    for _ in range(steps):
        logits = torch.randn(len(guides), len(tok), generator=g) * 4
        before = logits.clone()
        live = [m if m is not None and not m.done else None for m in matchers]
        res = sample(logits, params, gens, None, grammar_masks(live))
        ref = sample(before.clone(), params, gens_ref, None, None)
        assert torch.equal(logits, before), "the sampler modified the caller's logits"
        for i, r in enumerate(res):
            if matchers[i] is None:
                out[i].append(r.token_id)
                free_ref[i].append(ref[i].token_id)
            elif not matchers[i].done:
                assert matchers[i].accept(r.token_id), f"row {i} sampled a token its grammar forbids"
                out[i].append(r.token_id)
    return out, free_ref, matchers


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_rows_follow_their_grammar_and_free_rows_are_untouched(tok, compiler, temperature) -> None:
    js = compiler.compile(GuideSpec.json_schema(SCHEMA))
    choice = compiler.compile(GuideSpec.choice(["yes", "no", "maybe"]))
    guides = [None, js, None, choice, js]
    params = [SamplingParams(temperature=temperature, seed=i) for i in range(len(guides))]
    out, free_ref, matchers = run_batch(tok, guides, params, steps=200)
    eos = tok.eos_token_id
    for i, gd in enumerate(guides):
        if gd is None:
            assert out[i] == free_ref[i], f"unconstrained row {i} changed by its neighbours' grammars"
            continue
        assert matchers[i].done and out[i][-1] == eos, f"row {i} never completed its grammar in 200 steps"
        text = tok.decode(out[i][:-1])
        if gd is js:
            jsonschema.validate(json.loads(text), SCHEMA)
        else:
            assert text in {"yes", "no", "maybe"}
    # random logits: a row without the mask would almost never write JSON, so the mask did the work
    assert not any(tok.decode(out[i]).startswith("{") for i in (0, 2))


def test_grammar_wins_over_min_tokens_suppression(tok, compiler) -> None:
    """Once the grammar is complete only EOS is allowed; min_tokens suppressing EOS must not leave the row
    with nothing to pick."""
    m = compiler.compile(GuideSpec.choice(["no"])).matcher()
    for t in tok("no", add_special_tokens=False)["input_ids"]:
        assert m.accept(t)
    logits = torch.randn(1, len(tok))
    res = sample(logits, [SamplingParams(temperature=0)], [None], [[tok.eos_token_id]], grammar_masks([m]))
    assert res[0].token_id == tok.eos_token_id


def test_logprobs_are_the_models_not_the_masked_ones(tok, compiler) -> None:
    m = compiler.compile(GuideSpec.choice(["yes"])).matcher()
    logits = torch.randn(1, len(tok))
    res = sample(logits.clone(), [SamplingParams(temperature=0, logprobs=0)], [None], None, grammar_masks([m]))
    y = tok("y", add_special_tokens=False)["input_ids"][0]
    assert res[0].token_id == y
    assert res[0].logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[y]))


def test_compile_cache_is_bounded_and_keyed_by_spec(tok, compiler) -> None:
    specs = [GuideSpec.choice([f"x{k}"]) for k in range(5)]
    first = compiler.compile(specs[0])
    hits = compiler.hits
    assert compiler.compile(GuideSpec.choice(["x0"])) is first and compiler.hits == hits + 1
    # property order is the generation order: the same properties in another order are another spec
    a = GuideSpec.json_schema({"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}}})
    b = GuideSpec.json_schema({"type": "object", "properties": {"b": {"type": "null"}, "a": {"type": "boolean"}}})
    assert a != b and a == GuideSpec.json_schema(json.loads(a.value))
    for s in specs:
        compiler.compile(s)
    assert len(compiler) == 3, "the cache grew past its bound"
    misses = compiler.misses
    assert compiler.compile(specs[0]) is not first and compiler.misses == misses + 1  # evicted, recompiled


@pytest.mark.parametrize("spec", [GuideSpec.json_schema({"type": "strin"}), GuideSpec("regex", "(abc"),
                                  GuideSpec("grammar", "root ::= undefined_rule")])
def test_uncompilable_specs_raise_grammar_error(compiler, spec) -> None:
    with pytest.raises(GrammarError) as e:
        compiler.compile(spec)
    assert str(e.value) and "/project/" not in str(e.value)
