"""The math of a per-request composition: peft 0.21's `LoraModel.add_weighted_adapter`, quirks included.

Written from peft's semantics (`tuners/lora/model.py`, `utils/merge_utils.py`), not copied. What peft does,
for sources s_i (LoRA factors A_i [r_i, in], B_i [out, r_i], scaling c_i) and weights w_i:

* One source: the method is `linear`, whatever was asked.
* The merged adapter's config is source 0's with r = lora_alpha = new_rank, empty rank/alpha patterns and
  the union of the sources' `target_modules` (a set union of names, or the regexes joined with `|`; a mix is
  an error). Source 0's `layers_to_transform`, `layers_pattern`, `exclude_modules`, `use_rslora` and
  `init_lora_weights` carry over. So its scaling is new_rank / new_rank = 1, or sqrt(new_rank) when source 0
  uses rsLoRA; and a module the union selects but no source has is an error (peft: "No matching LoRAs").
* `cat`: A = concat_i(A_i * w_i * c_i) (rows), B = concat_i(B_i) (columns); new_rank = sum of source ranks.
* `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: A and B are merged separately, A with
  weights sign(w_i c_i) sqrt(|w_i c_i|), B with sqrt(|w_i c_i|); every source must have the same r.
* `*svd` (`svd`, `ties_svd`, ...): the dense deltas c_i B_i A_i are merged with weights w_i, then
  truncated to `rank` (default: the largest source r) by `torch.linalg.svd`: B = U S, A = Vh.
* The random drop of `dare_*` uses torch's default generator; peft first builds the new adapter's layers
  (nn.Linear init draws for every targeted module, plus A's init when init_lora_weights is true or
  "gaussian"), then draws one Bernoulli mask per source tensor, module by module. `derived_lora` replays
  the same draws from `torch.Generator().manual_seed(seed)`, which equals `torch.manual_seed(seed)` then
  `add_weighted_adapter(...)`.

Rank per module is what the slot holds: the rows peft leaves at zero (cat of modules some sources lack)
are not stored; they contribute exactly nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from server.families.base import Adapter
from server.families.lora import LoraAdapter, LoraModuleSpec, LoraModuleWeights, LoraSpec, parse_lora
from server.model.shapes import LORA_MODULES, BaseModelInfo

TASK_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("cat", *TASK_METHODS, *SVD_METHODS)
Method = Literal["cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "svd", "ties_svd",
                 "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]


class CompositionError(ValueError):
    """A composition that cannot be built; `field` is the request field to name, `status` the HTTP status."""

    def __init__(self, message: str, field: str, status: int = 422) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


@dataclass(frozen=True)
class MergeParams:
    """peft's add_weighted_adapter arguments (rank = svd_rank, clamp = svd_clamp)."""

    method: str = "cat"
    density: float | None = None
    majority_sign_method: str = "total"
    rank: int | None = None
    clamp: float | None = None
    seed: int | None = None

    def effective(self, num_sources: int) -> MergeParams:
        """peft merges a single adapter with `linear`, whatever method was asked."""
        return replace(self, method="linear") if num_sources == 1 else self

    @property
    def base_method(self) -> str:
        return self.method.removesuffix("_svd") if self.method != "svd" else "linear"

    @property
    def random(self) -> bool:
        return self.method.startswith("dare")


# ---------------------------------------------------------------------------------------------- task arithmetic


def _prune(t: torch.Tensor, density: float, how: str, gen: torch.Generator | None) -> torch.Tensor:
    if density >= 1:
        return t
    if density < 0:
        raise CompositionError(f"merge.density {density} must be >= 0", "merge.density", 400)
    if how == "magnitude":
        keep = torch.zeros(t.numel(), dtype=t.dtype)
        keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices] = 1
        return t * keep.reshape(t.shape)
    mask = torch.bernoulli(torch.full_like(t, density), generator=gen)
    return t * mask / density


