"""Detokenization with SmolLM2's real byte-level BPE tokenizer, and the GGUF itself as --model.

Rule for a character still incomplete when generation ends (server/engine/detokenizer.py): while the
stream runs, a token whose decoding ends inside a character is held back until the character completes;
if generation ends first, the text gets every complete character and then U+FFFD for the cut bytes. For a
byte-level BPE like SmolLM2's that is exactly decode(token_ids), so concatenated deltas == final text ==
decode(token_ids) always, and no delta but the last ever holds U+FFFD."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.engine.detokenizer import IncrementalDetokenizer
from server.model.resolve import resolve_model
from server.model.runner import ModelRunner, SeqChunk

pytestmark = pytest.mark.slow

TEXT = "Café naïve — 日本語で「ありがとう」🙂👍🏽 done."


@pytest.fixture(scope="module")
def tok(real_model_dir: str):
    return AutoTokenizer.from_pretrained(real_model_dir)


def stream(tok, ids: list[int]) -> list[str]:
    """Deltas as the engine hands them out: add() after each token, take() each step, take(final) at the end."""
    d = IncrementalDetokenizer(tok)
    deltas = []
    for k in range(1, len(ids) + 1):
        d.add(ids[:k])
        deltas.append(d.take(final=False))
    deltas.append(d.take(final=True))
    return deltas


def test_multibyte_characters_split_across_tokens_stream_exactly(tok) -> None:
    ids = tok.encode(TEXT, add_special_tokens=False)
    split = [t for t in ids if "\ufffd" in tok.decode([t])]
    assert len(split) >= 4  # the emoji and CJK bytes really are split across tokens
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in d for d in deltas)


def test_trailing_incomplete_character_ends_as_replacement_character(tok) -> None:
    ids = tok.encode(TEXT, add_special_tokens=False)
    cuts = [k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd")]
    assert cuts  # there are places where a character is cut in two
    for k in cuts:
        deltas = stream(tok, ids[:k])
        assert "".join(deltas) == tok.decode(ids[:k]), k
        assert not any("\ufffd" in d for d in deltas[:-1]), k
        whole = max(j for j in range(k) if not tok.decode(ids[:j]).endswith("\ufffd"))
        assert "".join(deltas[:-1]) == tok.decode(ids[:whole]), k  # held back, not guessed, until the end


def test_the_gguf_file_serves_and_matches_transformers_on_it(real_model_dir: str) -> None:
    """--model FILE.gguf resolves to the checkpoint converted from that file (keyed by its sha256), and our
    decoder's logits equal transformers' loading the GGUF itself."""
    from tests.real_model import real_cache_root, real_gguf_path

    gguf = real_gguf_path()
    resolved = resolve_model(gguf, cache_dir=real_cache_root())
    assert os.path.realpath(resolved.path) == os.path.realpath(real_model_dir)
    assert resolved.name == "SmolLM2-135M-Instruct"
    folder, name = os.path.split(gguf)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    runner = ModelRunner(resolved.path, num_blocks=32, max_model_len=256)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    prompt = hf_tok(ids, add_special_tokens=False)["input_ids"]
    assert runner.tokenizer(ids, add_special_tokens=False)["input_ids"] == prompt
    seq = list(prompt)
    table = list(range(32))
    out = runner.execute([SeqChunk(0, seq, 0, table, True)])
    for _ in range(4):
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0, -1]
        torch.testing.assert_close(out[0], ref, atol=2e-4, rtol=1e-4)
        seq.append(int(out[0].argmax()))
        out = runner.execute([SeqChunk(0, seq[-1:], len(seq) - 1, table, True)])
