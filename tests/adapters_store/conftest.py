"""Fixtures: a tiny base and a saved LoRA, shared by the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters_store.base_info import BaseModelInfo
from tests.adapters_store.helpers import base_info_of, hf_model, make_peft


@pytest.fixture(scope="session")
def llama_base() -> BaseModelInfo:
    return base_info_of(hf_model("llama"))


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved LoRA on q_proj, v_proj and down_proj with non-zero B."""
    from peft import LoraConfig

    out = tmp_path_factory.mktemp("lora")
    make_peft(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj",
                                                                                       "down_proj"]), out)
    return out
