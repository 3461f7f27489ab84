"""Tiny random HF models and PEFT adapters built in code (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from adapters_store.base_info import BaseModelInfo

SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128,
)


def hf_model(kind: str = "llama", **overrides: Any) -> torch.nn.Module:
    """A tiny random LlamaForCausalLM or Qwen2ForCausalLM (GQA: 4 heads, 2 kv heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    return model_cls(cfg_cls(**{**SHAPE, **overrides})).eval()


def base_info_of(model: torch.nn.Module) -> BaseModelInfo:
    c = model.config
    return BaseModelInfo(
        model_type=c.model_type, num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        vocab_size=c.vocab_size,
    )


def make_peft(peft_config: Any, out: Path, kind: str = "llama", randomize: bool = True) -> Any:
    """Wrap a fresh tiny model with `peft_config`, randomise the prompt encoder, save to `out`."""
    from peft import get_peft_model

    pm = get_peft_model(hf_model(kind), peft_config)
    if randomize and hasattr(pm, "prompt_encoder"):
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in pm.prompt_encoder.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    pm.eval()
    pm.save_pretrained(str(out))
    return pm


def read_cfg(path: Path) -> dict[str, Any]:
    return json.loads((path / "adapter_config.json").read_text())