def _combine(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, p: MergeParams,
             gen: torch.Generator | None) -> torch.Tensor:
    """peft's merge_utils for one module: prune, elect signs (ties), weight, sum (or disjoint mean)."""
    if method in ("ties", "magnitude_prune"):
        tensors = [_prune(t, p.density, "magnitude", gen) for t in tensors]  # type: ignore[arg-type]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [_prune(t, p.density, "random", gen) for t in tensors]  # type: ignore[arg-type]
    stacked = torch.stack(tensors, dim=0)
    w = weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))
    if method not in ("ties", "dare_ties"):
        return (stacked * w).sum(dim=0)
    votes = stacked.sum(dim=0) if p.majority_sign_method == "total" else stacked.sign().sum(dim=0)
    agree = stacked.sign() == torch.where(votes >= 0, 1, -1)
    weighted = stacked * w
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


# ---------------------------------------------------------------------------------------------- derived config


def source_rank(spec: LoraSpec) -> int:
    """peft's per-adapter rank for add_weighted_adapter: r, or the largest rank_pattern value if bigger."""
    return max(spec.r, *spec.rank_pattern.values()) if spec.rank_pattern else spec.r


def new_rank_of(specs: list[LoraSpec], p: MergeParams) -> int:
    ranks = [source_rank(s) for s in specs]
    if p.method == "cat":
        return sum(ranks)
    if p.method in SVD_METHODS:
        return p.rank or max(ranks)
    if len(set(ranks)) != 1:
        raise CompositionError(
            f"merge.method {p.method!r} needs sources of one rank r, got {', '.join(map(str, ranks))} "
            "(peft refuses it too); use 'cat' or an svd method", "adapters")
    return ranks[0]


def derived_spec(specs: list[LoraSpec], p: MergeParams, base: BaseModelInfo) -> LoraSpec:
    """The merged adapter's config as peft builds it: source 0's, r = alpha = new rank, union of targets."""
    first = specs[0]
    kinds = {isinstance(s.target_modules, str) for s in specs}
    if len(kinds) > 1:
        raise CompositionError(
            "the sources' target_modules mix a regex string and a list of names; peft cannot merge them "
            "(all must be of one type)", "adapters")
    if isinstance(first.target_modules, str):
        targets: str | list[str] = "|".join(f"({s.target_modules})" for s in specs)
    else:
        union: list[str] = []
        for s in specs:
            union += [t for t in s.target_modules if t not in union]
        targets = union
    rank = new_rank_of(specs, p)
    cfg = {"r": rank, "lora_alpha": rank, "use_rslora": first.use_rslora, "target_modules": targets,
           "layers_to_transform": list(first.layers_to_transform) if first.layers_to_transform else None,
           "layers_pattern": list(first.layers_pattern) if isinstance(first.layers_pattern, tuple)
           else first.layers_pattern,
           "exclude_modules": list(first.exclude_modules) if isinstance(first.exclude_modules, tuple)
           else first.exclude_modules}
    spec = parse_lora(cfg, base, max_rank=rank)
    return replace(spec, init_lora_weights=first.init_lora_weights)


# ---------------------------------------------------------------------------------------------- the merge


def _replay_layer_init(spec: LoraSpec, base: BaseModelInfo, gen: torch.Generator) -> None:
    """Consume what peft's inject_adapter draws from the default generator for the new adapter's layers."""
    for layer in range(base.num_layers):
        for short in LORA_MODULES:
            m = spec.modules.get((layer, short))
            if m is None:
                continue
            k_in, n_out = base.module_shape(short)
            torch.empty(m.rank, k_in).uniform_(generator=gen)  # nn.Linear(in, r) reset_parameters
            torch.empty(n_out, m.rank).uniform_(generator=gen)  # nn.Linear(r, out) reset_parameters
            if spec.init_lora_weights is True:
                torch.empty(m.rank, k_in).uniform_(generator=gen)  # kaiming_uniform_ on A again
            elif isinstance(spec.init_lora_weights, str) and spec.init_lora_weights.lower() == "gaussian":
                torch.empty(m.rank, k_in).normal_(generator=gen)


