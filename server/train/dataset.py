"""Training files: JSONL validation at upload (line-numbered errors) and tokenization for training.

Two formats, one per file (the first sample decides):
- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight": 0|1 (assistant only)}]}`
- prompt/completion: `{"prompt": str, "completion": str}`

The loss covers only what the assistant says: a chat sample is rendered with the tokenizer's chat template
exactly as `/v1/chat/completions` renders a request (`apply_chat_template(tokenize=False)`, then the text
tokenized without special tokens), and each assistant turn's tokens (its end marker included, so the
adapter learns to stop) carry the turn's weight; everything else weighs 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """A training file was refused; `line` is the 1-based line (None: the whole file)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


@dataclass(frozen=True)
class ParsedFile:
    format: str  # "chat" | "prompt_completion"
    samples: list[dict[str, Any]]
    lines: list[int]  # the 1-based line of each sample


def parse_jsonl(data: bytes, *, max_lines: int, min_samples: int = 1) -> ParsedFile:
    """Check every line; the first bad one raises DatasetError naming its number and the problem."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DatasetError(f"not UTF-8 text (byte {e.start})", line) from None
    samples, lines, fmt = [], [], None
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        if len(samples) >= max_lines:
            raise DatasetError(f"the file has more than {max_lines} samples (--max-file-lines)", n)
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DatasetError(f"not valid JSON: {e.msg} at column {e.colno}", n) from None
        if not isinstance(obj, dict):
            raise DatasetError(f"expected a JSON object, got {type(obj).__name__}", n)
        kind = "chat" if "messages" in obj else "prompt_completion" if "prompt" in obj or "completion" in obj else None
        if kind is None:
            raise DatasetError('expected {"messages": [...]} (chat) or {"prompt": ..., "completion": ...}', n)
        if fmt is None:
            fmt = kind
        elif kind != fmt:
            raise DatasetError(f"a {kind} sample in a {fmt} file (the first sample decides the format)", n)
        (_check_chat if kind == "chat" else _check_prompt_completion)(obj, n)
        samples.append(obj)
        lines.append(n)
    if len(samples) < min_samples:
        raise DatasetError(f"the file has {len(samples)} samples; at least {min_samples} needed")
    return ParsedFile(fmt or "chat", samples, lines)


def _check_chat(obj: dict[str, Any], n: int) -> None:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DatasetError("'messages' must be a non-empty list", n)
    extra = set(obj) - {"messages"}
    if extra:
        raise DatasetError(f"unknown key {sorted(extra)[0]!r} beside 'messages'", n)
    trained = 0
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DatasetError(f"{where} must be an object", n)
        role = m.get("role")
        if role is None:
            raise DatasetError(f"{where} has no 'role' (one of {', '.join(ROLES)})", n)
        if role not in ROLES:
            raise DatasetError(f"{where}.role {role!r} is not one of {', '.join(ROLES)}", n)
        content = m.get("content")
        if not isinstance(content, str):
            raise DatasetError(f"{where}.content must be a string", n)
        if "weight" in m:
            if role != "assistant":
                raise DatasetError(f"{where}: 'weight' is allowed only on assistant turns", n)
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise DatasetError(f"{where}.weight {m['weight']!r} must be 0 or 1", n)
        if role == "assistant":
            if not content.strip():
                raise DatasetError(f"{where}: empty assistant turn", n)
            trained += m.get("weight", 1)
        unknown = set(m) - {"role", "content", "weight", "name"}
        if unknown:
            raise DatasetError(f"{where}: unknown key {sorted(unknown)[0]!r}", n)
    if not any(m["role"] == "assistant" for m in msgs):
        raise DatasetError("no assistant turn: nothing to learn from", n)
    if not trained:
        raise DatasetError("every assistant turn has weight 0: nothing to learn from", n)


def _check_prompt_completion(obj: dict[str, Any], n: int) -> None:
    for key in ("prompt", "completion"):
        if not isinstance(obj.get(key), str):
            raise DatasetError(f"'{key}' must be a string", n)
    if not obj["completion"].strip():
        raise DatasetError("empty 'completion'", n)
    extra = set(obj) - {"prompt", "completion"}
    if extra:
        raise DatasetError(f"unknown key {sorted(extra)[0]!r}", n)


# ---- tokenization ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    ids: list[int]
    weights: list[float]  # per token: 1.0 where the token is a target of the loss (assistant), else 0.0

    @property
    def num_trained(self) -> int:
        return sum(1 for w in self.weights[1:] if w > 0)


def render_chat_ids(tok: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """The token ids `/v1/chat/completions` feeds the model for `messages` (server.api.openai.render_chat)."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def encode(tok: Any, sample: dict[str, Any]) -> Example:
    """Token ids and loss weights of one validated sample (DatasetError when the template cannot split it)."""
    if "messages" not in sample:
        prompt = tok(sample["prompt"])["input_ids"]
        full = tok(sample["prompt"] + sample["completion"])["input_ids"]
        if full[:len(prompt)] != prompt:  # the join merged tokens: keep the prompt's own split
            full = prompt + tok(sample["completion"], add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            full = [*full, tok.eos_token_id]
        return Example(full, [0.0] * len(prompt) + [1.0] * (len(full) - len(prompt)))
    if not getattr(tok, "chat_template", None):
        raise DatasetError("this model's tokenizer has no chat template; use prompt/completion samples")
    msgs = [{"role": m["role"], "content": m["content"]} for m in sample["messages"]]
    full = render_chat_ids(tok, msgs, add_generation_prompt=False)
    weights = [0.0] * len(full)
    for i, m in enumerate(sample["messages"]):
        if m["role"] != "assistant":
            continue
        before = render_chat_ids(tok, msgs[:i], add_generation_prompt=True) if i else []
        upto = render_chat_ids(tok, msgs[:i + 1], add_generation_prompt=False)
        if full[:len(upto)] != upto or upto[:len(before)] != before:
            raise DatasetError(f"the chat template does not render messages[{i}] as a continuation of the "
                               "turns before it; cannot tell the assistant's tokens apart")
        for p in range(len(before), len(upto)):
            weights[p] = float(m.get("weight", 1))
    return Example(full, weights)


def encode_file(tok: Any, parsed: ParsedFile, max_tokens: int) -> list[Example]:
    """Every sample encoded; one longer than `max_tokens` raises DatasetError naming its line."""
    out = []
    for sample, n in zip(parsed.samples, parsed.lines, strict=True):
        try:
            ex = encode(tok, sample)
        except DatasetError as e:
            raise DatasetError(str(e), n) from None
        if len(ex.ids) > max_tokens:
            raise DatasetError(f"sample is {len(ex.ids)} tokens long; the limit is {max_tokens} "
                               "(--max-model-len)", n)
        if not ex.num_trained:
            raise DatasetError("no assistant token is left to train on after the chat template", n)
        out.append(ex)
    return out


def validate_upload(data: bytes, tok: Any, *, max_lines: int, max_tokens: int) -> tuple[ParsedFile, int]:
    """Full check of an uploaded file: JSONL shape, then every sample through the tokenizer.
    Returns (parsed, total tokens)."""
    parsed = parse_jsonl(data, max_lines=max_lines)
    examples = encode_file(tok, parsed, max_tokens)
    return parsed, sum(len(e.ids) for e in examples)


