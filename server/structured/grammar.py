"""Grammars compiled once per distinct spec, and the per-sequence matcher the sampler masks with.

The engine is xgrammar (see README "Structured output": chosen over llguidance by measurement on our
sampler path, bench/grammar_engines.py). A `GuideSpec` says what to constrain to (a JSON schema, any JSON
object, a regex, a choice of strings, an EBNF grammar); `GuideCompiler.compile` turns it into a `Guide`
(an immutable compiled grammar, cached in a bounded LRU per distinct spec) and `Guide.matcher()` gives one
sequence its own `Matcher`, which the engine advances exactly when it appends a sampled token.

JSON is constrained with fixed separators (", " and ": ", no free whitespace): a small model given free
whitespace can spend its whole budget on newlines and never close the object.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

DEFAULT_CACHE_SIZE = 64  # distinct compiled grammars kept (LRU)


class GrammarError(ValueError):
    """A spec the grammar engine cannot compile (the message says why)."""


@dataclass(frozen=True)
class GuideSpec:
    """What a request's output must match. `kind`: json_schema | json_object | regex | choice | grammar;
    `value`: the schema as JSON text (key order kept: it is the order the properties are generated in), the
    regex, the choices as a JSON list, or EBNF text."""

    kind: str
    value: str = ""

    @staticmethod
    def json_schema(schema: dict[str, Any]) -> GuideSpec:
        return GuideSpec("json_schema", json.dumps(schema, separators=(",", ":")))

    @staticmethod
    def choice(options: list[str]) -> GuideSpec:
        return GuideSpec("choice", json.dumps(list(options)))


def _choice_ebnf(options: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(o) for o in options)


class Matcher:
    """One sequence's position in its grammar. Not thread-safe: only the engine's worker touches it."""

    __slots__ = ("_m", "accepted", "vocab_size")

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        self._m = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.accepted = 0  # tokens accepted so far: equals len(output_ids) of its sequence

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of an int32 bitmask [rows, ceil(vocab/32)]."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        ok = bool(self._m.accept_token(token_id))
        if ok:
            self.accepted += 1
        return ok

    @property
    def done(self) -> bool:
        """The grammar has accepted a stop token: nothing more may be generated."""
        return bool(self._m.is_terminated())

    def reset(self) -> None:
        self._m.reset()
        self.accepted = 0


class Guide:
    """A compiled grammar; immutable and shared by every sequence with the same spec."""

    def __init__(self, spec: GuideSpec, compiled: Any, vocab_size: int) -> None:
        self.spec = spec
        self.vocab_size = vocab_size
        self._compiled = compiled

    def matcher(self) -> Matcher:
        return Matcher(self._compiled, self.vocab_size)


class GuideCompiler:
    """Compiles specs against one tokenizer and logits width, caching up to `cache_size` grammars (LRU)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        # xgrammar's own cache is off: ours is bounded by count and observable (hits/misses)
        self._xc = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._cache: OrderedDict[GuideSpec, Guide] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def compile(self, spec: GuideSpec) -> Guide:
        """The cached Guide for `spec`, compiling it on first use; GrammarError if it cannot compile."""
        with self._lock:
            g = self._cache.get(spec)
            if g is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
                return g
            self.misses += 1
            g = Guide(spec, self._compile(spec), self.vocab_size)
            self._cache[spec] = g
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return g

    def __len__(self) -> int:
        return len(self._cache)

    def _compile(self, spec: GuideSpec) -> Any:
        try:
            if spec.kind == "json_schema":
                return self._xc.compile_json_schema(spec.value, any_whitespace=False)
            if spec.kind == "json_object":
                return self._xc.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "regex":
                return self._xc.compile_regex(spec.value)
            if spec.kind == "choice":
                return self._xc.compile_grammar(_choice_ebnf(json.loads(spec.value)))
            if spec.kind == "grammar":
                return self._xc.compile_grammar(spec.value)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar reports bad input as these
            raise GrammarError(_clean(e)) from e
        raise GrammarError(f"unknown guide kind {spec.kind!r}")


def _clean(e: BaseException) -> str:
    """xgrammar's message without its '[time] /path/file.cc:line: ' prefix."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)


_compilers: dict[tuple[int, int], GuideCompiler] = {}
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> GuideCompiler:
    """The process's compiler for this tokenizer (built on first use: ~1 s for a 49k vocabulary)."""
    key = (id(tokenizer), vocab_size)
    with _compilers_lock:
        c = _compilers.get(key)
        if c is None:  # the compiler holds the tokenizer, so its id is not reused while cached here
            c = _compilers[key] = GuideCompiler(tokenizer, vocab_size, stop_token_ids)
        return c


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return xgr.allocate_token_bitmask(rows, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set to -inf, in place, the tokens of logits[rows[j]] that bitmask[j] disallows; other rows untouched."""
    idx = torch.tensor(rows, dtype=torch.long)
    sub = logits.index_select(0, idx)  # [len(rows), vocab]
    xgr.apply_token_bitmask_inplace(sub, bitmask[:len(rows)], vocab_size=logits.shape[-1])
    logits.index_copy_(0, idx, sub)