def derived_lora(sources: list[tuple[LoraAdapter, float]], params: MergeParams, base: BaseModelInfo,
                 max_rank: int) -> LoraAdapter:
    """The adapter peft's add_weighted_adapter would build from `sources` (adapter, weight) with `params`."""
    p = params.effective(len(sources))
    specs = [a.spec for a, _ in sources]
    assert all(isinstance(s, LoraSpec) for s in specs)
    spec = derived_spec(specs, p, base)  # type: ignore[arg-type]
    gen = None
    if p.random:
        gen = torch.Generator().manual_seed(int(p.seed or 0))
        _replay_layer_init(spec, base, gen)
    rank = new_rank_of(specs, p)  # type: ignore[arg-type]
    new_scaling = rank / math.sqrt(rank) if spec.use_rslora else rank / rank
    modules: dict[tuple[int, str], LoraModuleWeights] = {}
    mspecs: dict[tuple[int, str], LoraModuleSpec] = {}
    for layer in range(base.num_layers):
        for short in LORA_MODULES:
            key = (layer, short)
            if key not in spec.modules:
                continue
            valid = [(a.modules[key], w) for a, w in sources if key in a.modules]
            if not valid:
                raise CompositionError(
                    f"the merged adapter's targets (peft: the union of target_modules, with the first source's "
                    f"layers_to_transform/exclude_modules) select layer {layer} {short}, which no source adapter "
                    "has; peft's add_weighted_adapter fails there too", "adapters")
            a, b = _merge_module(valid, p, rank, gen, f"layer {layer} {short}")
            r = a.shape[0]
            if b.shape[1] != r:  # an svd rank over a module's smaller side (peft builds a broken layer there)
                most = min(b.shape[0], a.shape[1])
                raise CompositionError(f"merge.rank {rank} exceeds the size of layer {layer} {short} "
                                       f"({b.shape[0]} x {a.shape[1]}); use merge.rank <= {most}", "merge.rank", 400)
            if r > max_rank:
                where = "merge.rank" if p.method in SVD_METHODS else "adapters"
                raise CompositionError(
                    f"the composition has rank {r} at layer {layer} {short} ({p.method} of ranks "
                    f"{', '.join(str(m.a.shape[0]) for m, _ in valid)}), over --max-rank {max_rank}; use fewer "
                    "or smaller adapters, or an svd method with merge.rank <= --max-rank", where, 400)
            modules[key] = LoraModuleWeights(a=a.contiguous(), b=b.contiguous(), scaling=new_scaling)
            mspecs[key] = LoraModuleSpec(rank=r, alpha=float(rank), scaling=new_scaling)
    from server.families import LORA

    return LoraAdapter(family=LORA, spec=replace(spec, modules=mspecs), modules=modules)


def _merge_module(valid: list[tuple[LoraModuleWeights, float]], p: MergeParams, rank: int,
                  gen: torch.Generator | None, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if p.method == "cat":
        return (torch.cat([m.a * w * m.scaling for m, w in valid], dim=0),
                torch.cat([m.b for m, _ in valid], dim=1))
    if p.method in TASK_METHODS:
        shapes = {tuple(m.a.shape) for m, _ in valid}
        if len(shapes) != 1:
            raise CompositionError(f"merge.method {p.method!r}: the sources' ranks differ at {where} "
                                   f"({', '.join(str(m.a.shape[0]) for m, _ in valid)})", "adapters")
        wa, wb = [], []
        for m, w in valid:
            ws = w * m.scaling
            wa.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
            wb.append(math.sqrt(abs(ws)))
        a = _combine([m.a for m, _ in valid], torch.tensor(wa), p.method, p, gen)
        b = _combine([m.b for m, _ in valid], torch.tensor(wb), p.method, p, gen)
        return a, b
    deltas = [(m.b @ m.a) * m.scaling for m, _ in valid]
    delta = _combine(deltas, torch.tensor([w for _, w in valid]), p.base_method, p, gen)
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    if p.clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), p.clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    return vh, u


def scaled_adapter(adapter: Adapter, scale: float) -> Adapter:
    """A LoRA or DoRA adapter whose every module's scaling is multiplied by `scale` (tensors shared)."""
    assert isinstance(adapter, LoraAdapter)
    modules = {k: replace(m, scaling=m.scaling * scale) for k, m in adapter.modules.items()}
    spec = adapter.spec
    assert isinstance(spec, LoraSpec)
    spec = replace(spec, modules={k: replace(m, scaling=m.scaling * scale) for k, m in spec.modules.items()})
    return replace(adapter, spec=spec, modules=modules)
