"""The served base model's shapes: what adapter families check configs and weights against.

Built by `ModelSpec.base_info()` from the checkpoint's config. No torch here: the store and the families
import it to validate uploads.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ATTN_MODULES + MLP_MODULES


@dataclass(frozen=True)
class BaseModelInfo:
    model_type: str  # "llama" | "mistral" | "qwen2"
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    def module_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a short module name such as "q_proj"."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        shapes = {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }
        return shapes[name]

    @staticmethod
    def module_parent(name: str) -> str:
        return "self_attn" if name in ATTN_MODULES else "mlp"

    def full_module_names(self) -> list[str]:
        """Every linear layer LoRA may target, named as in the HF checkpoint (model.layers.3.mlp.up_proj)."""
        return [
            f"model.layers.{layer}.{self.module_parent(m)}.{m}"
            for layer in range(self.num_layers)
            for m in LORA_MODULES
        ]
