"""What `--model` names, resolved to a local HF checkpoint dir and the id the API serves it under.

Accepted, in this order: nothing (the default model, SmolLM2-135M-Instruct), `demo` (the random demo
model), a local checkpoint dir, a local `.gguf` file (converted once into the cache), a hub id
`org/name[@revision]` read through huggingface_hub's cache (HF_HOME / HF_HUB_CACHE; online when it can,
HF_HUB_OFFLINE=1 honoured).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from server.model.default_model import (
    DEFAULT_MODEL_NAME,
    DEMO_MODEL_NAME,
    ModelUnavailable,
    default_cache_root,
    ensure_default_model,
    ensure_demo_model,
)
from server.model.gguf import ensure_gguf_checkpoint, source_name

log = logging.getLogger("peftserve.model")

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
# what the decoder reads from a hub repo: config, safetensors weights, tokenizer and chat template
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # local HF checkpoint dir
    name: str  # default model id in the API (--served-model-name overrides)


def resolve_model(model: str | None, cache_dir: str | None = None) -> ResolvedModel:
    """Turn a --model value into a local checkpoint dir, fetching or converting what is needed once."""
    if model is None:
        path = ensure_default_model(cache_dir)
        log.info("no --model given: serving %s from %s", DEFAULT_MODEL_NAME, path)
        return ResolvedModel(path, DEFAULT_MODEL_NAME)
    if model == DEMO_MODEL_NAME and not os.path.exists(model):
        path = ensure_demo_model(cache_dir)
        log.info("serving the random demo model (its text is noise) from %s", path)
        return ResolvedModel(path, DEMO_MODEL_NAME)
    local = os.path.expanduser(model)
    if os.path.isdir(local):
        return ResolvedModel(local, source_name(local) or os.path.basename(os.path.normpath(local)))
    if os.path.isfile(local):
        if not local.endswith(".gguf"):
            raise ValueError(f"--model {model!r}: a file must be a .gguf; otherwise pass a checkpoint directory")
        name = os.path.basename(local).removesuffix(".gguf")
        path = ensure_gguf_checkpoint(local, default_cache_root(cache_dir), name)
        return ResolvedModel(path, source_name(path) or os.path.basename(path))
    m = HUB_ID.match(model)
    if m is None:
        raise FileNotFoundError(f"--model {model!r}: no such directory or .gguf file, and not a hub id "
                                "org/name[@revision]")
    return ResolvedModel(hub_snapshot(m["repo"], m["rev"]), m["repo"])


def hub_cache_dir() -> str:
    """huggingface_hub's cache, read from the environment now (its own constants are fixed at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(home, "hub")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo_id: str, revision: str | None) -> str:
    """Local snapshot dir of a hub model: from the cache, downloading what is missing unless offline."""
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=hub_cache_dir(), allow_patterns=HUB_FILES,
                                 local_files_only=offline)
    except Exception as e:  # huggingface_hub raises several unrelated types for "not there"
        mode = "HF_HUB_OFFLINE is set and it is not" if offline else "it could not be downloaded and is not"
        raise ModelUnavailable(f"--model {where!r}: {mode} in the Hugging Face cache {hub_cache_dir()} "
                               f"({type(e).__name__}); download it where the hub is reachable "
                               f"(huggingface-cli download {repo_id}) or pass a local directory") from e
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelUnavailable(f"--model {where!r}: the cached snapshot {path} has no config.json")
    return path
