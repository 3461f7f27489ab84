"""Prefix tuning: a per-layer key/value prefix of `num_virtual_tokens` positions ahead of every sequence.

PEFT saves one tensor, `prompt_embeddings` [P, L*2*kv*hd], already passed through the prefix MLP
(`get_prompt_embedding_to_save`), so nothing is run here. Device form: the adapter's K/V are written
once into KV blocks the scheduler reserves for its slot (shared, read-only, by every sequence on the
adapter); a chunk of such a sequence attends over them first, with positions shifted by P as PEFT does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from server.families.base import (
    Adapter,
    AdapterFamily,
    AdapterSpec,
    DeviceContext,
    DeviceForm,
    Family,
    base_name_of,
    bool_field,
    check_single_submodule,
    int_field,
    match_base,
)
from server.families.prompt import prompt_tensor
from server.model.hooks import ChunkPart
from server.model.shapes import BaseModelInfo


@dataclass(frozen=True)
class PrefixSpec(AdapterSpec):
    """PREFIX_TUNING: a per-layer key/value prefix of `num_virtual_tokens` positions."""

    num_virtual_tokens: int
    num_layers: int
    num_kv_heads: int  # PEFT's `num_attention_heads`, set to num_key_value_heads for GQA models
    head_dim: int
    token_dim: int  # num_kv_heads * head_dim
    prefix_projection: bool


@dataclass(frozen=True, eq=False)
class PrefixAdapter(Adapter):
    keys: torch.Tensor  # [num_layers, P, num_kv_heads, head_dim]
    values: torch.Tensor  # [num_layers, P, num_kv_heads, head_dim]

    @property
    def prefix_tokens(self) -> int:
        return self.keys.shape[1]


class PrefixTuning(AdapterFamily):
    name = Family.PREFIX
    peft_types = ("PREFIX_TUNING",)

    def parse(self, cfg: dict[str, Any], base: BaseModelInfo, *, max_rank: int) -> PrefixSpec:
        check_single_submodule(cfg)
        p = int_field(cfg, "num_virtual_tokens")
        kv, hd = base.num_key_value_heads, base.head_dim
        match_base(cfg, "num_layers", base.num_layers, "its layer count")
        match_base(cfg, "num_attention_heads", kv,
                   f"PEFT sets it to the base's num_key_value_heads={kv} for prefix tuning")
        match_base(cfg, "token_dim", kv * hd, f"num_key_value_heads {kv} x head_dim {hd}")
        return PrefixSpec(
            peft_type="PREFIX_TUNING", base_model_name_or_path=base_name_of(cfg),
            num_virtual_tokens=p, num_layers=base.num_layers, num_kv_heads=kv, head_dim=hd, token_dim=kv * hd,
            prefix_projection=bool_field(cfg, "prefix_projection"),
        )

    def load(self, spec: AdapterSpec, tensors: dict[str, torch.Tensor], base: BaseModelInfo) -> PrefixAdapter:
        assert isinstance(spec, PrefixSpec)
        t = prompt_tensor(tensors, spec.peft_type, spec.num_virtual_tokens, spec.num_layers * 2 * spec.token_dim)
        keys, values = prefix_kv(spec, t)
        return PrefixAdapter(family=self, spec=spec, keys=keys, values=values)

    def device_form(self, ctx: DeviceContext) -> PrefixKV:
        return PrefixKV(ctx)


def prefix_kv(spec: PrefixSpec, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `get_prompt` for batch 1, as per-layer keys and values.

    `prompt` [P, L*2*kv*hd] is viewed as [P, 2L, kv, hd]; PEFT permutes to [2L, B, kv, P, hd] and
    splits pairs along 2L, so layer i's key is row 2i and its value row 2i+1. We return the
    [L, P, kv, hd] layout (token-major, like a KV cache block).
    """
    p, layers, kv, hd = spec.num_virtual_tokens, spec.num_layers, spec.num_kv_heads, spec.head_dim
    x = prompt.reshape(p, layers, 2, kv, hd).permute(2, 1, 0, 3, 4)  # [2, L, P, kv, hd]
    return x[0].contiguous(), x[1].contiguous()


class PrefixKV(DeviceForm):
    """Per slot: the flat KV-cache slots holding the adapter's prefix (the same for every layer)."""

    def __init__(self, ctx: DeviceContext) -> None:
        self.kv_cache = ctx.kv_cache
        self.device = ctx.device
        self.kv_slots: dict[int, list[int]] = {}

    def load(self, slot: int, adapter: Adapter, kv_slots: list[int]) -> None:
        assert isinstance(adapter, PrefixAdapter)
        if len(kv_slots) != adapter.prefix_tokens:
            raise ValueError(f"slot {slot}: {len(kv_slots)} KV slots reserved for a prefix of "
                             f"{adapter.prefix_tokens} tokens")
        # keys are stored as given (no RoPE applied), which is how PEFT prefix tuning feeds them
        self.kv_cache.write_all_layers(kv_slots, adapter.keys.to(self.device), adapter.values.to(self.device))
        self.kv_slots[slot] = list(kv_slots)

    def clear(self, slot: int) -> None:
        self.kv_slots.pop(slot, None)

    def chunk(self, slot: int, start: int, n: int) -> ChunkPart:
        kv = self.kv_slots[slot]
        return ChunkPart(prefix_slots=kv, pos_offset=len(kv))
