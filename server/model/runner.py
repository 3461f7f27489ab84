"""ModelRunner: the only interface the engine uses. One thread owns it (and the device)."""

from __future__ import annotations

import os
from typing import Any

import torch

from adapters_store.base_info import BaseModelInfo
from server.model.batch import SeqChunk, build_step
from server.model.cuda_graphs import DecodeGraphs
from server.model.decoder import Decoder
from server.model.kv_cache import PagedKVCache, default_num_blocks
from server.model.loader import eos_token_ids, load_spec, load_state_dict, load_tokenizer, resolve_dtype
from server.model.lora_slots import LoRASlots, LoRAWeights
from server.model.step_buffers import StepBuffers

__all__ = ["ModelRunner", "SeqChunk", "resolve_attention_backend"]

ATTENTION_BACKENDS = ("auto", "triton", "torch")


def resolve_attention_backend(backend: str, device: torch.device) -> str:
    """auto: the Triton paged kernels on CUDA, the torch twin elsewhere. `triton` off CUDA runs the kernels
    through Triton's CPU interpreter (tests), which must be switched on before triton is imported."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {backend!r} invalid; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("attention_backend 'triton' on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return backend


class ModelRunner:
    """Loads a checkpoint, owns the KV cache and LoRA slots, and runs one ragged step per `execute`."""

    def __init__(self, model_dir: str, *, device: str = "cpu", dtype: str = "auto", block_size: int = 16,
                 num_blocks: int | None = None, kv_cache_fraction: float = 0.5,
                 max_model_len: int | None = None, max_adapters: int = 4, max_rank: int = 64,
                 max_num_seqs: int = 64, max_batch_tokens: int = 2048, attention_backend: str = "auto",
                 enforce_eager: bool = False) -> None:
        spec, hf_config = load_spec(model_dir)
        self.spec = spec
        self.info: BaseModelInfo = spec.base_info()
        self.model_name = os.path.basename(os.path.normpath(model_dir))
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, device, spec.torch_dtype)
        if max_model_len is None:
            max_model_len = spec.max_position_embeddings
        elif max_model_len > spec.max_position_embeddings and spec.rope["rope_type"] != "dynamic":
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                             f"{spec.max_position_embeddings}")
        if block_size < 1 or max_adapters < 1 or max_rank < 1:
            raise ValueError("block_size, max_adapters and max_rank must be >= 1")
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.tokenizer = load_tokenizer(model_dir)
        self.eos_token_ids: set[int] = eos_token_ids(model_dir, hf_config, self.tokenizer)
        with torch.inference_mode():
            state = load_state_dict(model_dir, str(self.device), self.dtype)
            self.decoder = Decoder(spec, state, max_model_len)
            if num_blocks is None:
                num_blocks = default_num_blocks(spec, self.dtype, self.device, block_size, max_model_len,
                                                kv_cache_fraction)
            self.num_blocks = num_blocks
            self.attention_backend = resolve_attention_backend(attention_backend, self.device)
            # CUDA graphs replay decode steps of the paged kernels; padding rows write one scratch block
            # past the engine's num_blocks (never handed out)
            use_graphs = self.device.type == "cuda" and not enforce_eager and self.attention_backend == "triton"
            self.kv_cache = PagedKVCache(spec, num_blocks + int(use_graphs), block_size, self.dtype, self.device)
            self.lora = LoRASlots(self.info, max_adapters, max_rank, self.dtype, self.device)
            # +1 block: a prefix-tuning prefix that is not a multiple of the block size
            self.buffers = StepBuffers(max(max_batch_tokens, max_num_seqs), max_num_seqs,
                                       -(-max_model_len // block_size) + 1, self.device)
            self.graphs = (DecodeGraphs(self._forward, self.buffers, max_num_seqs, num_blocks, block_size,
                                        capture=True) if use_graphs else None)

    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Compute one step; returns fp32 logits [chunks with want_logits, vocab] in chunk order."""
        with torch.inference_mode():
            if not chunks:
                return torch.empty(0, self.spec.vocab_size, dtype=torch.float32, device=self.device)
            batch = build_step(chunks, block_size=self.block_size, num_blocks=self.num_blocks,
                               max_model_len=self.max_model_len, max_adapters=self.max_adapters,
                               hidden=self.spec.hidden_size, vocab_size=self.spec.vocab_size,
                               device=self.device, buffers=self.buffers,
                               paged=self.attention_backend == "triton")
            if self.graphs is not None:
                logits = self.graphs.try_run(batch)
                if logits is not None:
                    return logits
            return self._forward(batch)

    def _forward(self, batch: Any) -> torch.Tensor:
        return self.decoder.forward(batch, self.kv_cache, self.lora)

    def load_lora(self, slot: int, weights: LoRAWeights) -> None:
        """Install LoRA weights {(layer, "q_proj"): (A [r, in], B [out, r], scaling)} in a device slot."""
        with torch.inference_mode():
            self.lora.load_slot(slot, weights)

    def clear_lora(self, slot: int) -> None:
        """Empty a device slot: requests using it would now get the base model."""
        with torch.inference_mode():
            self.lora.clear_slot(slot)

    def write_prefix_kv(self, slots: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a prefix adapter's per-layer K/V [num_layers, P, kv_heads, head_dim] at flat cache slots.

        The slots are then passed as SeqChunk.prefix_slots; keys are used as given (no RoPE applied).
        """
        with torch.inference_mode():
            self.kv_cache.write_all_layers(slots, keys.to(self.device), values.to(self.device))
