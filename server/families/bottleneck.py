"""Bottleneck adapters in AdapterHub's format: SeqBn (Pfeiffer), DoubleSeqBn (Houlsby) and ParBn (parallel).

What `model.save_adapter(dir, name, use_safetensors=True)` writes with `adapters` 1.x:
- `adapter_config.json`: `{"config": {...BnConfig fields...}, "name", "model_class", "model_type",
  "hidden_size", "version"}` (no `peft_type`: the family is recognised by its `config` object);
- `adapter.safetensors`: `model.layers.{i}.{attention_adapters|output_adapters}.adapters.{name}.`
  `adapter_down.0.{weight [m, d], bias [m]}` and `adapter_up.{weight [d, m], bias [d]}`;
- with it may come `head_config.json` + `model_head.safetensors` (the base's own LM head when the
  adapter was trained on a plain *ForCausalLM model: ignored; any other head is refused), and, for
  models that `adapters` wires through its plugin interface (Qwen2), `adapter_interface.json`.

Placement, read from `adapters` 1.3 (`methods/bottleneck.py`, `methods/modeling.py`, the Llama and
Mistral model classes, and the Qwen2 plugin interface whose hooks sit on `o_proj` / `mlp.down_proj`).
With `a` the attention (o_proj) or MLP (down_proj) output and `h` the residual stream entering the
block, the block's new residual stream is `h + out` where

    sequential (is_parallel false):  x   = a + h if original_ln_before else a
                                     out = scaling * up(act(down(x))) + (a if residual_before_ln else x)
    parallel   (is_parallel true):   out = scaling * up(act(down(h))) + a

(`original_ln_after` true: the library adds `h` back after the adapter; the three presets all set it.)
`mh_adapter` places an adapter at the attention block, `output_adapter` at the MLP block, every layer
but those in `leave_out`; a layer's width is `int(hidden_size // reduction_factor)` (at least 1), where
`reduction_factor` may map layer ids to factors with a `"default"`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from adapters_store.errors import AdapterError
from kernels.bottleneck import bottleneck_apply
from kernels.bottleneck_ref import ACTIVATIONS, activate
from server.families.base import Adapter, AdapterFamily, AdapterSpec, DeviceContext, DeviceForm, Family
from server.model.batch import StepBatch
from server.model.shapes import BaseModelInfo

PEFT_TYPE = "BOTTLENECK"  # how listings name the family; AdapterHub configs carry no peft_type
WEIGHTS_NAME = "adapter.safetensors"
PICKLED_WEIGHTS_NAME = "pytorch_adapter.bin"
HEAD_CONFIG_NAME = "head_config.json"
HEAD_WEIGHTS_NAME = "model_head.safetensors"
INTERFACE_NAME = "adapter_interface.json"
BLOCKS = ("attn", "mlp")  # mh_adapter sits after attention, output_adapter after the MLP
_LOCATION_KEYS = {"attn": "attention_adapters", "mlp": "output_adapters"}

# non_linearity (lower-cased, as `adapters` does) -> kernels.bottleneck_ref.ACTIVATIONS code. `adapters`
# maps "leakyrelu" itself and every other name through transformers' ACT2FN.
NON_LINEARITIES = {
    "relu": ACTIVATIONS["relu"],
    "swish": ACTIVATIONS["silu"],
    "silu": ACTIVATIONS["silu"],
    "gelu": ACTIVATIONS["gelu"],
    "gelu_python": ACTIVATIONS["gelu"],
    "gelu_new": ACTIVATIONS["gelu_new"],
    "gelu_pytorch_tanh": ACTIVATIONS["gelu_new"],
    "tanh": ACTIVATIONS["tanh"],
    "sigmoid": ACTIVATIONS["sigmoid"],
    "leakyrelu": ACTIVATIONS["leakyrelu"],
    "leaky_relu": ACTIVATIONS["leakyrelu"],
    "linear": ACTIVATIONS["identity"],
}

# BnConfig fields that only matter for training or initialisation: any value is accepted.
_TRAINING_ONLY = ("init_weights", "init_weights_seed", "dropout", "stochastic_depth", "adapter_residual_before_ln")
# phm_* settings mean nothing while phm_layer is false (save_adapter writes their defaults every time).
_PHM_FIELDS = ("phm_dim", "factorized_phm_W", "shared_W_phm", "shared_phm_rule", "factorized_phm_rule", "phm_c_init",
               "phm_init_range", "learn_phm", "hypercomplex_nonlinearity", "phm_rank", "phm_bias")
# Options whose non-default values change the computation in ways not served here: field -> allowed value.
_MUST_BE = {
    "phm_layer": (False, "phm/Compacter layers are not supported"),
    "use_gating": (False, "gated adapters (UniPELT) are not supported"),
    "ln_before": (False, "a learned layer norm inside the adapter is not supported"),
    "ln_after": (False, "a learned layer norm inside the adapter is not supported"),
    "inv_adapter": (None, "invertible adapters are not supported"),
    "inv_adapter_reduction_factor": (None, "invertible adapters are not supported"),
    "invertible_adapter": (None, "invertible adapters are not supported"),
    "cross_adapter": (False, "cross-attention adapters need an encoder-decoder model"),
    "original_ln_after": (True, "the Llama/Mistral/Qwen2 integrations of `adapters` add the block's residual "
                                "after the adapter (Qwen2's refuses false)"),
}
_KNOWN = {"mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "original_ln_before", "is_parallel",
          "scaling", "residual_before_ln", "leave_out", "architecture",
          *_TRAINING_ONLY, *_PHM_FIELDS, *_MUST_BE}
# What `adapters` 1.x saves for Qwen2 (`wrappers/interfaces.py`): the hook points the placement above assumes.
_QWEN2_INTERFACE = {
    "model_layers": "layers", "layer_self_attn": "self_attn", "attn_o_proj": "o_proj",
    "layer_output_proj": "mlp.down_proj", "layer_pre_self_attn": "input_layernorm",
    "layer_pre_ffn": "post_attention_layernorm", "layer_ln_1": None, "layer_ln_2": None, "layer_cross_attn": None,
}
_KEY = re.compile(r"^model\.layers\.(\d+)\.(attention_adapters|output_adapters)\.adapters\.(.+)\."
                  r"(adapter_down\.0\.weight|adapter_down\.0\.bias|adapter_up\.weight|adapter_up\.bias)$")


@dataclass(frozen=True)
class BottleneckSpec:
    """A validated AdapterHub bottleneck config, resolved against the base model."""

    name: str  # the adapter's name inside the library: part of every tensor key
    is_parallel: bool
    original_ln_before: bool
    residual_before_ln: bool
    scaling: float
    non_linearity: str
    activation: int  # kernels.bottleneck_ref.ACTIVATIONS code
    reduction_factor: float | dict[str, float]
    leave_out: tuple[int, ...]
    modules: dict[tuple[int, str], int]  # (layer, "attn" | "mlp") -> bottleneck width
    model_type: str | None = None
    peft_type: str = PEFT_TYPE
    base_model_name_or_path: str | None = None

    @property
    def preset(self) -> str:
        """The `adapters` config class these settings correspond to (what a listing shows), or "custom"."""
        blocks = {b for _, b in self.modules}
        if self.is_parallel:
            return "ParBn"
        if blocks == {"attn", "mlp"} and not self.original_ln_before:
            return "DoubleSeqBn"
        if blocks == {"mlp"} and self.original_ln_before:
            return "SeqBn"
        return "custom"

    @property
    def rank(self) -> int:
        """Widest bottleneck (what a slot must hold)."""
        return max(self.modules.values())

    @property
    def module_names(self) -> list[str]:
        blocks = {b for _, b in self.modules}
        return [b for b in BLOCKS if b in blocks]


@dataclass(frozen=True)
class BottleneckWeights:
    """One adapter module (one layer, one block), fp32 on CPU."""

    w_down: torch.Tensor  # [m, d]
    b_down: torch.Tensor  # [m]
    w_up: torch.Tensor  # [d, m]
    b_up: torch.Tensor  # [d]


def is_adapterhub_config(cfg: dict[str, Any]) -> bool:
    """Whether an adapter_config.json was written by AdapterHub's `save_adapter` (not by peft)."""
    return "peft_type" not in cfg and "config" in cfg and ("version" in cfg or "model_class" in cfg or "name" in cfg)


