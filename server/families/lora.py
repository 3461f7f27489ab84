"""LoRA: y += scale * B(Ax) on the targeted projections, every slot with its own rank, mixed by kernel.

Config matching copies peft 0.21 (`tuners_utils.check_target_module_exists`, `utils.other.get_pattern_key`)
so an adapter resolves to exactly the modules, ranks and scalings PeftModel would give it. PEFT saves
`base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_A.weight` [r, in] and `.lora_B.weight`
[out, r] per targeted module.

Device form (`LoRASlots`): A/B live in pages of the runner's pool (`server/model/adapter_pages.py`,
`--adapter-memory`), each adapter on ceil(r / page_rank) pages of its own rank, read by the kernels through
the pool's page table; per module a slot has only a rank and a scale. A module's pool pages are allocated on
first use, so a server whose adapters touch only q/v pays nothing for the MLP. A slot's rank is 0 for every
module its adapter doesn't target, which the kernels skip at no cost. Layout contract with the kernel
backends (`kernels/`): A pool [P, PR, K]; B stored [P, PR, N] and viewed [P, N, PR].
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from adapters_store.errors import AdapterError
from kernels import FixedLoRAMeta, StackCache, lora_apply
from kernels.fused_lora import lora_apply_fused
from server.families.base import (
    Adapter,
    AdapterFamily,
    AdapterSpec,
    DeviceContext,
    DeviceForm,
    Family,
    base_name_of,
    bool_field,
    int_field,
    number_field,
)
from server.model.adapter_pages import PAGE_RANK, LoRAPagePool
from server.model.batch import StepBatch
from server.model.shapes import LORA_MODULES, BaseModelInfo

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output head
# init schemes that rewrite the base weights: the adapter is meaningless on the unmodified base
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# LoRA options that change the computation beyond y += scale * B(Ax); refused when set
_UNSUPPORTED_LORA_OPTIONS = (
    "target_parameters", "trainable_token_indices", "layer_replication", "alora_invocation_tokens",
    "use_bdlora", "arrow_config", "megatron_config",
)
_LORA_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
LoRAWeights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]


@dataclass(frozen=True)
class LoraModuleSpec:
    """One targeted linear layer: its rank, alpha and the scale PEFT applies to B(Ax)."""

    rank: int
    alpha: float
    scaling: float


@dataclass(frozen=True)
class LoraSpec(AdapterSpec):
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str  # as written: names or one regex
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    layers_to_transform: tuple[int, ...] | None
    # resolved: (layer index, short module name such as "q_proj") -> rank and scaling
    modules: dict[tuple[int, str], LoraModuleSpec]
    # kept for per-request composition (server/compose), which rebuilds peft's merged config from them
    layers_pattern: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    init_lora_weights: bool | str = True

    @property
    def rank(self) -> int:
        """Largest rank over the targeted modules (what a slot must hold)."""
        return max(m.rank for m in self.modules.values())

    @property
    def module_names(self) -> list[str]:
        present = {name for _, name in self.modules}
        return [m for m in LORA_MODULES if m in present]


@dataclass(frozen=True)
class LoraModuleWeights:
    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scaling: float


@dataclass(frozen=True, eq=False)
class LoraAdapter(Adapter):
    modules: dict[tuple[int, str], LoraModuleWeights]

    def weights(self) -> LoRAWeights:
        return {k: (w.a, w.b, w.scaling) for k, w in self.modules.items()}

    @property
    def page_rank(self) -> int:
        return max((w.a.shape[0] for w in self.modules.values()), default=0)


class LoRA(AdapterFamily):
    name = Family.LORA
    peft_types = ("LORA",)

    def parse(self, cfg: dict[str, Any], base: BaseModelInfo, *, max_rank: int) -> AdapterSpec:
        if bool_field(cfg, "use_dora"):  # DoRA is its own family (server/families/dora.py) behind peft's LORA type
            from server.families import DORA

            return DORA.parse(cfg, base, max_rank=max_rank)
        return parse_lora(cfg, base, max_rank)

    def load(self, spec: AdapterSpec, tensors: dict[str, torch.Tensor], base: BaseModelInfo) -> LoraAdapter:
        assert isinstance(spec, LoraSpec)
        return LoraAdapter(family=self, spec=spec, modules=lora_weights(spec, tensors, base))

    def device_form(self, ctx: DeviceContext) -> LoRASlots:
        return LoRASlots(ctx.shapes, ctx.max_adapters, ctx.max_rank, ctx.dtype, ctx.device, pool=ctx.lora_pages)


# ---------------------------------------------------------------------------------------------- config


def hf_module_names(base: BaseModelInfo) -> list[str]:
    """Every module name of the HF *ForCausalLM model (what PEFT matches target_modules against)."""
    names = ["model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"]
    for i in range(base.num_layers):
        layer = f"model.layers.{i}"
        names += [layer, f"{layer}.self_attn", f"{layer}.mlp", f"{layer}.mlp.act_fn",
                  f"{layer}.input_layernorm", f"{layer}.post_attention_layernorm"]
    return names + base.full_module_names()


def _target_matches(target: list[str] | str, key: str) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    return key in target or any(key.endswith(f".{t}") for t in target)


def _layer_index(key: str, layers_pattern: Any) -> int | None:
    # copies peft's lazy regexes: the first numbered segment is the layer index
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_targeted(cfg: dict[str, Any], target: list[str] | str, key: str) -> bool:
    """peft's check_target_module_exists, for the options we accept."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    if key in target:
        return True  # PEFT skips the layer filter for an exact full-name entry
    if not any(key.endswith(f".{t}") for t in target):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    idx = _layer_index(key, cfg.get("layers_pattern"))
    if idx is None:
        return False
    return idx == layers if isinstance(layers, int) else idx in layers


