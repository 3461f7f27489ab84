"""Everything a route needs, built once at start-up from Settings."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.config import Settings
from server.engine.async_engine import AsyncEngine
from server.engine.registry import AdapterRegistry
from server.model.runner import ModelInfo

log = logging.getLogger("peftserve")


@dataclass
class ServerState:
    settings: Settings
    engine: AsyncEngine
    registry: AdapterRegistry
    base_name: str
    created: int = field(default_factory=lambda: int(time.time()))
    store: Any = None  # adapters_store.AdapterStore when the store is enabled
    metrics: Any = None  # server.metrics.Metrics
    composer: Any = None  # server.compose.service.Composer: per-request adapter compositions
    finetune: Any = None  # server.train.manager.FineTuning: files and fine-tuning jobs
    assistants: Any = None  # server.api.assistants.Assistants when the store is enabled
    tenants: Any = None  # server.tenants.service.Tenants: tenant keys, quotas, ownership (with the store)
    # what /metrics renders when not this process's own registry (the Ray writer: every replica's, merged);
    # the same key check and per-tenant filter apply to it
    metrics_text: Callable[[], bytes] | None = None

    @property
    def model(self) -> ModelInfo:
        """The served model and its limits, as the runner published them at start-up."""
        return self.engine.info

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer


def build_state(settings: Settings) -> ServerState:
    """Load the base model (from --model; SmolLM2-135M-Instruct when none), the start-up adapters, the engine."""
    import torch

    from adapters_store import AdapterStore
    from adapters_store.loader import load_adapter
    from server.model.resolve import resolve_model
    from server.model.runner import ModelRunner
    from server.threads import claim_for_engine, single_threaded

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("peftserve: error: --device cuda: no CUDA device is available")
    # On CPU the engine thread gets every torch thread; model and adapter loading run on one.
    engine_threads = claim_for_engine() if device == "cpu" else None
    resolved = resolve_model(settings.model)
    model_dir = resolved.path
    runner = ModelRunner(
        model_dir,
        device=device,
        dtype=settings.dtype,
        block_size=settings.block_size,
        num_blocks=settings.kv_cache_blocks,
        kv_cache_fraction=settings.kv_cache_fraction,
        max_model_len=settings.max_model_len,
        max_adapters=settings.max_adapters,
        max_rank=settings.max_rank,
        max_num_seqs=settings.max_num_seqs,
        max_batch_tokens=max(settings.max_batch_tokens, settings.max_num_seqs),
        attention_backend=settings.attention_backend,
        enforce_eager=settings.enforce_eager,
        adapter_memory=settings.adapter_memory,
    )
    m = runner.info
    # The one check that a request which fits --max-model-len fits the cache alone (+1 block: a prefix-tuning
    # prefix that is not a multiple of the block size); otherwise it would wait forever.
    need = -(-m.max_model_len // m.block_size) + 1
    if m.num_blocks < need:
        raise ValueError(f"a KV cache of {m.num_blocks} blocks x --block-size {m.block_size} cannot hold one sequence "
                         f"of --max-model-len {m.max_model_len}: needs at least {need} blocks; lower --max-model-len "
                         "or raise --kv-cache-blocks / --kv-cache-fraction")
    engine = AsyncEngine(runner, max_num_seqs=settings.max_num_seqs, max_batch_tokens=settings.max_batch_tokens,
                         torch_threads=engine_threads, prefix_caching=not settings.no_prefix_caching,
                         max_slot_wait=settings.max_slot_wait)
    info, max_rank = runner.info.shapes, settings.max_rank

    def load(path: Any) -> Any:  # runs in a worker thread of asyncio.to_thread
        single_threaded()
        return load_adapter(path, info, max_rank=max_rank)

    registry = AdapterRegistry(loader=load, max_cpu=settings.max_cpu_adapters)
    # A version nobody will use again leaves its device slot as soon as that slot is idle.
    registry.on_stale = engine.forget_adapter
    store = AdapterStore(adapters_dir(settings))
    for rec in store.list():
        registry.register(rec.name, rec.version, store.path(rec.name), rec.to_dict())
    for name, path in settings.adapter_pairs():
        if name in registry:
            raise ValueError(f"--adapter {name}={path}: an adapter named {name!r} is already in the store "
                             f"{store.root}")
        loaded = load_adapter(path, info, max_rank=max_rank)
        registry.put(name, loaded, path=path)
        log.info("adapter %s (%s) loaded from %s", name, loaded.kind, path)
    base_name = settings.served_model_name or resolved.name
    if base_name in registry:  # /v1/models would list the id twice and the adapter be unreachable
        raise ValueError(f"adapter name {base_name!r} is also the base model's id; rename the adapter or pass "
                         "another --served-model-name")
    log.info("serving %s on %s (%s), %d KV blocks of %d tokens, max_model_len %d; %d stored adapters in %s",
             base_name, m.device, m.dtype, m.num_blocks, m.block_size, m.max_model_len, len(store.list()), store.root)
    from server.train.manager import FineTuning

    finetune = FineTuning(store=store, registry=registry, engine=engine, base_name=base_name,
                          train_share=settings.train_share, max_file_lines=settings.max_file_lines,
                          max_model_len=m.max_model_len, max_rank=max_rank,
                          max_step_tokens=settings.train_max_step_tokens)
    from server.api.assistants import check_at_startup, open_assistants
    from server.compose.service import Composer

    composer = Composer(registry, info, max_rank=max_rank, max_compose=settings.max_compose, base_name=base_name)
    state = ServerState(settings=settings, engine=engine, registry=registry, base_name=base_name, store=store,
                        assistants=open_assistants(store.index_path), composer=composer, finetune=finetune)
    check_at_startup(state)
    from adapters_store.keys import KeyStore
    from server.tenants.service import Tenants

    state.tenants = Tenants(KeyStore(store.index_path), max_labels=settings.metrics_max_tenants)
    state.tenants.bind(state)
    return state


def adapters_dir(settings: Settings) -> str:
    import os

    from server.model.default_model import default_cache_root

    if settings.adapters_dir:
        return os.path.expanduser(settings.adapters_dir)
    return os.path.join(default_cache_root(), "adapters")
