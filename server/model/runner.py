"""ModelRunner: the only interface the engine uses. One thread owns it (and the device)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch

from kernels import FixedLoRAMeta
from server.model.adapter_pages import LoRAPagePool, budget_pages, parse_memory
from server.model.batch import SeqChunk, build_step
from server.model.cuda_graphs import DecodeGraphs
from server.model.decoder import Decoder
from server.model.hooks import NO_HOOKS, ActiveHooks, AdapterLike, DeviceContext, FamilyLike, ResidentForm, has_hooks
from server.model.kv_cache import PagedKVCache, default_num_blocks
from server.model.loader import eos_token_ids, load_spec, load_state_dict, load_tokenizer, resolve_dtype
from server.model.shapes import BaseModelInfo
from server.model.step_buffers import StepBuffers

__all__ = ["ModelInfo", "ModelRunner", "SeqChunk", "resolve_attention_backend"]

ATTENTION_BACKENDS = ("auto", "triton", "torch")
DEFAULT_ADAPTERS = 8  # without --adapter-memory, the pool holds what this many max-rank slots held
MAX_SLOTS = 128  # without --max-adapters: the per-slot tables' rows (other families size theirs by it too)


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


@dataclass(frozen=True)
class ModelInfo:
    """What the runner serves, published once at start-up: upper layers read this, never the runner."""

    name: str  # the checkpoint directory's name
    shapes: BaseModelInfo  # what adapters are validated against
    vocab_size: int
    max_model_len: int
    block_size: int
    num_blocks: int
    max_adapters: int
    max_rank: int
    eos_token_ids: frozenset[int]
    device: str
    dtype: str  # "float32", "bfloat16", ...
    adapter_pages: int = 0  # pages of the LoRA page pool (--adapter-memory); 0: none
    adapter_page_rank: int = 8  # rank rows per page: an adapter of rank r takes ceil(r / this) pages


class ModelRunner:
    """Loads a checkpoint, owns the KV cache and the adapter families' device forms, and runs one ragged
    step per `execute`."""

    def __init__(self, model_dir: str, *, device: str = "cpu", dtype: str = "auto", block_size: int = 16,
                 num_blocks: int | None = None, kv_cache_fraction: float = 0.5,
                 max_model_len: int | None = None, max_adapters: int | None = 4, max_rank: int = 64,
                 max_num_seqs: int = 64, max_batch_tokens: int = 2048, attention_backend: str = "auto",
                 enforce_eager: bool = False, adapter_memory: int | float | str | None = None,
                 graph_template: bool = False) -> None:
        """`adapter_memory`: the LoRA page pool's budget (bytes, or a fraction of free device memory; None:
        what `max_adapters` (default 8) adapters of `max_rank` held before paging). `max_adapters`: an
        optional cap on resident adapters (None: as many as the pages hold, at most 256).
        `graph_template`: run graph-eligible decode steps through the decode graphs' padded template
        eagerly (no capture; any device, Triton attention backend): how the CPU tests prove the capture path's
        inputs, including fixed-shape LoRA metadata, under Triton's interpreter."""
        spec, hf_config = load_spec(model_dir)
        self.spec = spec
        self.hf_config = hf_config  # fine-tuning builds its HF model over the resident weights from it
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, device, spec.torch_dtype)
        if max_model_len is None:
            max_model_len = spec.max_position_embeddings
        elif max_model_len > spec.max_position_embeddings and spec.rope["rope_type"] != "dynamic":
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                             f"{spec.max_position_embeddings}")
        if block_size < 1 or (max_adapters is not None and max_adapters < 1) or max_rank < 1:
            raise ValueError("block_size, max_adapters and max_rank must be >= 1")
        self.tokenizer = load_tokenizer(model_dir)
        eos = eos_token_ids(model_dir, hf_config, self.tokenizer)
        # The base weights are plain tensors (no_grad, not inference_mode): a fine-tuning job backpropagates
        # through these same tensors (server.train.resident), and inference tensors refuse autograd.
        with torch.no_grad():
            state = load_state_dict(model_dir, str(self.device), self.dtype)
            self.decoder = Decoder(spec, state, max_model_len)
        with torch.inference_mode():
            if num_blocks is None:
                num_blocks = default_num_blocks(spec, self.dtype, self.device, block_size, max_model_len,
                                                kv_cache_fraction)
            self.attention_backend = resolve_attention_backend(attention_backend, self.device)
            # CUDA graphs replay decode steps of the paged kernels; padding rows write one scratch block
            # past the engine's num_blocks (never handed out)
            use_graphs = self.device.type == "cuda" and not enforce_eager and self.attention_backend == "triton"
            if graph_template and self.attention_backend != "triton":
                raise ValueError("graph_template needs attention_backend 'triton' (the graphs replay paged kernels)")
            use_graphs = use_graphs or graph_template
            self.kv_cache = PagedKVCache(spec, num_blocks + int(use_graphs), block_size, self.dtype, self.device)
            # +1 block: a prefix-tuning prefix that is not a multiple of the block size
            self.buffers = StepBuffers(max(max_batch_tokens, max_num_seqs), max_num_seqs,
                                       -(-max_model_len // block_size) + 1, self.device)
            memory = parse_memory(adapter_memory) if adapter_memory is not None else None
            num_pages = budget_pages(memory, spec.base_info(), self.dtype, self.device, max_rank,
                                     max_adapters or DEFAULT_ADAPTERS)
            if max_adapters is None:
                max_adapters = max(1, min(num_pages, MAX_SLOTS))
            self.lora_pages = LoRAPagePool(spec.base_info(), max_adapters, num_pages, max_rank, self.dtype,
                                           self.device)
        self.info = ModelInfo(
            name=os.path.basename(os.path.normpath(model_dir)), shapes=spec.base_info(),
            vocab_size=spec.vocab_size, max_model_len=max_model_len, block_size=block_size, num_blocks=num_blocks,
            max_adapters=max_adapters, max_rank=max_rank, eos_token_ids=frozenset(eos), device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."), adapter_pages=num_pages,
            adapter_page_rank=self.lora_pages.page_rank,
        )
        # Adapter families' device forms, created on a family's first load (keyed by family object).
        self._forms: dict[FamilyLike, ResidentForm] = {}
        self._owner: list[ResidentForm | None] = [None] * max_adapters  # device form holding each slot
        self._row_forms: set[int] = set()  # ids of the forms that have per-row hooks
        self._hooks: dict[frozenset[int], ActiveHooks] = {}
        self.graphs = (DecodeGraphs(self._forward, self.buffers, max_num_seqs, num_blocks, block_size,
                                    capture=not graph_template, max_adapters=max_adapters,
                                    signature=self._graph_signature) if use_graphs else None)

    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Compute one step; returns fp32 logits [rows, vocab] in chunk order: one row per chunk with
        `want_logits`, or rows logits_from..end of a chunk that sets `logits_from` (prompt scoring).

        A chunk's `adapter_slot` brings in what the family in that slot contributes (its `ChunkPart`
        and its row hooks).
        """
        info = self.info
        with torch.inference_mode():
            if not chunks:
                return torch.empty(0, info.vocab_size, dtype=torch.float32, device=self.device)
            chunks = [self._with_adapter(c) for c in chunks]
            row_slots = frozenset(s for s, f in enumerate(self._owner) if f is not None and id(f) in self._row_forms)
            batch = build_step(chunks, block_size=info.block_size, num_blocks=info.num_blocks,
                               max_model_len=info.max_model_len, max_adapters=info.max_adapters,
                               hidden=self.spec.hidden_size, vocab_size=info.vocab_size, device=self.device,
                               row_slots=row_slots, buffers=self.buffers, paged=self.attention_backend == "triton",
                               fixed_lora=self._fixed_lora(chunks, row_slots))
            if self.graphs is not None:
                logits = self.graphs.try_run(batch)
                if logits is not None:
                    return logits
            return self._forward(batch)

    def _forward(self, batch: Any) -> torch.Tensor:
        if isinstance(batch.segments, FixedLoRAMeta):  # a decode graph's template: every capturable form acts
            hooks = ActiveHooks(self._capturable_forms())  # type: ignore[arg-type]
        else:
            hooks = self._active_hooks(batch.active_slots)
        return self.decoder.forward(batch, self.kv_cache, hooks)

    def _capturable_forms(self) -> list[ResidentForm]:
        """Device forms with row hooks whose hooks run over fixed-shape LoRA metadata (`graph_capturable`)."""
        return [f for f in self._forms.values() if id(f) in self._row_forms and getattr(f, "graph_capturable", False)]

    def _graph_signature(self) -> tuple:
        """What a LoRA decode graph was captured over: each capturable form and its `graph_version`."""
        return tuple((id(f), f.graph_version) for f in self._capturable_forms())  # type: ignore[attr-defined]

    def _fixed_lora(self, chunks: list[SeqChunk], row_slots: frozenset[int]) -> bool:
        """Whether the step may replay a LoRA decode graph: decode only, and every adapter row's form capturable."""
        if self.graphs is None or any(len(c.token_ids) != 1 for c in chunks):
            return False
        return all(getattr(self._owner[c.adapter_slot], "graph_capturable", False)
                   for c in chunks if c.adapter_slot in row_slots)

    def _with_adapter(self, c: SeqChunk) -> SeqChunk:
        slot = c.adapter_slot
        form = self._owner[slot] if 0 <= slot < len(self._owner) else None
        part = form.chunk(slot, c.start_pos, len(c.token_ids)) if form is not None else None
        if part is None:
            return c
        return replace(c, prefix_slots=part.prefix_slots, pos_offset=part.pos_offset, input_embeds=part.input_embeds)

    def _active_hooks(self, active_slots: tuple[int, ...]) -> ActiveHooks:
        if not active_slots:
            return NO_HOOKS
        forms = []
        for s in active_slots:
            f = self._owner[s]
            if f is not None and f not in forms:
                forms.append(f)
        key = frozenset(id(f) for f in forms)
        hooks = self._hooks.get(key)
        if hooks is None:
            hooks = self._hooks[key] = ActiveHooks(forms)  # type: ignore[arg-type]
        return hooks

    def device_form(self, family: FamilyLike) -> ResidentForm:
        """`family`'s device form on this runner, created on first use (`server.families.base.DeviceForm`)."""
        form = self._forms.get(family)
        if form is None:
            info = self.info
            ctx = DeviceContext(shapes=info.shapes, max_adapters=info.max_adapters, max_rank=info.max_rank,
                                dtype=self.dtype, device=self.device, kv_cache=self.kv_cache,
                                base_weight=self.decoder.base_weight, base_bias=self.decoder.base_bias,
                                lora_pages=self.lora_pages)
            with torch.inference_mode():
                form = self._forms[family] = family.device_form(ctx)
            if has_hooks(form):  # type: ignore[arg-type]
                self._row_forms.add(id(form))
        return form

    def load_adapter(self, slot: int, adapter: AdapterLike, kv_slots: list[int] | None = None,
                     pages: list[int] | None = None) -> None:
        """Put `adapter` (a `server.families.Adapter`) in device `slot`, replacing whatever held it.

        `kv_slots`: the flat KV-cache slots reserved for its `prefix_tokens` (empty when it has none).
        `pages`: the LoRA pool pages it gets (the engine's SlotManager chose them); None: slot s's fixed pages
        [s * MP, (s + 1) * MP), for callers without a page manager (tests, one-adapter tools).
        """
        if not 0 <= slot < self.info.max_adapters:
            raise ValueError(f"adapter slot {slot} not in [0, {self.info.max_adapters})")
        form = self.device_form(adapter.family)
        if pages is None:
            mp = self.lora_pages.max_pages
            pages = list(range(slot * mp, (slot + 1) * mp)) if (slot + 1) * mp <= self.info.adapter_pages else []
        with torch.inference_mode():
            self.clear_slot(slot)
            self.lora_pages.set_pages(slot, pages)
            form.load(slot, adapter, list(kv_slots or []))
        self._owner[slot] = form

    def stage_adapter(self, adapter: AdapterLike, pages: list[int]) -> Any:
        """Write a paged adapter's weights into `pages` (a loader thread calls this while steps run; nothing
        reads those pages until `activate_adapter`). Its family's device form must exist (`device_form`,
        called on the engine's thread first) and have `stage`."""
        form = self._forms[adapter.family]
        with torch.inference_mode():
            return form.stage(adapter, pages)  # type: ignore[attr-defined]

    def activate_adapter(self, slot: int, adapter: AdapterLike, staged: Any, pages: list[int]) -> None:
        """Make a staged adapter serve `slot` (between steps, on the engine's thread)."""
        form = self.device_form(adapter.family)
        with torch.inference_mode():
            self.clear_slot(slot)
            self.lora_pages.set_pages(slot, pages)
            form.activate(slot, adapter, staged)  # type: ignore[attr-defined]
        self._owner[slot] = form

    def clear_slot(self, slot: int) -> None:
        """Empty a device slot: requests using it would now get the base model."""
        form = self._owner[slot]
        if form is not None:
            with torch.inference_mode():
                form.clear(slot)
            self._owner[slot] = None

