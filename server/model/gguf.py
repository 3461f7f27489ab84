"""A `.gguf` file as an HF checkpoint: de-quantised once by transformers (with the `gguf` package) into
float32 safetensors + tokenizer + chat template, cached by the file's sha256.

The serving dtype is applied at load like any checkpoint's, so one conversion serves every --dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable

log = logging.getLogger("peftserve.model")
SOURCE_FILE = "peftserve_source.json"  # in a converted dir: the model's name and the GGUF it came from


def source_name(model_dir: str) -> str | None:
    """The model name recorded in a converted checkpoint dir, if it is one."""
    try:
        with open(os.path.join(model_dir, SOURCE_FILE)) as f:
            return str(json.load(f)["name"])
    except (OSError, ValueError, KeyError):
        return None


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_atomically(path: str, build: Callable[[str], None]) -> str:
    """Run build(tmp_dir) in a temporary sibling of `path`, then rename it into place.

    A concurrent process sees either nothing or a complete directory; if two build at once the first
    rename wins and the other copy is discarded (both builds are deterministic).
    """
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def gguf_to_checkpoint(gguf_path: str, out_dir: str, name: str, sha256: str) -> None:
    """De-quantise `gguf_path` with transformers and save an fp32 safetensors checkpoint in out_dir.

    The tokenizer and chat template come from the GGUF's own metadata.
    """
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise RuntimeError("reading a .gguf needs the `gguf` package: pip install gguf") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = os.path.split(os.path.abspath(gguf_path))
    log.info("converting %s to a safetensors checkpoint (de-quantising, once)", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
    # The tensors are already plain fp32; only the "gguf quantizer" marker stops save_pretrained.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, SOURCE_FILE), "w") as f:
        json.dump({"name": name, "gguf": os.path.abspath(gguf_path), "sha256": sha256}, f)
    log.info("converted %s into %s", name, out_dir)


def gguf_checkpoint_dir(cache_root: str, sha256: str) -> str:
    return os.path.join(cache_root, "gguf", sha256[:16])


def ensure_gguf_checkpoint(gguf_path: str, cache_root: str, name: str, sha256: str | None = None) -> str:
    """The converted checkpoint dir of a GGUF under cache_root/gguf/, converting on first use.

    Keyed by the file's sha256 (computed unless given) alone, so an edited file converts again and the same
    file under another name or path does not.
    """
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"--model {gguf_path!r}: no such .gguf file")
    digest = sha256 or sha256_file(gguf_path)
    path = gguf_checkpoint_dir(cache_root, digest)
    return build_atomically(path, lambda tmp: gguf_to_checkpoint(gguf_path, tmp, name, digest))
