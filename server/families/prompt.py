"""Prompt tuning and p-tuning: `num_virtual_tokens` embeddings placed ahead of the prompt at prefill.

PEFT saves one tensor, `prompt_embeddings` [P, hidden], already passed through any encoder (p-tuning's
MLP or LSTM runs in `get_prompt_embedding_to_save`), so both peft types are the same family here. Each
sequence holds the P virtual positions in its own KV; a chunk covering them gets their embeddings in
place of token embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adapters_store.errors import AdapterError
from server.families.base import (
    Adapter,
    AdapterFamily,
    AdapterSpec,
    DeviceContext,
    DeviceForm,
    Family,
    base_name_of,
    check_single_submodule,
    int_field,
    match_base,
)
from server.model.hooks import ChunkPart
from server.model.shapes import BaseModelInfo


@dataclass(frozen=True)
class PromptSpec(AdapterSpec):
    """PROMPT_TUNING or P_TUNING: `num_virtual_tokens` embeddings put ahead of the prompt."""

    num_virtual_tokens: int
    token_dim: int
    prompt_tuning_init: str | None = None
    encoder_reparameterization_type: str | None = None


@dataclass(frozen=True, eq=False)
class PromptAdapter(Adapter):
    embeds: torch.Tensor  # [P, hidden]

    @property
    def virtual_tokens(self) -> int:
        return self.embeds.shape[0]


class PromptTuning(AdapterFamily):
    name = Family.PROMPT
    peft_types = ("PROMPT_TUNING", "P_TUNING")

    def parse(self, cfg: dict[str, Any], base: BaseModelInfo, *, max_rank: int) -> PromptSpec:
        check_single_submodule(cfg)
        p = int_field(cfg, "num_virtual_tokens")
        match_base(cfg, "token_dim", base.hidden_size, "its hidden_size")
        match_base(cfg, "num_layers", base.num_layers, "its layer count", optional=True)
        match_base(cfg, "num_attention_heads", base.num_attention_heads, "its attention heads", optional=True)
        init = cfg.get("prompt_tuning_init")
        reparam = cfg.get("encoder_reparameterization_type")
        return PromptSpec(
            peft_type=cfg["peft_type"], base_model_name_or_path=base_name_of(cfg),
            num_virtual_tokens=p, token_dim=base.hidden_size,
            prompt_tuning_init=init if isinstance(init, str) else None,
            encoder_reparameterization_type=reparam if isinstance(reparam, str) else None,
        )

    def load(self, spec: AdapterSpec, tensors: dict[str, torch.Tensor], base: BaseModelInfo) -> PromptAdapter:
        assert isinstance(spec, PromptSpec)
        t = prompt_tensor(tensors, spec.peft_type, spec.num_virtual_tokens, spec.token_dim)
        return PromptAdapter(family=self, spec=spec, embeds=t.contiguous())

    def device_form(self, ctx: DeviceContext) -> PromptEmbeds:
        return PromptEmbeds(ctx)


def prompt_tensor(tensors: dict[str, torch.Tensor], peft_type: str, p: int, width: int) -> torch.Tensor:
    """The one `prompt_embeddings` [p, width] tensor prompt-learning adapters hold."""
    extra = sorted(set(tensors) - {"prompt_embeddings"})
    if extra:
        raise AdapterError(
            f"unexpected tensor {extra[0]!r}: a {peft_type} adapter holds only 'prompt_embeddings'",
            field=extra[0], status=422,
        )
    if "prompt_embeddings" not in tensors:
        raise AdapterError("tensor 'prompt_embeddings' is missing", field="prompt_embeddings")
    t = tensors["prompt_embeddings"]
    if tuple(t.shape) != (p, width):
        raise AdapterError(
            f"tensor 'prompt_embeddings' has shape {list(t.shape)}, expected [{p}, {width}] "
            f"(num_virtual_tokens {p}, {peft_type})",
            field="prompt_embeddings", status=422,
        )
    return t


class PromptEmbeds(DeviceForm):
    """Per slot: the virtual-token embeddings [P, hidden] on the device, in the model dtype."""

    def __init__(self, ctx: DeviceContext) -> None:
        self.device, self.dtype = ctx.device, ctx.dtype
        self.embeds: dict[int, torch.Tensor] = {}

    def load(self, slot: int, adapter: Adapter, kv_slots: list[int]) -> None:
        assert isinstance(adapter, PromptAdapter)
        self.embeds[slot] = adapter.embeds.to(self.device, self.dtype)

    def clear(self, slot: int) -> None:
        self.embeds.pop(slot, None)

    def chunk(self, slot: int, start: int, n: int) -> ChunkPart | None:
        e = self.embeds[slot]
        if start >= e.shape[0]:
            return None
        return ChunkPart(input_embeds=e[start:start + min(e.shape[0] - start, n)])
