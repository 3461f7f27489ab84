"""DoRA (LORA with `use_dora: true`): LoRA plus a learned per-output magnitude, served beside plain LoRA.

peft 0.21 (`tuners/lora/dora.py`, `DoraLinearLayer.forward` with the base result passed in):

    y = base(x) + (g - 1) * (base(x) - b) + g * s * B(A(x)),   g = m / ||W + s * B A||  (row norms, per output)

i.e. `y = g * (x W^T + s * B A x) + b`. `g` depends only on the adapter and the base weights, so it is
computed once when a slot is loaded; folded into B (`B' = g * B`), a step costs LoRA's two kernels plus one
per-token row scale of the base output (`y = y * g + b * (1 - g)`, `kernels.row_scale`), applied before the
LoRA delta is added. peft saves `...{module}.lora_magnitude_vector` [out] next to the LoRA tensors.

The listing type is "dora"; the config's peft_type stays LORA (`LoRA.parse` hands `use_dora` configs here,
and the store records the spec's peft_type DORA so that a restart finds this family again).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

import torch

from adapters_store.errors import AdapterError
from kernels.row_scale import row_scale
from server.families.base import Adapter, AdapterFamily, AdapterSpec, DeviceContext, Family
from server.families.lora import LoraAdapter, LoRASlots, LoraSpec, lora_weights, parse_lora
from server.model.batch import StepBatch
from server.model.shapes import BaseModelInfo

_MAG_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_magnitude_vector$")


@dataclass(frozen=True)
class DoraSpec(LoraSpec):
    """A LoRA spec whose modules also carry a magnitude vector."""


@dataclass(frozen=True, eq=False)
class DoraAdapter(LoraAdapter):
    magnitudes: dict[tuple[int, str], torch.Tensor]  # [out] per module


class DoRA(AdapterFamily):
    name = Family.DORA
    peft_types = ("DORA",)  # the store's record; adapter_config.json says LORA + use_dora (see LoRA.parse)

    def parse(self, cfg: dict[str, Any], base: BaseModelInfo, *, max_rank: int) -> DoraSpec:
        spec = parse_lora({**cfg, "use_dora": False}, base, max_rank)
        values = {f.name: getattr(spec, f.name) for f in fields(spec)}
        values["peft_type"] = "DORA"
        return DoraSpec(**values)

    def load(self, spec: AdapterSpec, tensors: dict[str, torch.Tensor], base: BaseModelInfo) -> DoraAdapter:
        assert isinstance(spec, DoraSpec)
        mags = {k: t for k, t in tensors.items() if k.endswith(".lora_magnitude_vector")}
        lora = lora_weights(spec, {k: t for k, t in tensors.items() if k not in mags}, base)
        magnitudes = dora_magnitudes(spec, mags, base)
        return DoraAdapter(family=self, spec=spec, modules=lora, magnitudes=magnitudes)

    def device_form(self, ctx: DeviceContext) -> DoraSlots:
        return DoraSlots(ctx)


def dora_magnitudes(spec: LoraSpec, tensors: dict[str, torch.Tensor], base: BaseModelInfo
                    ) -> dict[tuple[int, str], torch.Tensor]:
    """One `lora_magnitude_vector` [out] per targeted module, shapes checked."""
    found: dict[tuple[int, str], torch.Tensor] = {}
    for key, t in tensors.items():
        m = _MAG_KEY.match(key)
        if m is None or (int(m.group(1)), m.group(3)) not in spec.modules:
            raise AdapterError(f"tensor {key!r} is for a module that target_modules/layers_to_transform do not "
                               "select", field=key, status=422)
        found[(int(m.group(1)), m.group(3))] = t
    out: dict[tuple[int, str], torch.Tensor] = {}
    for layer, short in spec.modules:
        key = f"base_model.model.model.layers.{layer}.{base.module_parent(short)}.{short}.lora_magnitude_vector"
        if (layer, short) not in found:
            raise AdapterError(f"tensor {key!r} is missing (use_dora is true and the config targets this module)",
                               field=key)
        out_f = base.module_shape(short)[1]
        t = found[(layer, short)]
        if tuple(t.shape) != (out_f,):
            raise AdapterError(f"tensor {key!r} has shape {list(t.shape)}, expected [{out_f}] ({short} has "
                               f"{out_f} outputs)", field=key, status=422)
        if not bool((t != 0).all()):
            raise AdapterError(f"tensor {key!r} has zero entries; a DoRA magnitude must be non-zero", field=key,
                               status=422)
        out[(layer, short)] = t.contiguous()
    return out


def fold_dora(weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, scaling: float,
              magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(g [out], g * B [out, r], b * (1 - g) [out] or None), in fp32, from the base weight and the adapter."""
    w = weight.float()
    norm = torch.linalg.norm(w + scaling * (b.float() @ a.float()), dim=1)
    g = magnitude.float() / norm
    add = None if bias is None else bias.float() * (1.0 - g)
    return g, b.float() * g[:, None], add


