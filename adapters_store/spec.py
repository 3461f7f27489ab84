"""`adapter_config.json` → a typed, validated spec, checked against the base model once.

Matching rules copy peft 0.21 (`tuners_utils.check_target_module_exists`, `utils.other.get_pattern_key`)
so an adapter resolves to exactly the modules, ranks and scalings PeftModel would give it.
`base_model_name_or_path` is recorded, never used: nothing here reads the network or runs code.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters_store.base_info import LORA_MODULES, BaseModelInfo
from adapters_store.errors import AdapterError

SUPPORTED_PEFT_TYPES = ("LORA", "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output head
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# init schemes that rewrite the base weights: the adapter is meaningless on the unmodified base
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# LoRA options that change the computation beyond y += scale * B(Ax); refused when set
_UNSUPPORTED_LORA_OPTIONS = (
    "target_parameters", "trainable_token_indices", "layer_replication", "alora_invocation_tokens",
    "use_bdlora", "arrow_config", "megatron_config",
)


def validate_name(name: str) -> str:
    """Return `name` if it is a safe adapter name, else raise AdapterError."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise AdapterError(
            f"adapter name {name!r} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit, without '..'",
            field="name",
        )
    return name


@dataclass(frozen=True)
class LoraModuleSpec:
    """One targeted linear layer: its rank, alpha and the scale PEFT applies to B(Ax)."""

    rank: int
    alpha: float
    scaling: float


@dataclass(frozen=True)
class LoraSpec:
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str  # as written: names or one regex
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    layers_to_transform: tuple[int, ...] | None
    # resolved: (layer index, short module name such as "q_proj") -> rank and scaling
    modules: dict[tuple[int, str], LoraModuleSpec]
    base_model_name_or_path: str | None = None
    peft_type: str = "LORA"
    kind: str = "lora"

    @property
    def rank(self) -> int:
        """Largest rank over the targeted modules (what a slot must hold)."""
        return max(m.rank for m in self.modules.values())

    @property
    def module_names(self) -> list[str]:
        """Short names of the targeted modules, in the base's module order."""
        present = {name for _, name in self.modules}
        return [m for m in LORA_MODULES if m in present]


@dataclass(frozen=True)
class PrefixSpec:
    """PREFIX_TUNING: a per-layer key/value prefix of `num_virtual_tokens` positions."""

    num_virtual_tokens: int
    num_layers: int
    num_kv_heads: int  # PEFT's `num_attention_heads`, set to num_key_value_heads for GQA models
    head_dim: int
    token_dim: int  # num_kv_heads * head_dim
    prefix_projection: bool
    base_model_name_or_path: str | None = None
    peft_type: str = "PREFIX_TUNING"
    kind: str = "prefix"
    rank: None = None
    module_names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PromptSpec:
    """PROMPT_TUNING or P_TUNING: `num_virtual_tokens` embeddings put ahead of the prompt."""

    peft_type: str  # "PROMPT_TUNING" | "P_TUNING"
    num_virtual_tokens: int
    token_dim: int
    prompt_tuning_init: str | None = None
    encoder_reparameterization_type: str | None = None
    base_model_name_or_path: str | None = None
    kind: str = "prompt"
    rank: None = None
    module_names: list[str] = field(default_factory=list)


AdapterSpec = LoraSpec | PrefixSpec | PromptSpec