def _pattern_key(patterns: dict[str, Any], key: str) -> str | None:
    """peft's get_pattern_key: the first pattern (in config order) that matches the end of `key`."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None


def _check_regex(value: str, key: str) -> None:
    try:
        re.compile(value)
    except re.error as e:
        raise AdapterError(f"{key} {value!r} is not a valid regular expression: {e}", field=key) from None


def parse_target_modules(cfg: dict[str, Any], base: BaseModelInfo) -> list[str] | str:
    target = cfg.get("target_modules")
    if target == ALL_LINEAR or target == [ALL_LINEAR]:
        return list(LORA_MODULES)
    if isinstance(target, str):
        _check_regex(target, "target_modules")
    elif isinstance(target, list) and target and all(isinstance(t, str) for t in target):
        pass
    else:
        raise AdapterError(
            f"target_modules {target!r} is invalid: must be a non-empty list of module names or one regex "
            f"string; supported modules: {', '.join(LORA_MODULES)}",
            field="target_modules",
        )
    lora_able = set(base.full_module_names())
    others = [n for n in hf_module_names(base) if n not in lora_able]
    entries = [target] if isinstance(target, str) else target
    for entry in entries:
        probe = entry if isinstance(target, str) else [entry]
        bad = [n for n in others if _target_matches(probe, n)]
        if bad:
            raise AdapterError(
                f"target_modules entry {entry!r} matches {bad[0]!r}, which cannot carry a LoRA here; "
                f"supported modules: {', '.join(LORA_MODULES)} (embeddings and lm_head are not supported)",
                field="target_modules", status=422,
            )
        if not any(_target_matches(probe, n) for n in lora_able):
            raise AdapterError(
                f"target_modules entry {entry!r} matches no module of the base model ({base.model_type}, "
                f"{base.num_layers} layers); supported modules: {', '.join(LORA_MODULES)}",
                field="target_modules", status=422,
            )
    return target


def _parse_pattern(cfg: dict[str, Any], key: str, value_check: Any) -> dict[str, Any]:
    patterns = cfg.get(key) or {}
    if not isinstance(patterns, dict):
        raise AdapterError(f"{key} {patterns!r} is invalid: must be an object of pattern -> value", field=key)
    for pattern, value in patterns.items():
        _check_regex(pattern, f"{key} key")
        value_check(value, f"{key}[{pattern!r}]")
    return dict(patterns)


def _check_rank_value(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterError(f"{key} {value!r} is invalid: a rank must be an integer >= 1", field=key)


def parse_lora(cfg: dict[str, Any], base: BaseModelInfo, max_rank: int) -> LoraSpec:
    """Validate a LORA config against `base` and resolve every targeted module's rank and scaling."""
    if bool_field(cfg, "use_dora"):
        raise AdapterError("use_dora true is not supported (DoRA); allowed: false", field="use_dora", status=422)
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise AdapterError(f"bias {bias!r} is not supported; allowed: 'none'", field="bias", status=422)
    for key in ("lora_bias", "fan_in_fan_out", "use_qalora"):
        if bool_field(cfg, key):
            raise AdapterError(f"{key} true is not supported; allowed: false", field=key, status=422)
    for key in _UNSUPPORTED_LORA_OPTIONS:
        if cfg.get(key):
            raise AdapterError(f"{key} {cfg[key]!r} is not supported; allowed: null", field=key, status=422)
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise AdapterError(
            f"init_lora_weights {init!r} means the adapter expects modified base weights; convert it to a "
            "plain LoRA (save_pretrained(path_initial_model_for_weight_conversion=...)) before uploading",
            field="init_lora_weights", status=422,
        )

    r = int_field(cfg, "r", default=8)
    lora_alpha = number_field(cfg.get("lora_alpha", 8), "lora_alpha")
    use_rslora = bool_field(cfg, "use_rslora")
    rank_pattern = _parse_pattern(cfg, "rank_pattern", _check_rank_value)
    alpha_pattern = _parse_pattern(cfg, "alpha_pattern", number_field)
    layers = cfg.get("layers_to_transform")
    if layers is not None:
        items = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise AdapterError(
                f"layers_to_transform {layers!r} is invalid: must be an integer or a list of integers",
                field="layers_to_transform",
            )
        out = [i for i in items if not 0 <= i < base.num_layers]
        if out:
            raise AdapterError(
                f"layers_to_transform has layer {out[0]}, but the base model has layers 0..{base.num_layers - 1}",
                field="layers_to_transform", status=422,
            )
    for key in ("layers_pattern", "exclude_modules"):
        value = cfg.get(key)
        values = [value] if isinstance(value, str) else value
        if values is not None and not (isinstance(values, list) and all(isinstance(v, str) for v in values)):
            raise AdapterError(f"{key} {value!r} is invalid: must be a string or a list of strings", field=key)
        if isinstance(value, str) and key == "exclude_modules":
            _check_regex(value, key)
    target = parse_target_modules(cfg, base)

    modules: dict[tuple[int, str], LoraModuleSpec] = {}
    for layer in range(base.num_layers):
        for short in LORA_MODULES:
            key = f"model.layers.{layer}.{base.module_parent(short)}.{short}"
            if not is_targeted(cfg, target, key):
                continue
            r_key = _pattern_key(rank_pattern, key)
            a_key = _pattern_key(alpha_pattern, key)
            rank = rank_pattern[r_key] if r_key is not None else r
            alpha = float(alpha_pattern[a_key]) if a_key is not None else lora_alpha
            if rank > max_rank:
                where = "r" if r_key is None else f"rank_pattern[{r_key!r}]"
                raise AdapterError(f"rank {rank} ({where}) exceeds --max-rank {max_rank}", field=where, status=422)
            scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
            modules[(layer, short)] = LoraModuleSpec(rank=rank, alpha=alpha, scaling=scaling)
    if not modules:
        raise AdapterError(
            f"target_modules {cfg.get('target_modules')!r} with layers_to_transform {layers!r} and "
            f"exclude_modules {cfg.get('exclude_modules')!r} selects no module of the base model",
            field="target_modules", status=422,
        )
    return LoraSpec(
        r=r, lora_alpha=lora_alpha, use_rslora=use_rslora,
        target_modules=target if isinstance(target, str) else tuple(target),
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        layers_to_transform=None if layers is None else tuple([layers] if isinstance(layers, int) else layers),
        modules=modules, peft_type="LORA", base_model_name_or_path=base_name_of(cfg),
        layers_pattern=_as_tuple(cfg.get("layers_pattern")), exclude_modules=_as_tuple(cfg.get("exclude_modules")),
        init_lora_weights=init if isinstance(init, bool | str) else True,
    )


