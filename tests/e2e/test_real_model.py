"""The real default model (SmolLM2-135M-Instruct, converted once from the pinned GGUF) served end to end:
greedy chat answers equal transformers' on the same checkpoint token for token, prompt token ids equal
apply_chat_template's, streaming text equals the tokenizer's decode, and a LoRA trained here with peft,
uploaded over REST, changes the answers exactly as PeftModel does, mixed with base requests."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.server_utils import LiveServer, live_server

pytestmark = pytest.mark.slow

SYSTEM = "You are a helpful assistant. Answer in one short sentence."
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Give one tip for sleeping well.",
    "What is the largest planet in the solar system?",
    "Translate 'thank you' into Japanese.",
]
MAX_TOKENS = 24
LORA_TOKENS = 12
STYLE = "Ahoy matey! "  # what the trained LoRA puts at the start of every answer
TRAIN_SYSTEM = "Be brief."  # short, so training rows stay short (SmolLM2's default system prompt is long)


def messages(prompt: str, system: str = SYSTEM) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def chat_ids(tok: Any, msgs: list[dict[str, str]]) -> list[int]:
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def hf_greedy(model: Any, prompt_ids: list[int], n: int, eos: set[int]) -> list[int]:
    """transformers' greedy generate for one prompt alone, up to and including the first EOS (as the server
    reports token_ids)."""
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                             dtype=torch.long), max_new_tokens=n, do_sample=False, pad_token_id=min(eos))
    ids = out[0, len(prompt_ids):].tolist()
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids


@pytest.fixture(scope="module")
def tok(real_model_dir: str) -> Any:
    return AutoTokenizer.from_pretrained(real_model_dir)


@pytest.fixture(scope="module")
def hf(real_model_dir: str) -> Any:
    return AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def server(real_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    store = str(tmp_path_factory.mktemp("real-store"))
    with live_server(model=real_model_dir, max_model_len=1024, kv_cache_blocks=512, block_size=16,
                     max_adapters=2, max_rank=16, max_num_seqs=16, adapters_dir=store) as srv:
        yield srv


@pytest.fixture(scope="module")
def eos(server: LiveServer) -> set[int]:
    return set(server.state.model.eos_token_ids)


async def _chats(url: str, jobs: list[tuple[str | None, list[dict[str, str]]]], max_tokens: int = MAX_TOKENS,
                 **extra: Any) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        resps = await asyncio.gather(*(
            c.post("/v1/chat/completions", json={"messages": m, "max_tokens": max_tokens, "temperature": 0,
                                                 "return_token_ids": True, **({"model": a} if a else {}), **extra})
            for a, m in jobs))
    for r in resps:
        assert r.status_code == 200, r.text
    return [r.json() for r in resps]


def test_default_model_is_smollm2(server: LiveServer, tok: Any) -> None:
    with server.client() as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert ids == ["SmolLM2-135M-Instruct"]
    info = server.state.model.shapes
    assert (info.num_layers, info.hidden_size, info.num_attention_heads, info.num_key_value_heads,
            info.vocab_size) == (30, 576, 9, 3, 49152)
    assert server.state.engine.runner.spec.tie_word_embeddings
    assert "<|im_start|>" in tok.chat_template  # ChatML, from the GGUF's metadata


def test_greedy_chat_equals_transformers_token_for_token(server: LiveServer, hf: Any, tok: Any,
                                                         eos: set[int]) -> None:
    bodies = asyncio.run(_chats(server.url, [(None, messages(p)) for p in PROMPTS]))
    for p, body in zip(PROMPTS, bodies, strict=True):
        prompt_ids = chat_ids(tok, messages(p))
        assert body["prompt_token_ids"] == prompt_ids  # the server renders the template as transformers does
        want = hf_greedy(hf, prompt_ids, MAX_TOKENS, eos)
        got = body["choices"][0]["token_ids"]
        assert got == want, (p, tok.decode(got), tok.decode(want))
        assert body["choices"][0]["message"]["content"] == tok.decode(got, skip_special_tokens=True)
    assert "Paris" in bodies[0]["choices"][0]["message"]["content"]


def test_streamed_deltas_equal_final_text_and_decode(server: LiveServer, tok: Any) -> None:
    """Concatenated stream deltas == non-streamed text == decode(token_ids), on an answer whose multi-byte
    characters are split across tokens."""
    msgs = messages(PROMPTS[-1])
    with server.client() as c:
        whole = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": MAX_TOKENS, "temperature": 0,
                                                     "return_token_ids": True}).json()
        deltas = []
        with c.stream("POST", "/v1/chat/completions", json={"messages": msgs, "max_tokens": MAX_TOKENS,
                                                             "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for ch in json.loads(line[6:])["choices"]:
                        deltas.append(ch["delta"].get("content") or "")
    ids = whole["choices"][0]["token_ids"]
    text = whole["choices"][0]["message"]["content"]
    assert "".join(deltas) == text == tok.decode(ids, skip_special_tokens=True)
    assert "\ufffd" not in "".join(deltas)
    split = [t for t in ids if "\ufffd" in tok.decode([t])]  # tokens holding part of a character
    assert split, f"the answer has no character split across tokens: {text!r}"


def _train_style_lora(model_dir: str, out_dir: str, tok: Any) -> None:
    """A dozen peft steps on 6 examples teach: every answer starts with STYLE.

    Kept cheap for 2 CPU cores: LoRA on the top 6 layers only (backward stops there), rows left-padded so
    the answers are the last positions and only those get logits (lm_head over 49k words dominates)."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    examples = [("What is two plus two?", "Four."), ("What color is the sky?", "Blue."),
                ("Name a fruit.", "An apple."), ("What do bees make?", "Honey."),
                ("How many days are in a week?", "Seven."), ("Where do fish live?", "In water.")]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                            layers_to_transform=list(range(24, 30))))
    rows = []
    for q, a in examples:
        prompt = chat_ids(tok, messages(q, system=TRAIN_SYSTEM))
        answer = tok(STYLE + a + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((prompt, answer))
    width = max(len(p) + len(a) for p, a in rows)
    keep = max(len(a) for _, a in rows) + 1
    ids = torch.tensor([[0] * (width - len(p) - len(a)) + p + a for p, a in rows])
    mask = torch.tensor([[0] * (width - len(p) - len(a)) + [1] * (len(p) + len(a)) for p, a in rows])
    labels = torch.tensor([[-100] * (keep - 1 - len(a)) + a for _, a in rows])  # targets of the last keep-1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=6e-3)
    model.train()
    for _ in range(12):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.5  # it learnt the examples
    model.save_pretrained(out_dir)


def test_trained_lora_over_rest_changes_answers_as_peft(server: LiveServer, real_model_dir: str, hf: Any,
                                                        tok: Any, eos: set[int],
                                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    from peft import PeftModel

    out = str(tmp_path_factory.mktemp("pirate"))
    _train_style_lora(real_model_dir, out, tok)
    with server.client() as c:
        files = [("files", (n, open(os.path.join(out, n), "rb").read()))
                 for n in ("adapter_config.json", "adapter_model.safetensors")]
        r = c.post("/v1/adapters", data={"name": "pirate"}, files=files)
        assert r.status_code == 201, r.text
    held_out = PROMPTS[:3]
    jobs = [(a, messages(p, system=TRAIN_SYSTEM)) for p in held_out for a in ("pirate", None)]
    bodies = asyncio.run(_chats(server.url, jobs, max_tokens=LORA_TOKENS))
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32), out).eval()
    styled = 0
    for (adapter, msgs), body in zip(jobs, bodies, strict=True):
        prompt_ids = chat_ids(tok, msgs)
        got = body["choices"][0]["token_ids"]
        base_ref = hf_greedy(hf, prompt_ids, LORA_TOKENS, eos)
        if adapter is None:
            assert got == base_ref
            continue
        want = hf_greedy(peft_model, prompt_ids, LORA_TOKENS, eos)
        assert want != base_ref  # the adapter changes the answer …
        assert got == want, (tok.decode(got), tok.decode(want))  # … exactly as PeftModel does
        styled += body["choices"][0]["message"]["content"].startswith(STYLE.strip())
    assert styled >= len(held_out) - 1  # and the style it learnt is visible
