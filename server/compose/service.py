"""Per-request adapter composition: resolve a request's `adapters` / `merge` / `lora_scale` to one adapter.

A composition is a derived LoRA adapter (`server.compose.merge`), computed once per distinct composition in a
worker thread (never on the event loop or the engine's step loop; concurrent requests for one composition
share one computation) and catalogued in the registry's CPU tier under a name derived from its key:
(each source's name, version and registration id, its weight), the method and its parameters. So a request
after a source's PUT computes a new composition from the new version and never gets a stale merge; the old
one leaves the catalogue with its source. The engine serves a derived adapter like any LoRA: `cat` is a LoRA
of rank sum r_i in an ordinary slot, through the same kernels, with no dense delta.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from server.api.errors import APIError
from server.compose.merge import CompositionError, MergeParams, derived_lora, scaled_adapter
from server.compose.schema import CompositionFields
from server.engine.registry import AdapterHandle, AdapterRegistry, Key
from server.families import Family
from server.model.shapes import BaseModelInfo
from server.threads import single_threaded

PREFIX = "compose:"  # ':' is not allowed in adapter names, so a derived name never collides with an upload


class Composer:
    """Builds, caches and hands out derived adapters; counts what it computed and what it found cached."""

    def __init__(self, registry: AdapterRegistry, base: BaseModelInfo, *, max_rank: int, max_compose: int,
                 base_name: str) -> None:
        self.registry = registry
        self.base = base
        self.max_rank = max_rank
        self.max_compose = max_compose
        self.base_name = base_name
        self.computed = 0  # compositions computed (cache misses)
        self.hits = 0  # requests served from a cached composition (or from one computed for another request)
        self._pending: dict[str, asyncio.Future] = {}

    # ---- request → composition ----------------------------------------------------------------
    async def acquire(self, body: Any) -> AdapterHandle:
        """The derived adapter `body` asks for, with a reference taken (release it with the registry)."""
        fields: CompositionFields = body
        if fields.lora_scale is not None:
            return await self._scaled(body.model, fields)
        if fields.adapters is None:
            raise APIError(400, "merge needs adapters: [{\"name\": ..., \"weight\": ...}, ...]", param="merge")
        if body.model is not None and body.model != self.base_name:
            raise APIError(400, f"model {body.model!r} with adapters: a composition runs on the base model; omit "
                                "model (or name the base model) and list every adapter in adapters", param="model")
        items = fields.adapters
        if len(items) > self.max_compose:
            raise APIError(400, f"adapters lists {len(items)} adapters; this server composes at most "
                                f"{self.max_compose} (--max-compose)", param="adapters")
        opts = fields.merge
        params = MergeParams() if opts is None else MergeParams(
            method=opts.method, density=opts.density, majority_sign_method=opts.majority_sign_method,
            rank=opts.rank, clamp=opts.svd_clamp, seed=opts.seed if opts.seed is not None else body.seed)
        self._check_params(params, len(items))
        keys = []
        for i, item in enumerate(items):
            entry = self.registry.entry(item.name)
            if entry is None:
                raise APIError(404, f"adapters[{i}].name: adapter {item.name!r} does not exist",
                               param=f"adapters[{i}].name", code="model_not_found")
            if entry.derived is not None:
                raise APIError(400, f"adapters[{i}].name: {item.name!r} is itself a composition; list its "
                                    "sources instead", param=f"adapters[{i}].name")
            if entry.kind != Family.LORA:
                raise APIError(422, f"adapters[{i}].name: adapter {item.name!r} is of type {entry.kind}; only "
                                    "LoRA adapters (type lora) can be composed", param=f"adapters[{i}].name",
                               code="invalid_adapter")
            keys.append(entry.key)
        weights = [item.weight for item in items]
        return await self._get(keys, weights, params)

    def _check_params(self, p: MergeParams, n: int) -> None:
        m = p.effective(n)
        if m.method in ("ties", "dare_linear", "dare_ties", "magnitude_prune") or (
                m.method.endswith("_svd") and m.method != "svd"):
            if p.density is None:
                raise APIError(400, f"merge.density is required for method {p.method!r} (the fraction of values "
                                    "kept, 0..1)", param="merge.density")
        if m.random and p.seed is None:
            raise APIError(400, f"merge.seed (or the request's seed) is required for method {p.method!r}: its "
                                "random drop must be reproducible", param="merge.seed")
        if p.rank is not None and not p.method.endswith("svd"):
            raise APIError(400, f"merge.rank applies only to the svd methods, not {p.method!r}", param="merge.rank")
        if p.clamp is not None and not p.method.endswith("svd"):
            raise APIError(400, f"merge.svd_clamp applies only to the svd methods, not {p.method!r}",
                           param="merge.svd_clamp")
        if p.rank is not None and p.rank > self.max_rank:
            raise APIError(400, f"merge.rank {p.rank} exceeds --max-rank {self.max_rank}", param="merge.rank")

    async def _scaled(self, model: str | None, fields: CompositionFields) -> AdapterHandle:
        if fields.adapters is not None or fields.merge is not None:
            raise APIError(400, "lora_scale scales the one adapter named by model; with adapters use their "
                                "weights instead", param="lora_scale")
        if model is None or model == self.base_name:
            raise APIError(400, "lora_scale needs model to name a LoRA or DoRA adapter; the request names the "
                                "base model", param="model")
        entry = self.registry.entry(model)
        if entry is None:
            raise APIError(404, f"The model {model!r} does not exist", param="model", code="model_not_found")
        if entry.derived is not None:
            raise APIError(400, f"lora_scale: {model!r} is a composition; scale its sources' weights instead",
                           param="lora_scale")
        if entry.kind not in (Family.LORA, Family.DORA):
            raise APIError(400, f"lora_scale applies to LoRA and DoRA adapters; {model!r} is of type {entry.kind}",
                           param="lora_scale")
        return await self._get([entry.key], [float(fields.lora_scale)], MergeParams(method="scale"))

    # ---- cache ----------------------------------------------------------------------------------
    @staticmethod
    def key_name(keys: list[Key], weights: list[float], p: MergeParams) -> str:
        payload = json.dumps([[list(k) for k in keys], [repr(w) for w in weights], p.method, p.density,
                              p.majority_sign_method, p.rank, p.clamp, p.seed if p.random else None])
        return PREFIX + hashlib.sha256(payload.encode()).hexdigest()[:16]

    async def _get(self, keys: list[Key], weights: list[float], p: MergeParams) -> AdapterHandle:
        name = self.key_name(keys, weights, p)
        while True:
            if name in self.registry:
                handle = await self.registry.acquire(name)
                if handle is not None:
                    self.hits += 1
                    return handle
            pending = self._pending.get(name)
            if pending is None:
                break
            await asyncio.shield(pending)  # the computation for another request; then take it from the cache
            if name not in self.registry:  # computed but not catalogued (a source changed): compute ours
                break
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[name] = fut
        try:
            handle = await self._compute(name, keys, weights, p)
            fut.set_result(None)
            return handle
        except BaseException as e:
            fut.set_result(None)
            if isinstance(e, CompositionError):
                raise APIError(e.status, str(e), param=e.field,
                               code="invalid_adapter" if e.status == 422 else None) from e
            raise
        finally:
            self._pending.pop(name, None)

    async def _compute(self, name: str, keys: list[Key], weights: list[float], p: MergeParams) -> AdapterHandle:
        handles: list[AdapterHandle] = []
        try:
            for i, k in enumerate(keys):
                try:
                    h = await self.registry.acquire(k[0])
                except Exception as e:  # noqa: BLE001 - files gone or corrupt since upload
                    raise APIError(503, f"adapter {k[0]!r} could not be loaded: {e}", param=f"adapters[{i}].name",
                                   code="adapter_load_failed") from e
                if h is None:
                    raise APIError(404, f"adapters[{i}].name: adapter {k[0]!r} does not exist",
                                   param=f"adapters[{i}].name", code="model_not_found")
                handles.append(h)
            # the versions actually loaded (a PUT may have landed since the key was computed)
            keys = [h.key for h in handles]
            sources = [(h.adapter, w) for h, w in zip(handles, weights, strict=True)]
            adapter = await asyncio.to_thread(self._build, sources, p)
            self.computed += 1
            info = {"method": p.method, "sources": [{"name": k[0], "version": k[1], "weight": w}
                                                    for k, w in zip(keys, weights, strict=True)]}
            if p.method != "scale":
                info["merge"] = {"density": p.density, "majority_sign_method": p.majority_sign_method,
                                 "rank": p.rank, "svd_clamp": p.clamp, "seed": p.seed if p.random else None}
            return self.registry.put_derived(self.key_name(keys, weights, p), adapter, tuple(keys), info)
        finally:
            for h in handles:
                self.registry.release(h)

    def _build(self, sources: list[tuple[Any, float]], p: MergeParams) -> Any:
        single_threaded()
        if p.method == "scale":
            return scaled_adapter(sources[0][0], sources[0][1])
        return derived_lora(sources, p, self.base, self.max_rank)