class DoraSlots(LoRASlots):
    """LoRA slots holding g * B, plus per module a multiplier table g [S + 1, out] (and b * (1 - g) when the base
    projection has a bias) applied to the base output of DoRA rows before the LoRA delta is added. Row S of the
    tables is the identity (`kernels.row_scale`: base rows pick it); so is a slot's row while it is empty."""

    graph_capturable = False  # the row scale reads the step's host segments: DoRA decode steps run eagerly

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx.shapes, ctx.max_adapters, ctx.max_rank, ctx.dtype, ctx.device, pool=ctx.lora_pages)
        self.base_weight = ctx.base_weight
        self.base_bias = ctx.base_bias
        self.mul: dict[tuple[int, str], torch.Tensor] = {}
        self.add: dict[tuple[int, str], torch.Tensor | None] = {}
        self.on: dict[tuple[int, str], list[bool]] = {}
        self.bits: dict[tuple[int, str], int] = {}  # bit s: slot s has a magnitude here

    def load(self, slot: int, adapter: Adapter, kv_slots: list[int]) -> None:
        self.activate(slot, adapter, self.stage(adapter, self.pool.host_pages[slot]))

    def stage(self, adapter: Adapter, pages: list[int]) -> Any:
        """Fold the magnitudes (g = m / ||W + s BA||, g * B) and write A and g * B into `pages`; a loader thread
        may run this while a step runs (it only reads the base weights)."""
        assert isinstance(adapter, DoraAdapter)
        folded: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
        tables: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]] = {}
        for key, mod in adapter.modules.items():
            weight = self.base_weight(*key)
            bias = self.base_bias(*key) if self.base_bias is not None else None
            g, gb, add = fold_dora(weight, bias, mod.a.to(weight.device), mod.b.to(weight.device), mod.scaling,
                                   adapter.magnitudes[key].to(weight.device))
            folded[key] = (mod.a, gb, mod.scaling)
            tables[key] = (g, add)
        return self.stage_weights(folded, pages), tables  # checks, then writes A and g * B

    def activate(self, slot: int, adapter: Adapter, staged: Any) -> None:
        folded, tables = staged
        self.activate_weights(slot, folded)  # clears the slot, then ranks and scales
        for key, (g, add) in tables.items():
            if key not in self.mul:
                n = g.numel()
                self.mul[key] = torch.ones(self.max_adapters + 1, n, dtype=self.dtype, device=self.device)
                self.add[key] = None if add is None else torch.zeros(self.max_adapters + 1, n, dtype=self.dtype,
                                                                      device=self.device)
                self.on[key] = [False] * self.max_adapters
                self.bits[key] = 0
            self.mul[key][slot].copy_(g)
            if add is not None and self.add[key] is not None:
                self.add[key][slot].copy_(add)
            self.on[key][slot] = True
            self.bits[key] |= 1 << slot

    def clear_slot(self, slot: int) -> None:
        super().clear_slot(slot)
        for key, on in self.on.items():
            if on[slot]:
                self.mul[key][slot].fill_(1.0)
                add = self.add[key]
                if add is not None:
                    add[slot].zero_()
                on[slot] = False
                self.bits[key] &= ~(1 << slot)

    def project_output(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor, batch: StepBatch) -> None:
        key = (layer, name)
        meta = batch.segments
        if meta is None or not self.bits.get(key, 0) & meta.slot_mask:
            return
        row_scale(y, self.mul[key], self.add[key], self.on[key], meta)  # g * (x W^T) + b, before the delta
        super().project_output(layer, name, x, y, batch)
