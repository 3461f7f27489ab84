"""Suite-wide setup: Triton's CPU interpreter, a private cache dir, and a shared tiny-checkpoint dir."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter. It is read when @triton.jit
# decorates a kernel, so it must be set before any kernel module is imported. With CUDA present it is
# left alone, so the gpu-marked tests run real Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep tests away from the user's ~/.cache/peftserve (models and adapter store)."""
    os.environ.setdefault("PEFTSERVE_CACHE_DIR", str(tmp_path_factory.mktemp("peftserve-cache")))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("tiny-ckpts"))


@pytest.fixture(scope="session")
def real_model_dir() -> str:
    """SmolLM2-135M-Instruct as a checkpoint dir, fetched and converted once into the repo's .cache/."""
    from tests.real_model import real_model_path

    return real_model_path()
