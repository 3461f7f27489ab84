"""The embedded default model: a small random Llama + byte-level tokenizer, built offline on first use.

It lets the server (and its tests) run on a fresh machine with no download. It is saved as an ordinary
HF checkpoint and loaded by the same loader as user checkpoints.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

DEFAULT_MODEL_NAME = "default-model-v1"
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEFAULT_CONFIG = dict(
    num_hidden_layers=4, hidden_size=256, intermediate_size=688, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=2048,
)


def build_byte_tokenizer(extra_special_tokens: tuple[str, ...] = ()) -> Any:
    """Byte-level tokenizer: ids 0..255 are the bytes, then <s>, </s>, <pad> (then any extras). No merges,
    so any UTF-8 text round-trips exactly and nothing needs training or downloading."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    specials = list(SPECIAL_TOKENS) + list(extra_special_tokens)
    for i, tok in enumerate(specials):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the one ByteLevel pre-tokenization uses)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def save_llama_family(out_dir: str, arch: str, config_kwargs: dict[str, Any], seed: int,
                      init_std: float = 0.02) -> None:
    """Write a random HF checkpoint (safetensors) plus the byte tokenizer into out_dir, deterministically."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    # AutoTokenizer always loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer, which adds
    # <|endoftext|> if missing; ship it so the vocabulary the model was sized for is the one that loads.
    tokenizer = build_byte_tokenizer(("<|endoftext|>",) if arch == "qwen2" else ())
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    kwargs = dict(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=init_std, dtype="float32",
    )
    kwargs.update(config_kwargs)
    config = classes[arch](**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def default_cache_root(cache_dir: str | None = None) -> str:
    """cache_dir, else $PEFTSERVE_CACHE_DIR, else ~/.cache/peftserve."""
    return cache_dir or os.environ.get("PEFTSERVE_CACHE_DIR") or os.path.expanduser("~/.cache/peftserve")


def ensure_default_model(cache_dir: str | None = None) -> str:
    """Path of the default model under the cache root, building it on first use.

    Built in a temporary sibling directory and renamed into place, so a concurrent process sees either
    nothing or a complete checkpoint; if two build at once, the first rename wins and the other's
    copy is discarded (both are identical: fixed seed).
    """
    root = default_cache_root(cache_dir)
    path = os.path.join(root, DEFAULT_MODEL_NAME)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=root)
    try:
        save_llama_family(tmp, "llama", DEFAULT_CONFIG, seed=0)
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
