"""The base model's shapes, as the store sees them: owned by `server.model.shapes` (the store depends on
the model's shapes, not the other way round)."""

from server.model.shapes import ATTN_MODULES, LORA_MODULES, MLP_MODULES, BaseModelInfo

__all__ = ["ATTN_MODULES", "LORA_MODULES", "MLP_MODULES", "BaseModelInfo"]
