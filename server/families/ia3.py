"""IA3 (peft_type IA3): learned vectors that rescale projections' activations, one vector per module.

peft 0.21 (`tuners/ia3/layer.py` Linear.forward): a targeted module that is *not* a feed-forward module
scales its output, bias included: `y = (x W^T + b) * l` with `ia3_l` [out, 1]; a feed-forward module
scales its input: `y = (x * l) W^T + b` with `ia3_l` [1, in]. Target matching is peft's
`check_target_module_exists` (as for LoRA); feed-forward matching is `IA3Model._check_target_module_feedforward`:
a regex string must fullmatch the module's name, a list entry need only be a suffix of it (no dot needed).
With `target_modules`/`feedforward_modules` null, peft's defaults for the model type apply.
peft saves `base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.ia3_l`.

Mixed batch: each row of an IA3 slot is multiplied by its slot's vector (`kernels.row_scale`): outputs in
`project_output` (q/k/v on the fused projection's column slices, o/gate/up/down on theirs), inputs in
`project_input` (o_proj, gate_proj, up_proj, down_proj: the ones whose input is not shared).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from adapters_store.errors import AdapterError
from kernels.row_scale import row_scale
from server.families.base import (
    Adapter,
    AdapterFamily,
    AdapterSpec,
    DeviceContext,
    DeviceForm,
    Family,
    base_name_of,
    bool_field,
)
from server.families.lora import ALL_LINEAR, is_targeted, parse_target_modules
from server.model.batch import StepBatch
from server.model.shapes import LORA_MODULES, BaseModelInfo

# peft's TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING for the served model types
DEFAULT_TARGETS = {"llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
                   "qwen2": ["q_proj", "v_proj", "down_proj"]}
DEFAULT_FEEDFORWARD = {"llama": ["down_proj"], "mistral": ["down_proj"], "qwen2": ["down_proj"]}
_FUSED_INPUT = ("q_proj", "k_proj", "v_proj")  # their input is the shared fused-qkv input
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.ia3_l$")


@dataclass(frozen=True)
class IA3Spec(AdapterSpec):
    target_modules: tuple[str, ...] | str
    feedforward_modules: tuple[str, ...] | str
    modules: dict[tuple[int, str], bool]  # (layer, short name) -> feed-forward (scales the input)

    @property
    def module_names(self) -> list[str]:
        present = {name for _, name in self.modules}
        return [m for m in LORA_MODULES if m in present]


@dataclass(frozen=True, eq=False)
class IA3Adapter(Adapter):
    vectors: dict[tuple[int, str], torch.Tensor]  # [in] for feed-forward modules, else [out]


class IA3(AdapterFamily):
    name = Family.IA3
    peft_types = ("IA3",)

    def parse(self, cfg: dict[str, Any], base: BaseModelInfo, *, max_rank: int) -> IA3Spec:
        return parse_ia3(cfg, base)

    def load(self, spec: AdapterSpec, tensors: dict[str, torch.Tensor], base: BaseModelInfo) -> IA3Adapter:
        assert isinstance(spec, IA3Spec)
        return IA3Adapter(family=self, spec=spec, vectors=ia3_vectors(spec, tensors, base))

    def device_form(self, ctx: DeviceContext) -> IA3Slots:
        return IA3Slots(ctx)


def _is_feedforward(ff: list[str] | str, key: str) -> bool:
    if isinstance(ff, str):
        return re.fullmatch(ff, key) is not None
    return any(key.endswith(t) for t in ff)


def parse_ia3(cfg: dict[str, Any], base: BaseModelInfo) -> IA3Spec:
    """Validate an IA3 config against `base`; resolve which modules it scales and on which side."""
    if bool_field(cfg, "fan_in_fan_out"):
        raise AdapterError("fan_in_fan_out true is not supported (Conv1D models); allowed: false",
                           field="fan_in_fan_out", status=422)
    for key in ("layers_to_transform", "layers_pattern"):
        if cfg.get(key) not in (None, [], ""):
            raise AdapterError(f"{key} {cfg[key]!r} is not an IA3 option (peft's IA3Config has none); allowed: null",
                               field=key, status=422)
    cfg = dict(cfg)
    for key, defaults in (("target_modules", DEFAULT_TARGETS), ("feedforward_modules", DEFAULT_FEEDFORWARD)):
        if cfg.get(key) is None:
            if base.model_type not in defaults:
                raise AdapterError(f"{key} is null and peft has no default for model type {base.model_type!r}; "
                                   "list the modules", field=key, status=422)
            cfg[key] = list(defaults[base.model_type])
    target = parse_target_modules(cfg, base)
    ff = cfg["feedforward_modules"]
    if ff == ALL_LINEAR:
        ff = list(LORA_MODULES)
    if isinstance(ff, str):
        try:
            re.compile(ff)
        except re.error as e:
            raise AdapterError(f"feedforward_modules {ff!r} is not a valid regular expression: {e}",
                               field="feedforward_modules") from None
    elif not (isinstance(ff, list) and all(isinstance(t, str) for t in ff)):
        raise AdapterError(f"feedforward_modules {ff!r} is invalid: must be a list of module names or one regex",
                           field="feedforward_modules")
    if isinstance(ff, list) and isinstance(target, list) and not set(ff) <= set(target):
        extra = sorted(set(ff) - set(target))
        raise AdapterError(f"feedforward_modules entry {extra[0]!r} is not in target_modules (peft requires a "
                           "subset)", field="feedforward_modules", status=422)
    modules: dict[tuple[int, str], bool] = {}
    for layer in range(base.num_layers):
        for short in LORA_MODULES:
            key = f"model.layers.{layer}.{base.module_parent(short)}.{short}"
            if is_targeted(cfg, target, key):
                modules[(layer, short)] = _is_feedforward(ff, key)
    if not modules:
        raise AdapterError(f"target_modules {cfg.get('target_modules')!r} selects no module of the base model",
                           field="target_modules", status=422)
    fused_ff = sorted({short for (_, short), is_ff in modules.items() if is_ff and short in _FUSED_INPUT})
    if fused_ff:
        raise AdapterError(
            f"feedforward_modules makes {fused_ff[0]} scale its input; q/k/v share one fused input here, so only "
            "o_proj, gate_proj, up_proj and down_proj may be feed-forward modules",
            field="feedforward_modules", status=422,
        )
    return IA3Spec(
        peft_type="IA3", base_model_name_or_path=base_name_of(cfg),
        target_modules=target if isinstance(target, str) else tuple(target),
        feedforward_modules=ff if isinstance(ff, str) else tuple(ff), modules=modules,
    )


def ia3_vectors(spec: IA3Spec, tensors: dict[str, torch.Tensor], base: BaseModelInfo
                ) -> dict[tuple[int, str], torch.Tensor]:
    """Match peft's `ia3_l` tensors to the spec's modules, checking every shape; returns flat vectors."""
    found: dict[tuple[int, str], torch.Tensor] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"unexpected tensor {key!r}: an IA3 adapter may hold only "
                               "base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.ia3_l", field=key,
                               status=422)
        layer, parent, short = int(m.group(1)), m.group(2), m.group(3)
        if (layer, short) not in spec.modules or base.module_parent(short) != parent:
            raise AdapterError(f"tensor {key!r} is for a module that target_modules does not select", field=key,
                               status=422)
        found[(layer, short)] = t
    out: dict[tuple[int, str], torch.Tensor] = {}
    for (layer, short), is_ff in spec.modules.items():
        key = f"base_model.model.model.layers.{layer}.{base.module_parent(short)}.{short}.ia3_l"
        if (layer, short) not in found:
            raise AdapterError(f"tensor {key!r} is missing (the config targets this module)", field=key)
        in_f, out_f = base.module_shape(short)
        want = (1, in_f) if is_ff else (out_f, 1)
        t = found[(layer, short)]
        if tuple(t.shape) != want:
            side = f"feed-forward: scales its {in_f} inputs" if is_ff else f"scales its {out_f} outputs"
            raise AdapterError(f"tensor {key!r} has shape {list(t.shape)}, expected {list(want)} ({short} {side})",
                               field=key, status=422)
        out[(layer, short)] = t.reshape(-1).contiguous()
    return out


class IA3Slots(DeviceForm):
    """Per (layer, module, side) a table [S + 1, n] of vectors (ones where a slot has none; row S, the identity,
    serves base rows: see `kernels.row_scale`), host flags and a bit mask of the slots it serves."""

    def __init__(self, ctx: DeviceContext) -> None:
        self.info = ctx.shapes
        self.max_adapters = ctx.max_adapters
        self.dtype, self.device = ctx.dtype, ctx.device
        self.tables: dict[tuple[int, str, bool], torch.Tensor] = {}  # (layer, name, input side) -> [S + 1, n]
        self.on: dict[tuple[int, str, bool], list[bool]] = {}
        self.bits: dict[tuple[int, str, bool], int] = {}  # bit s: slot s has a vector here

    def load(self, slot: int, adapter: Adapter, kv_slots: list[int]) -> None:
        assert isinstance(adapter, IA3Adapter)
        spec = adapter.spec
        assert isinstance(spec, IA3Spec)
        self.clear(slot)
        for (layer, name), vec in adapter.vectors.items():
            key = (layer, name, spec.modules[(layer, name)])
            if key not in self.tables:
                self.tables[key] = torch.ones(self.max_adapters + 1, vec.numel(), dtype=self.dtype,
                                              device=self.device)
                self.on[key] = [False] * self.max_adapters
                self.bits[key] = 0
            self.tables[key][slot].copy_(vec)
            self.on[key][slot] = True
            self.bits[key] |= 1 << slot

    def clear(self, slot: int) -> None:
        for key, on in self.on.items():
            if on[slot]:
                self.tables[key][slot].fill_(1.0)
                on[slot] = False
                self.bits[key] &= ~(1 << slot)

    def _active(self, key: tuple[int, str, bool], batch: StepBatch) -> bool:
        meta = batch.segments
        return meta is not None and bool(self.bits.get(key, 0) & meta.slot_mask)

    def project_input(self, layer: int, name: str, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        key = (layer, name, True)
        if not self._active(key, batch):
            return x
        return row_scale(x, self.tables[key], None, self.on[key], batch.segments, inplace=False)  # x is shared

    def project_output(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor, batch: StepBatch) -> None:
        key = (layer, name, False)
        if self._active(key, batch):
            row_scale(y, self.tables[key], None, self.on[key], batch.segments)
