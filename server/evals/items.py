"""Eval items and their validation: `{prompt, choices, answer}` (multiple choice) or `{messages, ideal}`
(generation). Errors name where (JSONL line N, or items[N] over the API) and which field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MATCHES = ("exact", "contains")
ROLES = ("system", "user", "assistant", "developer")


class EvalInputError(ValueError):
    """A bad eval input; the message names the line/item and field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class MCItem:
    """Multiple choice: the choice with the highest loglikelihood after `prompt` is the prediction."""

    where: str
    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class GenItem:
    """Generation: the greedy chat answer to `messages` is right when it matches one of `ideal`."""

    where: str
    messages: tuple[dict[str, str], ...]
    ideal: tuple[str, ...]
    match: str


Item = MCItem | GenItem


def parse_item(obj: Any, where: str, match: str = "exact") -> Item:
    """One item from its decoded JSON; `where` ("line 3", "items[2]") prefixes every error."""
    if not isinstance(obj, dict):
        raise EvalInputError(f"{where}: an item must be a JSON object, got {type(obj).__name__}", where)
    if "prompt" in obj or "choices" in obj:
        return _mc(obj, where)
    if "messages" in obj or "ideal" in obj:
        return _gen(obj, where, match)
    raise EvalInputError(f"{where}: an item needs either 'prompt', 'choices', 'answer' (multiple choice) or "
                         f"'messages', 'ideal' (generation); got keys {sorted(obj)}", where)


def _mc(obj: dict[str, Any], where: str) -> MCItem:
    for key in ("prompt", "choices", "answer"):
        if key not in obj:
            raise EvalInputError(f"{where}: multiple-choice item is missing '{key}'", f"{where}.{key}")
    prompt, choices, answer = obj["prompt"], obj["choices"], obj["answer"]
    if not isinstance(prompt, str) or not prompt:
        raise EvalInputError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}", f"{where}.prompt")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise EvalInputError(f"{where}: 'choices' must be a list of at least 2 non-empty strings, got {choices!r}",
                             f"{where}.choices")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise EvalInputError(f"{where}: 'answer' must be an index into 'choices' (0..{len(choices) - 1}) or one "
                             f"of the choices, got {answer!r}", f"{where}.answer")
    return MCItem(where, prompt, tuple(choices), answer)


def _gen(obj: dict[str, Any], where: str, match: str) -> GenItem:
    for key in ("messages", "ideal"):
        if key not in obj:
            raise EvalInputError(f"{where}: generation item is missing '{key}'", f"{where}.{key}")
    msgs, ideal = obj["messages"], obj["ideal"]
    if not isinstance(msgs, list) or not msgs:
        raise EvalInputError(f"{where}: 'messages' must be a non-empty list of {{role, content}}, got {msgs!r}",
                             f"{where}.messages")
    for k, m in enumerate(msgs):
        if (not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str)):
            raise EvalInputError(f"{where}: messages[{k}] must be {{\"role\": one of {', '.join(ROLES)}, "
                                 f"\"content\": a string}}, got {m!r}", f"{where}.messages[{k}]")
    ideals = [ideal] if isinstance(ideal, str) else ideal
    if not isinstance(ideals, list) or not ideals or not all(isinstance(x, str) and x.strip() for x in ideals):
        raise EvalInputError(f"{where}: 'ideal' must be a non-empty string or list of them, got {ideal!r}",
                             f"{where}.ideal")
    match = obj.get("match", match)
    if match not in MATCHES:
        raise EvalInputError(f"{where}: 'match' must be one of {', '.join(MATCHES)}, got {match!r}", f"{where}.match")
    return GenItem(where, tuple({"role": m["role"], "content": m["content"]} for m in msgs), tuple(ideals), match)


def parse_jsonl(text: str, source: str = "input", match: str = "exact") -> list[Item]:
    """Every non-blank line of a JSONL text as an item; an empty set is an error."""
    items: list[Item] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:  # JSONDecodeError, or a number past Python's int-string limit
            why = f"{e.msg} (column {e.colno})" if isinstance(e, json.JSONDecodeError) else str(e)
            raise EvalInputError(f"{source}: line {n}: malformed JSON: {why}", f"line {n}") from e
        items.append(parse_item(obj, f"{source}: line {n}", match))
    if not items:
        raise EvalInputError(f"{source}: no items (the eval set is empty)", "data")
    return items


def is_correct(item: GenItem, output: str) -> bool:
    """exact: the stripped answer equals an ideal; contains: an ideal occurs in the answer (case-sensitive)."""
    out = output.strip()
    if item.match == "exact":
        return any(out == x.strip() for x in item.ideal)
    return any(x.strip() in out for x in item.ideal)