def load_config(path: str | Path) -> dict[str, Any]:
    """Read `adapter_config.json`; a missing or malformed file raises AdapterError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AdapterError(f"{path.name} is missing", field="adapter_config.json") from None
    except OSError as e:
        raise AdapterError(f"cannot read {path.name}: {e}", field="adapter_config.json") from None
    return loads_config(raw)


def loads_config(raw: bytes | str) -> dict[str, Any]:
    """Parse the bytes of `adapter_config.json` into a dict."""
    try:
        cfg = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter_config.json is not valid JSON: {e}", field="adapter_config.json") from None
    if not isinstance(cfg, dict):
        raise AdapterError(
            f"adapter_config.json must hold a JSON object, got {type(cfg).__name__}", field="adapter_config.json"
        )
    return cfg


def parse_config(cfg: dict[str, Any], base: BaseModelInfo, *, max_rank: int) -> AdapterSpec:
    """Validate a PEFT config against `base` and resolve it into a spec; refusals raise AdapterError."""
    if not isinstance(cfg, dict):
        raise AdapterError("adapter config must be a JSON object", field="adapter_config.json")
    if cfg.get("auto_map"):
        raise AdapterError(
            f"auto_map {cfg['auto_map']!r} asks for remote code; adapters that need custom code are refused",
            field="auto_map", status=422,
        )
    peft_type = cfg.get("peft_type")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise AdapterError(
            f"peft_type {peft_type!r} is not supported; supported: {', '.join(SUPPORTED_PEFT_TYPES)}",
            field="peft_type", status=422,
        )
    task_type = cfg.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise AdapterError(
            f"task_type {task_type!r} is not supported; allowed: CAUSAL_LM (or null)", field="task_type", status=422
        )
    modules_to_save = cfg.get("modules_to_save")
    if modules_to_save:
        raise AdapterError(
            f"modules_to_save {modules_to_save!r} is not supported: only adapter weights can be served, "
            "not full copies of base modules; allowed: null or []",
            field="modules_to_save", status=422,
        )
    base_name = cfg.get("base_model_name_or_path")
    base_name = base_name if isinstance(base_name, str) else None
    if peft_type == "LORA":
        return _parse_lora(cfg, base, max_rank, base_name)
    if peft_type == "PREFIX_TUNING":
        return _parse_prefix(cfg, base, base_name)
    return _parse_prompt(cfg, base, base_name)


# ---------------------------------------------------------------------------------------------- helpers


def _int(cfg: dict[str, Any], key: str, *, default: Any = None, minimum: int = 1) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AdapterError(f"{key} {value!r} is invalid: must be an integer >= {minimum}", field=key)
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdapterError(f"{key} {value!r} is invalid: must be a finite number", field=key)
    return float(value)


def _bool(cfg: dict[str, Any], key: str, default: bool = False) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise AdapterError(f"{key} {value!r} is invalid: must be true or false", field=key)
    return value


def _match_same(cfg: dict[str, Any], key: str, expected: int, why: str, *, optional: bool = False) -> int:
    value = cfg.get(key)
    if value is None and optional:
        return expected
    value = _int(cfg, key)
    if value != expected:
        raise AdapterError(
            f"{key} {value} does not match the base model, which needs {key}={expected} ({why})",
            field=key, status=422,
        )
    return value


def _check_submodules(cfg: dict[str, Any]) -> None:
    subs = cfg.get("num_transformer_submodules")
    if subs not in (None, 1):
        raise AdapterError(
            f"num_transformer_submodules {subs!r} is not supported: decoder-only models use 1",
            field="num_transformer_submodules", status=422,
        )


# ---------------------------------------------------------------------------------------------- LoRA


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


def _is_targeted(cfg: dict[str, Any], target: list[str] | str, key: str) -> bool:
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


def _parse_target_modules(cfg: dict[str, Any], base: BaseModelInfo) -> list[str] | str:
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


def _parse_lora(cfg: dict[str, Any], base: BaseModelInfo, max_rank: int, base_name: str | None) -> LoraSpec:
    if _bool(cfg, "use_dora"):
        raise AdapterError("use_dora true is not supported (DoRA); allowed: false", field="use_dora", status=422)
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise AdapterError(f"bias {bias!r} is not supported; allowed: 'none'", field="bias", status=422)
    for key in ("lora_bias", "fan_in_fan_out", "use_qalora"):
        if _bool(cfg, key):
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

    r = _int(cfg, "r", default=8)
    lora_alpha = _number(cfg.get("lora_alpha", 8), "lora_alpha")
    use_rslora = _bool(cfg, "use_rslora")
    rank_pattern = _parse_pattern(cfg, "rank_pattern", _check_rank_value)
    alpha_pattern = _parse_pattern(cfg, "alpha_pattern", _number)
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
    target = _parse_target_modules(cfg, base)

    modules: dict[tuple[int, str], LoraModuleSpec] = {}
    for layer in range(base.num_layers):
        for short in LORA_MODULES:
            key = f"model.layers.{layer}.{base.module_parent(short)}.{short}"
            if not _is_targeted(cfg, target, key):
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
        modules=modules, base_model_name_or_path=base_name,
    )


# ---------------------------------------------------------------------------------------------- prompts


def _parse_prefix(cfg: dict[str, Any], base: BaseModelInfo, base_name: str | None) -> PrefixSpec:
    _check_submodules(cfg)
    p = _int(cfg, "num_virtual_tokens")
    kv, hd = base.num_key_value_heads, base.head_dim
    _match_same(cfg, "num_layers", base.num_layers, "its layer count")
    _match_same(cfg, "num_attention_heads", kv,
                f"PEFT sets it to the base's num_key_value_heads={kv} for prefix tuning")
    _match_same(cfg, "token_dim", kv * hd, f"num_key_value_heads {kv} x head_dim {hd}")
    return PrefixSpec(
        num_virtual_tokens=p, num_layers=base.num_layers, num_kv_heads=kv, head_dim=hd, token_dim=kv * hd,
        prefix_projection=_bool(cfg, "prefix_projection"), base_model_name_or_path=base_name,
    )


def _parse_prompt(cfg: dict[str, Any], base: BaseModelInfo, base_name: str | None) -> PromptSpec:
    _check_submodules(cfg)
    p = _int(cfg, "num_virtual_tokens")
    _match_same(cfg, "token_dim", base.hidden_size, "its hidden_size")
    _match_same(cfg, "num_layers", base.num_layers, "its layer count", optional=True)
    _match_same(cfg, "num_attention_heads", base.num_attention_heads, "its attention heads", optional=True)
    init = cfg.get("prompt_tuning_init")
    reparam = cfg.get("encoder_reparameterization_type")
    return PromptSpec(
        peft_type=cfg["peft_type"], num_virtual_tokens=p, token_dim=base.hidden_size,
        prompt_tuning_init=init if isinstance(init, str) else None,
        encoder_reparameterization_type=reparam if isinstance(reparam, str) else None,
        base_model_name_or_path=base_name,
    )
