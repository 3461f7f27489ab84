"""The decoder's shape, read once from an HF config and checked there.

Everything the decoder needs is resolved here (head_dim, biases, tying, RoPE, sliding windows, and each
architecture's quirks: q/k norms, Gemma's (1 + w) norms, scaled embeddings, sandwich norms, soft-capping),
so the rest of the package never touches the HF config object and an unsupported option fails at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.model.shapes import BaseModelInfo

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3",
}
GEMMA = ("gemma2", "gemma3_text")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


@dataclass(frozen=True)
class ModelSpec:
    model_type: str  # a value of SUPPORTED_ARCHITECTURES
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope: dict[str, Any]  # normalised rope parameters; always has "rope_type" and "rope_theta"
    layer_windows: tuple[int | None, ...]  # sliding window per layer (None = full attention)
    torch_dtype: str | None  # the checkpoint's own dtype name, for dtype="auto"
    hidden_act: str = "silu"  # MLP gate activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3)
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w), in fp32
    sandwich_norm: bool = False  # Gemma: norms after attention and around the MLP too
    embed_scale: float | None = None  # Gemma: token embeddings times sqrt(hidden) (not prompt-tuning's vectors)
    attn_scale: float | None = None  # None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # scores = cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma 2)
    layer_ropes: tuple[dict[str, Any], ...] | None = None  # per-layer RoPE when layer types differ (Gemma 3)
    fused_checkpoint: bool = False  # qkv_proj / gate_up_proj stored fused (Phi-3)

    def base_info(self) -> BaseModelInfo:
        """The shape adapters are validated against."""
        return BaseModelInfo(
            model_type=self.model_type,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
        )


def _rope_parameters(cfg: Any, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """RoPE settings as a plain dict, whether stored the transformers-5 way or the 4.x way.

    transformers 5 keeps everything (theta included) in `rope_parameters`; 4.x used `rope_theta` and an
    optional `rope_scaling` dict whose type key was `type` or `rope_type`.
    """
    if params is None:
        params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        if params and all(isinstance(v, dict) for v in params.values()):
            raise ValueError("per-layer-type rope_parameters are only supported for Gemma 3")
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    params.pop("type", None)
    if params.get("rope_theta") is None:
        params["rope_theta"] = float(getattr(cfg, "rope_theta", None) or 10000.0)
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {params['rope_type']!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1.0 is not supported by this decoder")
    return params


def _layer_types(cfg: Any, num_layers: int) -> list[str]:
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * num_layers)
    if len(types) != num_layers or not set(types) <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"layer_types {types!r} is not supported: expected {num_layers} entries of "
                         "full_attention / sliding_attention")
    return types


def _layer_windows(cfg: Any, model_type: str, num_layers: int) -> tuple[int | None, ...]:
    """Sliding window per layer, following each HF model's own rule."""
    window = getattr(cfg, "sliding_window", None)
    if model_type in ("mistral", "phi3"):
        return (window,) * num_layers
    if model_type in ("qwen2", "qwen3", *GEMMA):
        return tuple(window if t == "sliding_attention" else None for t in _layer_types(cfg, num_layers))
    return (None,) * num_layers


def _layer_ropes(cfg: Any, model_type: str, num_layers: int) -> tuple[dict[str, Any], ...] | None:
    """Gemma 3: sliding layers use their own (local) RoPE, full layers the global one."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if model_type != "gemma3_text" or not all(isinstance(v, dict) for v in params.values()) or not params:
        return None
    by_type = {t: _rope_parameters(cfg, p) for t, p in params.items()}
    return tuple(by_type[t] for t in _layer_types(cfg, num_layers))


def spec_from_config(cfg: Any) -> ModelSpec:
    """Check an HF config against what this decoder implements and resolve derived values."""
    archs = list(getattr(cfg, "architectures", None) or [])
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"unsupported model: config.json architectures={archs or None!r} "
            f"(model_type {getattr(cfg, 'model_type', None)!r}); supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    model_type = SUPPORTED_ARCHITECTURES[arch]
    gemma = model_type in GEMMA
    act = getattr(cfg, "hidden_activation", None) if gemma else None
    act = act or getattr(cfg, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    num_heads = cfg.num_attention_heads
    num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads {num_heads} is not a multiple of "
                         f"num_key_value_heads {num_kv_heads}")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    num_layers = cfg.num_hidden_layers
    qkv_bias = True if model_type == "qwen2" else bool(getattr(cfg, "attention_bias", False))
    o_bias = False if model_type == "qwen2" else bool(getattr(cfg, "attention_bias", False))
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    layer_ropes = _layer_ropes(cfg, model_type, num_layers)
    softcap = lambda name: float(getattr(cfg, name)) if gemma and getattr(cfg, name, None) else None
    return ModelSpec(
        model_type=model_type,
        num_layers=num_layers,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=float(cfg.rms_norm_eps),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.max_position_embeddings),
        rope=layer_ropes[0] if layer_ropes else _rope_parameters(cfg),
        layer_windows=_layer_windows(cfg, model_type, num_layers),
        torch_dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
        hidden_act=act,
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        norm_plus_one=gemma,
        sandwich_norm=gemma,
        embed_scale=float(cfg.hidden_size) ** 0.5 if gemma else None,
        attn_scale=float(cfg.query_pre_attn_scalar) ** -0.5 if gemma else None,
        attn_softcap=softcap("attn_logit_softcapping"),
        final_softcap=softcap("final_logit_softcapping"),
        layer_ropes=layer_ropes,
        fused_checkpoint=model_type == "phi3",
    )
