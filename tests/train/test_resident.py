"""Which architectures a job can train on: those whose resident weights back an HF model as they are."""

from __future__ import annotations

import pytest

from server.model.runner import ModelRunner
from server.train.resident import build_resident_model, check_trainable, resident_tensor
from tests.tiny import make_tiny_checkpoint


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_trainable_architectures_alias_every_parameter(tiny_root: str, arch: str) -> None:
    runner = ModelRunner(make_tiny_checkpoint(tiny_root, arch, seed=3), max_model_len=64, num_blocks=8)
    model = build_resident_model(runner.decoder, runner.hf_config)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert any(n.endswith("q_proj.bias") for n in params) == (arch == "qwen2")
    for name, p in params.items():
        assert p.data_ptr() == resident_tensor(runner.decoder, name).data_ptr(), name


@pytest.mark.parametrize("arch, why", [("gemma2", r"1 \+ w"), ("phi3", "gate_up_proj")])
def test_other_architectures_are_refused_by_name(tiny_root: str, arch: str, why: str) -> None:
    runner = ModelRunner(make_tiny_checkpoint(tiny_root, arch, seed=3), max_model_len=64, num_blocks=8)
    with pytest.raises(ValueError, match=f"model type '{arch}' is not supported: .*{why}"):
        check_trainable(runner.decoder)