def _as_tuple(value: Any) -> str | tuple[str, ...] | None:
    return tuple(value) if isinstance(value, list) else value


# ---------------------------------------------------------------------------------------------- weights


def lora_weights(
    spec: LoraSpec, tensors: dict[str, torch.Tensor], base: BaseModelInfo
) -> dict[tuple[int, str], LoraModuleWeights]:
    """Match PEFT's LoRA tensors to the spec's resolved modules, checking every shape."""
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise AdapterError(
                f"unexpected tensor {key!r}: a LoRA adapter may hold only "
                "base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>.weight",
                field=key, status=422,
            )
        layer, parent, short, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if (layer, short) not in spec.modules or base.module_parent(short) != parent:
            raise AdapterError(
                f"tensor {key!r} is for a module that target_modules/layers_to_transform do not select",
                field=key, status=422,
            )
        found.setdefault((layer, short), {})[ab] = t

    out: dict[tuple[int, str], LoraModuleWeights] = {}
    for (layer, short), mod in spec.modules.items():
        prefix = f"base_model.model.model.layers.{layer}.{base.module_parent(short)}.{short}"
        pair = found.get((layer, short), {})
        in_f, out_f = base.module_shape(short)
        expected = {"A": (mod.rank, in_f), "B": (out_f, mod.rank)}
        for ab in ("A", "B"):
            key = f"{prefix}.lora_{ab}.weight"
            if ab not in pair:
                raise AdapterError(f"tensor {key!r} is missing (the config targets this module)", field=key)
            if tuple(pair[ab].shape) != expected[ab]:
                raise AdapterError(
                    f"tensor {key!r} has shape {list(pair[ab].shape)}, expected {list(expected[ab])} "
                    f"(rank {mod.rank}, {short} is {in_f} -> {out_f})",
                    field=key, status=422,
                )
        out[(layer, short)] = LoraModuleWeights(
            a=pair["A"].contiguous(), b=pair["B"].contiguous(), scaling=mod.scaling
        )
    return out


