"""What an adapter family may add to a forward step: the model's side of the family interface.

The decoder knows nothing of families. It calls the hooks below for every projection and block; a
family's device form (`server/families/base.py`) overrides the ones it needs. Rows of the step are
grouped by adapter slot (`StepBatch.segments`), so a hook works on the row ranges of its own slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from server.model.batch import StepBatch
    from server.model.shapes import BaseModelInfo


@dataclass(frozen=True)
class ChunkPart:
    """What one family adds to a sequence's chunk (see `SeqChunk` for each field's meaning)."""

    prefix_slots: list[int] | None = None
    pos_offset: int = 0
    input_embeds: torch.Tensor | None = None


class StepHooks:
    """No-op hooks; override what a family contributes. All run on the worker thread, in inference mode.

    `name` is a projection's short name (q_proj ... down_proj, as in `server.model.shapes`); `block` is
    "attn" or "mlp". q/k/v share one fused input, so `project_input` is called for o_proj, gate_proj,
    up_proj and down_proj only.
    """

    def project_input(self, layer: int, name: str, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """The input [T, in] of projection `name` (return x itself, or a new tensor: x is shared)."""
        return x

    def project_output(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor, batch: StepBatch) -> None:
        """Update the projection's output y [T, out] (x [T, in] is its input) in place."""

    def project_outputs(self, layer: int, names: tuple[str, ...], x: torch.Tensor, ys: tuple[torch.Tensor, ...],
                        batch: StepBatch) -> None:
        """Projections that share the input x (q/k/v; gate/up): update each ys[i] [T, out_i] in place. The default
        calls `project_output` per name; a family may do them together (LoRA: one fused launch)."""
        for name, y in zip(names, ys, strict=True):
            self.project_output(layer, name, x, y, batch)

    def block_output(self, layer: int, block: str, h: torch.Tensor, out: torch.Tensor, batch: StepBatch
                     ) -> torch.Tensor:
        """The output [T, hidden] of the attention or MLP block before the residual add (the block's new
        residual stream is h + the returned tensor; h [T, hidden]: the residual stream entering the block,
        before its norm). Return `out` itself or a new tensor; `h` must not be changed."""
        return out


def _overrides(obj: StepHooks, method: str) -> bool:
    return getattr(type(obj), method) is not getattr(StepHooks, method)


class ActiveHooks:
    """The overridden hooks of the device forms that hold a slot used in this step."""

    __slots__ = ("project_input", "project_output", "project_outputs", "block_output")

    def __init__(self, forms: list[StepHooks]) -> None:
        self.project_input: list[Callable] = [f.project_input for f in forms if _overrides(f, "project_input")]
        self.project_output: list[Callable] = [f.project_output for f in forms if _overrides(f, "project_output")]
        self.project_outputs: list[Callable] = [f.project_outputs for f in forms
                                                if _overrides(f, "project_output") or _overrides(f, "project_outputs")]
        self.block_output: list[Callable] = [f.block_output for f in forms if _overrides(f, "block_output")]


NO_HOOKS = ActiveHooks([])


def has_hooks(form: StepHooks) -> bool:
    """Whether a device form acts on rows of the step (then its slots' rows are grouped into segments)."""
    return any(_overrides(form, m) for m in ("project_input", "project_output", "project_outputs", "block_output"))


@dataclass(frozen=True)
class DeviceContext:
    """What a family's device form may size itself by and read.

    `kv_cache` has `write_all_layers(slots, k, v)`; `base_weight(layer, name)` is a projection's frozen
    base weight [out, in] (a view: never write to it), e.g. for DoRA's column norms.
    """

    shapes: BaseModelInfo
    max_adapters: int
    max_rank: int
    dtype: torch.dtype
    device: torch.device
    kv_cache: Any
    base_weight: Callable[[int, str], torch.Tensor]
    # the projection's frozen bias [out] (a view), or None where it has none (DoRA rescales the output without it)
    base_bias: Callable[[int, str], torch.Tensor | None] | None = None
    # the runner's LoRA page pool (server/model/adapter_pages.py), shared by LoRA and DoRA; None: a private one
    lora_pages: Any = None


class ResidentForm(Protocol):
    """The runner's view of a family's device form (implemented by `server.families.base.DeviceForm`)."""

    def load(self, slot: int, adapter: Any, kv_slots: list[int]) -> None: ...
    def clear(self, slot: int) -> None: ...
    def chunk(self, slot: int, start: int, n: int) -> ChunkPart | None: ...


class FamilyLike(Protocol):
    def device_form(self, ctx: DeviceContext) -> Any: ...


class AdapterLike(Protocol):
    """The runner's view of a loaded adapter (`server.families.base.Adapter`)."""

    @property
    def family(self) -> FamilyLike: ...
