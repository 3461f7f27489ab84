"""An HF causal LM whose parameters ARE the serving decoder's resident tensors (no copy).

The model is built on the meta device from the checkpoint's config, then every parameter is replaced by
an `nn.Parameter` over the decoder's own tensor (q/k/v: row slices of the fused qkv, so views of the same
storage). `peft` wraps it and adds the trainable adapter; the base stays frozen and shared with serving.
Only the rotary tables (a few KB) are computed afresh. Architectures whose resident form differs from HF's
(Gemma's 1 + w norms in fp32, Phi-3's fused gate_up) are refused rather than copied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from server.model.decoder import Decoder

UNSUPPORTED = {"gemma2": "its norms are held as 1 + w in fp32", "gemma3_text": "its norms are held as 1 + w in fp32",
               "phi3": "HF fuses gate_up_proj while serving holds gate and up apart"}


def check_trainable(decoder: Decoder) -> None:
    """ValueError naming the model type when its resident weights cannot back an HF model."""
    why = UNSUPPORTED.get(decoder.spec.model_type)
    if why is not None:
        raise ValueError(f"fine-tuning on model type {decoder.spec.model_type!r} is not supported: {why}; "
                         "supported: llama, mistral, qwen2, qwen3")
    if decoder.embed.is_inference():
        raise ValueError("the resident weights are inference tensors and cannot take part in autograd")


def resident_tensor(decoder: Decoder, name: str) -> torch.Tensor:
    """The decoder's tensor behind an HF parameter name (KeyError when it holds none)."""
    if name == "model.embed_tokens.weight":
        return decoder.embed
    if name == "model.norm.weight":
        return decoder.norm
    if name == "lm_head.weight":
        return decoder.lm_head
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        raise KeyError(name)
    i, rest = int(parts[2]), ".".join(parts[3:])
    w = decoder.layers[i]
    proj = parts[4] if len(parts) > 5 else ""
    if rest.endswith("_proj.weight"):
        return decoder.base_weight(i, proj)
    if rest.endswith("_proj.bias"):
        b = decoder.base_bias(i, proj)
        if b is None:
            raise KeyError(name)
        return b
    norms = {"input_layernorm.weight": w.input_norm, "post_attention_layernorm.weight": w.post_norm,
             "self_attn.q_norm.weight": w.q_norm, "self_attn.k_norm.weight": w.k_norm}
    t = norms.get(rest)
    if t is None:
        raise KeyError(name)
    return t


def build_resident_model(decoder: Decoder, hf_config: Any) -> nn.Module:
    """`AutoModelForCausalLM` for `hf_config` over the decoder's tensors; frozen, in eval mode."""
    from transformers import AutoModelForCausalLM

    check_trainable(decoder)
    cfg = hf_config.__class__.from_dict(hf_config.to_dict())
    cfg.use_cache = False
    device = decoder.embed.device
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    # one Parameter per distinct tensor (tied embeddings stay tied); keyed by what the view points at, since
    # base_weight returns a fresh view object per call
    shared: dict[tuple[Any, ...], nn.Parameter] = {}
    for name, meta in list(model.named_parameters(remove_duplicate=False)):
        t = resident_tensor(decoder, name)
        if t.shape != meta.shape:
            raise ValueError(f"resident tensor for {name} has shape {tuple(t.shape)}, the HF model expects "
                             f"{tuple(meta.shape)}")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        param = shared.get(key)
        if param is None:
            param = shared[key] = nn.Parameter(t, requires_grad=False)  # wraps t's storage: no copy
        owner, attr = _owner(model, name)
        setattr(owner, attr, param)
    for mod_name, mod in list(model.named_modules()):
        if type(mod).__name__.endswith("RotaryEmbedding"):
            owner, attr = _owner(model, mod_name)
            setattr(owner, attr, type(mod)(config=cfg).to(device))
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise ValueError(f"cannot build a resident training model: buffers {leftover[:3]} have no values")
    model.eval()
    return model


def _owner(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, attr = dotted.split(".")
    owner = model
    for p in path:
        owner = getattr(owner, p)
    return owner, attr