def refuse_adapterhub_pickles(names: list[str]) -> None:
    """AdapterHub's default save is pickled (`pytorch_adapter.bin`): say how to re-save it as safetensors."""
    for name in names:
        if name in (PICKLED_WEIGHTS_NAME, "pytorch_model_head.bin"):
            raise AdapterError(
                f"file {name!r} is a pickled checkpoint, which can run code when loaded; re-save the adapter with "
                f"model.save_adapter(dir, name, use_safetensors=True) to get {WEIGHTS_NAME}",
                field="files", status=422,
            )


def _bad(key: str, value: Any, why: str, status: int = 422) -> AdapterError:
    return AdapterError(f"config.{key} {value!r} is not supported: {why}", field=f"config.{key}", status=status)


def _flag(c: dict[str, Any], key: str, default: bool) -> bool:
    value = c.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise AdapterError(f"config.{key} {value!r} is invalid: must be true or false", field=f"config.{key}")
    return value


def _factor(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise AdapterError(f"{key} {value!r} is invalid: must be a number > 0", field=key)
    return float(value)


def parse_bottleneck(cfg: dict[str, Any], *, hidden_size: int, num_layers: int, max_width: int) -> BottleneckSpec:
    """Validate an AdapterHub adapter_config.json against the base's hidden size and layer count."""
    c = cfg.get("config")
    if isinstance(c, str):
        raise AdapterError(
            f"config {c!r} names a preset; upload the adapter_config.json that save_adapter writes (its config "
            "object holds every setting)", field="config",
        )
    if not isinstance(c, dict):
        raise AdapterError(f"config {c!r} is invalid: must be the object save_adapter writes", field="config")
    arch = c.get("architecture", "bottleneck")
    if arch not in (None, "bottleneck"):
        raise _bad("architecture", arch, "only bottleneck adapters are served in AdapterHub's format (union, "
                   "prefix_tuning, lora, ... configs: save them with peft instead)")
    for key in ("configs", "fusion_method", "adapter_fusion"):
        if key in c or key in cfg:
            raise _bad(key, c.get(key, cfg.get(key)), "adapter compositions (fusion, stacking, unions) are not served")
    unknown = sorted(set(c) - _KNOWN)
    if unknown:
        raise _bad(unknown[0], c[unknown[0]], "unknown bottleneck option")
    for key, (allowed, why) in _MUST_BE.items():
        if key in c and c[key] != allowed and not (allowed is None and c[key] in (None, {})):
            raise _bad(key, c[key], f"{why}; allowed: {str(allowed).lower() if allowed is not None else 'null'}")
    hs = cfg.get("hidden_size")
    if hs is not None and hs != hidden_size:
        raise AdapterError(f"hidden_size {hs!r} does not match the base model's hidden_size {hidden_size}",
                           field="hidden_size", status=422)
    name = cfg.get("name")
    if not isinstance(name, str) or not name:
        raise AdapterError(f"name {name!r} is invalid: must be the adapter's name (a string), as save_adapter "
                           "writes it", field="name")

    is_parallel = _flag(c, "is_parallel", False)
    original_ln_before = _flag(c, "original_ln_before", False)
    residual = c.get("residual_before_ln", True)
    if residual == "post_add":
        raise _bad("residual_before_ln", residual, "'post_add' needs a layer norm between the blocks, which "
                   "Llama-family models do not have (the library has no residual to use then); allowed: true, false")
    if not isinstance(residual, bool):
        raise AdapterError(f"config.residual_before_ln {residual!r} is invalid: must be true or false",
                           field="config.residual_before_ln")
    scaling = c.get("scaling", 1.0)
    if isinstance(scaling, str):
        raise _bad("scaling", scaling, "learned scalings are not supported; allowed: a number")
    scaling = _number(scaling, "config.scaling")
    act_name = c.get("non_linearity")
    if not isinstance(act_name, str) or act_name.lower() not in NON_LINEARITIES:
        raise AdapterError(
            f"config.non_linearity {act_name!r} is not supported; supported: {', '.join(NON_LINEARITIES)}",
            field="config.non_linearity", status=422,
        )
    leave_out = c.get("leave_out") or []
    if not isinstance(leave_out, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in leave_out):
        raise AdapterError(f"config.leave_out {leave_out!r} is invalid: must be a list of layer ids",
                           field="config.leave_out")
    rf = c.get("reduction_factor")
    if isinstance(rf, dict):
        for k, v in rf.items():
            if k != "default" and not (isinstance(k, str) and k.isdigit()):
                raise AdapterError(f"config.reduction_factor key {k!r} is invalid: must be a layer id or 'default'",
                                   field="config.reduction_factor")
            _factor(v, f"config.reduction_factor[{k!r}]")
    else:
        _factor(rf, "config.reduction_factor")
    places = {"attn": _flag(c, "mh_adapter", False), "mlp": _flag(c, "output_adapter", False)}

    modules: dict[tuple[int, str], int] = {}
    for layer in range(num_layers):
        if layer in leave_out:
            continue
        if isinstance(rf, dict):
            if str(layer) in rf:
                factor = rf[str(layer)]
            elif "default" in rf:
                factor = rf["default"]
            else:
                raise AdapterError(f"config.reduction_factor {rf!r} has no entry for layer {layer} and no 'default'",
                                   field="config.reduction_factor", status=422)
        else:
            factor = rf
        width = max(1, int(hidden_size // factor))
        if width > max_width:
            raise AdapterError(
                f"bottleneck width {width} (hidden_size {hidden_size} // reduction_factor {factor}) exceeds the "
                f"limit of {max_width}", field="config.reduction_factor", status=422,
            )
        for block, on in places.items():
            if on:
                modules[(layer, block)] = width
    if not modules:
        raise AdapterError(
            f"config.mh_adapter {places['attn']}, config.output_adapter {places['mlp']} and config.leave_out "
            f"{leave_out} place no adapter in any of the base's {num_layers} layers",
            field="config.output_adapter", status=422,
        )
    model_type = cfg.get("model_type")
    return BottleneckSpec(
        name=name, is_parallel=is_parallel, original_ln_before=original_ln_before, residual_before_ln=residual,
        scaling=scaling, non_linearity=act_name.lower(), activation=NON_LINEARITIES[act_name.lower()],
        reduction_factor=dict(rf) if isinstance(rf, dict) else float(rf), leave_out=tuple(leave_out),
        modules=modules, model_type=model_type if isinstance(model_type, str) else None,
        base_model_name_or_path=cfg.get("model_name") if isinstance(cfg.get("model_name"), str) else None,
    )


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdapterError(f"{key} {value!r} is invalid: must be a finite number", field=key)
    return float(value)


def check_head(head_cfg: dict[str, Any] | None, has_head_weights: bool) -> None:
    """A saved head may come along only if it is the base's own LM head (then it is ignored)."""
    if head_cfg is None:
        if has_head_weights:
            raise AdapterError(f"{HEAD_WEIGHTS_NAME} came without {HEAD_CONFIG_NAME}: cannot tell which head it is",
                               field=HEAD_CONFIG_NAME, status=422)
        return
    if not isinstance(head_cfg, dict):
        raise AdapterError(f"{HEAD_CONFIG_NAME} must hold a JSON object", field=HEAD_CONFIG_NAME)
    own = head_cfg.get("config")
    model_class = head_cfg.get("model_class")
    if own is not None:
        kind = own.get("head_type") if isinstance(own, dict) else own
        raise AdapterError(
            f"{HEAD_CONFIG_NAME} config {kind!r} is a prediction head of its own; only the base model's LM head "
            "is served (save the adapter with with_head=False, or from a *ForCausalLM model)",
            field=f"{HEAD_CONFIG_NAME}.config", status=422,
        )
    if not (isinstance(model_class, str) and model_class.endswith("ForCausalLM")):
        raise AdapterError(
            f"{HEAD_CONFIG_NAME} model_class {model_class!r} is not a causal LM: its head cannot be the base's "
            "LM head", field=f"{HEAD_CONFIG_NAME}.model_class", status=422,
        )


def check_interface(iface_cfg: dict[str, Any] | None) -> None:
    """`adapter_interface.json` (Qwen2 in `adapters`): its hook points must be the ones served here."""
    if iface_cfg is None:
        return
    iface = iface_cfg.get("interface") if isinstance(iface_cfg, dict) else None
    if not isinstance(iface, dict):
        raise AdapterError(f"{INTERFACE_NAME} must hold an 'interface' object", field=INTERFACE_NAME)
    for key, want in _QWEN2_INTERFACE.items():
        if key in iface and iface[key] != want:
            raise AdapterError(
                f"{INTERFACE_NAME} interface.{key} {iface[key]!r} places adapters where this server does not; "
                f"allowed: {want!r}", field=f"{INTERFACE_NAME}.interface.{key}", status=422,
            )


def bottleneck_weights(spec: BottleneckSpec, tensors: dict[str, torch.Tensor], hidden_size: int
                       ) -> dict[tuple[int, str], BottleneckWeights]:
    """Match `adapter.safetensors` to the spec's modules, checking every name and shape."""
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    blocks = {v: k for k, v in _LOCATION_KEYS.items()}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None or m.group(3) != spec.name:
            raise AdapterError(
                f"unexpected tensor {key!r}: a bottleneck adapter named {spec.name!r} holds only "
                f"model.layers.<i>.<attention_adapters|output_adapters>.adapters.{spec.name}."
                "<adapter_down.0|adapter_up>.<weight|bias>", field=key, status=422,
            )
        where = (int(m.group(1)), blocks[m.group(2)])
        if where not in spec.modules:
            raise AdapterError(
                f"tensor {key!r} is for a layer/block that mh_adapter/output_adapter/leave_out do not select",
                field=key, status=422,
            )
        found.setdefault(where, {})[m.group(4)] = t
    out: dict[tuple[int, str], BottleneckWeights] = {}
    d = hidden_size
    for (layer, block), width in spec.modules.items():
        prefix = f"model.layers.{layer}.{_LOCATION_KEYS[block]}.adapters.{spec.name}."
        have = found.get((layer, block), {})
        shapes = {"adapter_down.0.weight": (width, d), "adapter_down.0.bias": (width,),
                  "adapter_up.weight": (d, width), "adapter_up.bias": (d,)}
        for part, shape in shapes.items():
            key = prefix + part
            if part not in have:
                raise AdapterError(f"tensor {key!r} is missing (the config places an adapter there)", field=key)
            if tuple(have[part].shape) != shape:
                raise AdapterError(
                    f"tensor {key!r} has shape {list(have[part].shape)}, expected {list(shape)} "
                    f"(bottleneck width {width}, hidden_size {d})", field=key, status=422,
                )
        out[(layer, block)] = BottleneckWeights(
            w_down=have["adapter_down.0.weight"].contiguous(), b_down=have["adapter_down.0.bias"].contiguous(),
            w_up=have["adapter_up.weight"].contiguous(), b_up=have["adapter_up.bias"].contiguous(),
        )
    return out


def block_output_ref(spec: BottleneckSpec, w: BottleneckWeights, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """One adapter module on rows of one slot: the block output `out` (new residual stream = h + out).

    h: [n, d] residual stream entering the block; a: [n, d] the block's own output (o_proj / down_proj).
    """
    if spec.is_parallel:
        x, resid = h, a
    else:
        x = a + h if spec.original_ln_before else a
        resid = a if spec.residual_before_ln else x
    bn = torch.nn.functional.linear(activate(torch.nn.functional.linear(x, w.w_down, w.b_down), spec.activation),
                                    w.w_up, w.b_up)
    return bn * spec.scaling + resid


# ---------------------------------------------------------------------------------------------- family


@dataclass(frozen=True)
class BottleneckAdapterSpec(AdapterSpec):
    """The family interface's spec: the AdapterHub settings plus the resolved modules."""

    bn: BottleneckSpec

    @property
    def rank(self) -> int:
        return self.bn.rank

    @property
    def module_names(self) -> list[str]:
        return self.bn.module_names


@dataclass(frozen=True, eq=False)
class BottleneckAdapter(Adapter):
    modules: dict[tuple[int, str], BottleneckWeights]


class Bottleneck(AdapterFamily):
    name = Family.BOTTLENECK
    peft_types = (PEFT_TYPE,)  # AdapterHub configs are recognised by is_adapterhub_config
    weights_name = WEIGHTS_NAME
    optional_files = (HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME, INTERFACE_NAME)

    def parse(self, cfg: dict[str, Any], base: BaseModelInfo, *, max_rank: int) -> BottleneckAdapterSpec:
        bn = parse_bottleneck(cfg, hidden_size=base.hidden_size, num_layers=base.num_layers,
                              max_width=max(4 * base.hidden_size, max_rank))
        return BottleneckAdapterSpec(peft_type=PEFT_TYPE, base_model_name_or_path=bn.base_model_name_or_path, bn=bn)

    def check_files(self, files: dict[str, bytes]) -> None:
        """The optional files that may come with an adapter: a head (the base's own) and Qwen2's interface."""
        head = _json(files, HEAD_CONFIG_NAME)
        check_head(head, HEAD_WEIGHTS_NAME in files)
        check_interface(_json(files, INTERFACE_NAME))

    def load(self, spec: AdapterSpec, tensors: dict[str, torch.Tensor], base: BaseModelInfo) -> BottleneckAdapter:
        assert isinstance(spec, BottleneckAdapterSpec)
        return BottleneckAdapter(family=self, spec=spec, modules=bottleneck_weights(spec.bn, tensors, base.hidden_size))

    def device_form(self, ctx: DeviceContext) -> BottleneckSlots:
        return BottleneckSlots(ctx)


def _json(files: dict[str, bytes], name: str) -> Any:
    raw = files.get(name)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{name} is not valid JSON: {e}", field=name) from None


# How a slot's rows feed the kernel: the adapter's input and the residual it adds (see the module docstring).
_IN_A, _IN_A_PLUS_H, _IN_H = 0, 1, 2


class BottleneckSlots(DeviceForm):
    """Per (layer, block): stacked down/up weights and biases [S, ...] with each slot's own width (widths grow
    the pool when a wider adapter arrives), activation code and scaling; per slot its input/residual kind."""

    def __init__(self, ctx: DeviceContext) -> None:
        self.d = ctx.shapes.hidden_size
        self.max_adapters = ctx.max_adapters
        self.dtype, self.device = ctx.dtype, ctx.device
        s = ctx.max_adapters
        self.pools: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self.widths: dict[tuple[int, str], torch.Tensor] = {}  # host int32 [S]
        self.acts = torch.zeros(s, dtype=torch.int32, device=ctx.device)
        self.scales = torch.zeros(s, dtype=torch.float32, device=ctx.device)
        self.input_kind = [_IN_A] * s
        self.resid_kind = [_IN_A] * s  # _IN_A: residual a; _IN_A_PLUS_H: residual a + h
        self.mine = [False] * s

    def _pool(self, key: tuple[int, str], width: int) -> dict[str, torch.Tensor]:
        pool = self.pools.get(key)
        have = pool["w_down"].shape[1] if pool is not None else 0
        if width <= have:
            return pool  # type: ignore[return-value]
        m = -(-width // 16) * 16  # grow to a multiple of 16, keeping what the other slots hold
        s, d, kw = self.max_adapters, self.d, dict(dtype=self.dtype, device=self.device)
        new = {"w_down": torch.zeros(s, m, d, **kw), "b_down": torch.zeros(s, m, **kw),
               "w_up": torch.zeros(s, d, m, **kw), "b_up": torch.zeros(s, d, **kw)}
        if pool is not None:
            new["w_down"][:, :have] = pool["w_down"]
            new["b_down"][:, :have] = pool["b_down"]
            new["w_up"][:, :, :have] = pool["w_up"]
            new["b_up"].copy_(pool["b_up"])
        else:
            self.widths[key] = torch.zeros(s, dtype=torch.int32)
        self.pools[key] = new
        return new

    def load(self, slot: int, adapter: Adapter, kv_slots: list[int]) -> None:
        assert isinstance(adapter, BottleneckAdapter)
        bn = adapter.spec.bn  # type: ignore[attr-defined]
        self.clear(slot)
        for key, w in adapter.modules.items():
            m = bn.modules[key]
            pool = self._pool(key, m)
            pool["w_down"][slot, :m].copy_(w.w_down)
            pool["b_down"][slot, :m].copy_(w.b_down)
            pool["w_up"][slot, :, :m].copy_(w.w_up)
            pool["b_up"][slot].copy_(w.b_up)
            self.widths[key][slot] = m
        self.acts[slot] = bn.activation
        self.scales[slot] = bn.scaling
        if bn.is_parallel:
            self.input_kind[slot], self.resid_kind[slot] = _IN_H, _IN_A
        else:
            self.input_kind[slot] = _IN_A_PLUS_H if bn.original_ln_before else _IN_A
            self.resid_kind[slot] = _IN_A if bn.residual_before_ln else self.input_kind[slot]
        self.mine[slot] = True

    def clear(self, slot: int) -> None:
        if not self.mine[slot]:
            return
        for key, pool in self.pools.items():
            if int(self.widths[key][slot]):
                for t in pool.values():
                    t[slot].zero_()
                self.widths[key][slot] = 0
        self.mine[slot] = False

    def block_output(self, layer: int, block: str, h: torch.Tensor, out: torch.Tensor, batch: StepBatch
                     ) -> torch.Tensor:
        key = (layer, block)
        pool = self.pools.get(key)
        meta = batch.segments
        if pool is None or meta is None:
            return out
        widths = self.widths[key]
        segs = [(i, s) for i, s in enumerate(meta.slots) if self.mine[s] and int(widths[s]) and meta.lens[i]]
        if not segs:
            return out
        x_in, resid = out, out.clone()  # base rows and other families' rows pass through unchanged
        if any(self.input_kind[s] != _IN_A for _, s in segs):
            x_in = out.clone()
        for i, s in segs:
            rows = meta.rows(i)
            if self.input_kind[s] == _IN_H:
                x_in[rows] = h[rows]
            elif self.input_kind[s] == _IN_A_PLUS_H:
                x_in[rows] = out[rows] + h[rows]
            if self.resid_kind[s] == _IN_A_PLUS_H:
                resid[rows] = out[rows] + h[rows]
        return bottleneck_apply(x_in, resid, pool["w_down"], pool["b_down"], pool["w_up"], pool["b_up"], widths,
                                self.acts, self.scales, meta)
