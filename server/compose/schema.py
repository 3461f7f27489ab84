"""Request fields of a per-request composition (an extension of completions and chat).

    "adapters": [{"name": "tone", "weight": 0.7}, {"name": "sql", "weight": 1.0}],
    "merge": {"method": "cat" | "linear" | "ties" | ... , "density": 0.5, "majority_sign_method": "total",
              "rank": 8, "svd_clamp": 0.99, "seed": 0},
    "lora_scale": 0.5          # with "model" naming one LoRA/DoRA adapter: multiplies its scaling
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from server.compose.merge import Method

Finite = Annotated[float, Field(allow_inf_nan=False)]


class ComposeItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    weight: Finite = 1.0


class MergeOptions(BaseModel):
    """peft's add_weighted_adapter arguments: combination_type, density, majority_sign_method, svd_rank,
    svd_clamp; `seed` seeds the random drop of the dare_* methods (default: the request's `seed`)."""

    model_config = ConfigDict(extra="forbid")

    method: Method = "cat"
    density: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"
    rank: Annotated[int, Field(ge=1)] | None = None
    svd_clamp: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    seed: StrictInt | None = None


class CompositionFields(BaseModel):
    """Mixed into the completions and chat request bodies."""

    adapters: Annotated[list[ComposeItem], Field(min_length=1)] | None = None
    merge: MergeOptions | None = None
    lora_scale: Finite | None = None

    @property
    def composes(self) -> bool:
        return self.adapters is not None or self.merge is not None or self.lora_scale is not None