# ---------------------------------------------------------------------------------------------- device


class LoRASlots(DeviceForm):
    """Per module: rank[slot] (int32, host) and scale[slot] (fp32); A/B live in pages of a pool
    (`server/model/adapter_pages.py`) that the kernels read through the pool's page table.

    With `pool` (the runner's, shared with DoRA) the engine assigns each slot its pages before `load`; without
    one (tests) a private pool gives slot s the fixed pages [s * MP, (s + 1) * MP).

    Graph-capturable: over a step's fixed-shape metadata (`kernels.capturable.FixedLoRAMeta`) every module
    with weights runs the fixed launches, which read ranks from `ranks_dev` and A/B through the pool's page
    table, both on the device; `graph_version` changes whenever a module is allocated (a captured decode graph
    then misses it and is re-captured).
    """

    graph_capturable = True

    def __init__(self, info: BaseModelInfo, max_adapters: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, pool: LoRAPagePool | None = None) -> None:
        self.info = info
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        if pool is None:
            mp = -(-max_rank // PAGE_RANK)
            pool = LoRAPagePool(info, max_adapters, max_adapters * mp, max_rank, dtype, device)
            for s in range(max_adapters):
                pool.set_pages(s, list(range(s * mp, (s + 1) * mp)))
        self.pool = pool
        self.ranks: dict[tuple[int, str], torch.Tensor] = {}
        self.scales: dict[tuple[int, str], torch.Tensor] = {}
        self._host_ranks: dict[tuple[int, str], list[int]] = {}
        self.ranks_dev: dict[tuple[int, str], torch.Tensor] = {}  # the same ranks on the device (fixed path)
        self.graph_version = 0
        # CPU only: weights of the step's adapters stacked for one bmm per module (kernels/cpu_backend.py),
        # at most 256 MiB in all; emptied whenever any slot changes.
        self.stack_cache: StackCache | None = StackCache() if device.type == "cpu" else None

    def _allocate(self, key: tuple[int, str]) -> None:
        s = self.max_adapters
        self.pool.module(key)
        # ranks are only read on the host (kernel tile lists): keep them there, no device sync per module
        self.ranks[key] = torch.zeros(s, dtype=torch.int32)
        self.scales[key] = torch.zeros(s, dtype=torch.float32, device=self.device)
        self._host_ranks[key] = [0] * s
        self.ranks_dev[key] = (self.ranks[key] if self.device.type == "cpu"
                               else torch.zeros(s, dtype=torch.int32, device=self.device))
        self.graph_version += 1

    def _check(self, pages: list[int], weights: LoRAWeights) -> None:
        have = len(pages) * self.pool.page_rank
        for (layer, name), (a, b, _) in weights.items():
            where = f"layer {layer} {name}"
            if not 0 <= layer < self.info.num_layers:
                raise ValueError(f"{where}: layer not in [0, {self.info.num_layers})")
            if name not in LORA_MODULES:
                raise ValueError(f"{where}: module not one of {', '.join(LORA_MODULES)}")
            k_in, n_out = self.info.module_shape(name)
            r = a.shape[0]
            if r > self.max_rank:
                raise ValueError(f"{where}: rank {r} exceeds --max-rank {self.max_rank}")
            if r > have:
                raise ValueError(f"{where}: rank {r} needs {-(-r // self.pool.page_rank)} pages, it got "
                                 f"{len(pages)}")
            if tuple(a.shape) != (r, k_in) or tuple(b.shape) != (n_out, r):
                raise ValueError(f"{where}: expected A [r, {k_in}] and B [{n_out}, r], "
                                 f"got A {tuple(a.shape)} and B {tuple(b.shape)}")

    def load(self, slot: int, adapter: Adapter, kv_slots: list[int]) -> None:
        assert isinstance(adapter, LoraAdapter)
        self.load_slot(slot, adapter.weights())

    def clear(self, slot: int) -> None:
        self.clear_slot(slot)

    def project_output(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor, batch: StepBatch) -> None:
        """y += the step's LoRA deltas of one projection (y may be a column slice of a fused output)."""
        if isinstance(batch.segments, FixedLoRAMeta):  # a decode graph step: no host decision on the step's slots
            key = (layer, name)
            if key in self.ranks:
                a, b = self.pool.module(key)
                lora_apply(x, y, a, b, self.ranks_dev[key], self.scales[key], batch.segments, pages=self.pool.pages)
            return
        m = self.module(layer, name, batch.active_slots)
        if m is not None:
            lora_apply(x, y, *m, batch.segments, cache=self.cache_for(layer, name), pages=self.pool.pages)

    def project_outputs(self, layer: int, names: tuple[str, ...], x: torch.Tensor, ys: tuple[torch.Tensor, ...],
                        batch: StepBatch) -> None:
        """Projections sharing x (q/k/v, gate/up): over fixed-shape metadata (a decode graph step) one fused
        launch pair for all of them that have weights (`kernels/fused_lora.py`); otherwise one by one."""
        meta = batch.segments
        if not isinstance(meta, FixedLoRAMeta):
            super().project_outputs(layer, names, x, ys, batch)
            return
        keys = [((layer, n), y) for n, y in zip(names, ys, strict=True) if (layer, n) in self.ranks]
        if keys:
            mods = [(*self.pool.module(k), self.ranks_dev[k], self.scales[k], self.pool.pages) for k, _ in keys]
            lora_apply_fused(x, [y for _, y in keys], mods, meta)

    def stage(self, adapter: Adapter, pages: list[int]) -> Any:
        """Write the adapter's A/B into `pages` (a loader thread may call this while a step runs: nothing
        reads those pages until `activate`). Returns what `activate` needs."""
        assert isinstance(adapter, LoraAdapter)
        return self.stage_weights(adapter.weights(), pages)

    def activate(self, slot: int, adapter: Adapter, staged: Any) -> None:
        """Make a staged adapter serve `slot` (the pool's page table row is already set): ranks and scales."""
        self.activate_weights(slot, staged)

    def stage_weights(self, weights: LoRAWeights, pages: list[int]) -> LoRAWeights:
        self._check(pages, weights)
        for key, (a, b, _) in weights.items():
            self.pool.write(pages, key, a, b)
        return weights

    def load_slot(self, slot: int, weights: LoRAWeights) -> None:
        """Install an adapter in a slot (on the pages the pool's table gives it); modules absent from
        `weights` get rank 0 there.

        Everything is checked before anything is written, so a bad adapter leaves the slot as it was.
        """
        if not 0 <= slot < self.max_adapters:
            raise ValueError(f"LoRA slot {slot} not in [0, {self.max_adapters})")
        self.clear_slot(slot)
        self.activate_weights(slot, self.stage_weights(weights, self.pool.host_pages[slot]))

    def activate_weights(self, slot: int, weights: LoRAWeights) -> None:
        self.clear_slot(slot)
        self._drop_stacks()
        for key, (a, _b, scaling) in weights.items():
            if key not in self.ranks:
                self._allocate(key)
            r = a.shape[0]
            self.ranks[key][slot] = r
            if self.ranks_dev[key] is not self.ranks[key]:
                self.ranks_dev[key][slot] = r
            self.scales[key][slot] = float(scaling)
            self._host_ranks[key][slot] = r

    def _drop_stacks(self) -> None:
        if self.stack_cache is not None:
            self.stack_cache.clear()

    def clear_slot(self, slot: int) -> None:
        """Make a slot contribute nothing (rank 0 everywhere: its pages are never read again until reloaded)."""
        self._drop_stacks()
        for key, host in self._host_ranks.items():
            if host[slot]:
                self.ranks[key][slot] = 0
                if self.ranks_dev[key] is not self.ranks[key]:
                    self.ranks_dev[key][slot] = 0
                self.scales[key][slot] = 0.0
                host[slot] = 0

    def module(self, layer: int, name: str, active_slots: tuple[int, ...]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(A pool, B pool, ranks, scales) of a module, or None when no active slot has rank > 0 there (skip it).
        The pools are read through `self.pool.pages`."""
        key = (layer, name)
        host = self._host_ranks.get(key)
        if host is None or not any(host[s] for s in active_slots):
            return None
        a, b = self.pool.module(key)
        return a, b, self.ranks[key], self.scales[key]

    def cache_for(self, layer: int, name: str) -> tuple[StackCache, tuple[int, str]] | None:
        """(stacked-weight cache, module key) for lora_apply on CPU; None on CUDA."""
        return None if self.stack_cache is None else (self.stack_cache, (layer, name))
