"""Training files: line-numbered validation, and loss weights exactly on the assistant's tokens."""

from __future__ import annotations

import json

import pytest

from server.train.dataset import DatasetError, encode, encode_file, parse_jsonl, render_chat_ids
from tests.tiny import tiny_tokenizer


def _jsonl(*rows: object) -> bytes:
    return ("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n").encode()


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More?"},
                     {"role": "assistant", "content": "No.", "weight": 0},
                     {"role": "user", "content": "Last?"}, {"role": "assistant", "content": "Yes!"}]}


def test_assistant_tokens_carry_the_weights() -> None:
    tok = tiny_tokenizer()
    ex = encode(tok, CHAT)
    msgs = [{"role": m["role"], "content": m["content"]} for m in CHAT["messages"]]
    assert ex.ids == render_chat_ids(tok, msgs, add_generation_prompt=False)  # what serving would feed
    trained = tok.decode([t for t, w in zip(ex.ids, ex.weights, strict=True) if w > 0])
    # the assistant turns with weight 1, each with the template's end of turn; nothing of the prompt
    assert trained == "Hello.\nYes!\n"
    # the prompt part of the last turn is exactly the serving prompt for the first 6 messages
    prompt = render_chat_ids(tok, msgs[:6], add_generation_prompt=True)
    assert ex.ids[:len(prompt)] == prompt and all(w == 1 for w in ex.weights[len(prompt):])
    assert ex.weights[len(prompt) - 1] == 0  # the generation prompt itself is not trained


def test_prompt_completion_trains_the_completion_and_eos() -> None:
    tok = tiny_tokenizer()
    ex = encode(tok, {"prompt": "2+2=", "completion": "4"})
    assert tok.decode([t for t, w in zip(ex.ids, ex.weights, strict=True) if w > 0]) == "4</s>"


@pytest.mark.parametrize("data, message", [
    (_jsonl(CHAT, "{oops"), "line 2: not valid JSON"),
    (_jsonl(CHAT, "", [1, 2]), "line 3: expected a JSON object, got list"),
    (_jsonl({"messages": []}), "line 1: 'messages' must be a non-empty list"),
    (_jsonl({"messages": [{"role": "bot", "content": "x"}]}), "line 1: messages[0].role 'bot' is not one of"),
    (_jsonl({"messages": [{"role": "user", "content": 3}]}), "line 1: messages[0].content must be a string"),
    (_jsonl({"messages": [{"role": "user", "content": "q", "weight": 1},
                          {"role": "assistant", "content": "a"}]}), "'weight' is allowed only on assistant"),
    (_jsonl({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}),
     "every assistant turn has weight 0"),
    (_jsonl(CHAT, {"prompt": "p", "completion": "c"}), "line 2: a prompt_completion sample in a chat file"),
    (_jsonl({"prompt": "p", "completion": ""}), "line 1: empty 'completion'"),
    (_jsonl({"text": "x"}), "line 1: expected {\"messages\""),
    (b"\xff\xfe\n", "line 1: not UTF-8"),
    (b"\n\n", "the file has 0 samples"),
])
def test_bad_lines_are_named(data: bytes, message: str) -> None:
    with pytest.raises(DatasetError) as info:
        parse_jsonl(data, max_lines=10)
    assert message in str(info.value)


def test_limits() -> None:
    with pytest.raises(DatasetError, match="line 4: the file has more than 3 samples"):
        parse_jsonl(_jsonl(CHAT, CHAT, CHAT, CHAT), max_lines=3)
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    parsed = parse_jsonl(_jsonl(short, {"messages": [{"role": "user", "content": "x" * 50},
                                                    {"role": "assistant", "content": "y"}]}), max_lines=3)
    with pytest.raises(DatasetError, match="line 2: sample is 76 tokens long; the limit is 70 \\(--max-model-len\\)"):
        encode_file(tiny_tokenizer(), parsed, max_tokens=70)
