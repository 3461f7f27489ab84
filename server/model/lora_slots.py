"""Device-resident LoRA slots: stacked A/B buffers per (layer, target module), one row per slot.

Buffers of a (layer, module) are allocated on first use (the first adapter that targets it), so a
server whose adapters touch only q/v pays nothing for the MLP. Once allocated, one module costs
max_adapters * max_rank * (in + out) elements of the model dtype; every module of every layer of a
Llama-2-7B at 4 slots x rank 64 in fp16 would be ~1.3 GB. A slot's rank is 0 for every module its
adapter doesn't target, which the kernels skip at no cost.
"""

from __future__ import annotations

import torch

from adapters_store.base_info import LORA_MODULES, BaseModelInfo
from kernels import StackCache

LoRAWeights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]


class LoRASlots:
    """A[slot, r_max, in], B[slot, out, r_max], rank[slot] (int32) and scale[slot] (fp32) per module."""

    def __init__(self, info: BaseModelInfo, max_adapters: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.info = info
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.b: dict[tuple[int, str], torch.Tensor] = {}
        self.ranks: dict[tuple[int, str], torch.Tensor] = {}
        self.scales: dict[tuple[int, str], torch.Tensor] = {}
        self._host_ranks: dict[tuple[int, str], list[int]] = {}
        # CPU only: weights of the step's adapters stacked for one bmm per module (kernels.lora_apply_ref),
        # at most 256 MiB in all; emptied whenever any slot changes.
        self.stack_cache: StackCache | None = StackCache() if device.type == "cpu" else None

    def _allocate(self, key: tuple[int, str]) -> None:
        k_in, n_out = self.info.module_shape(key[1])
        s, r = self.max_adapters, self.max_rank
        self.a[key] = torch.zeros(s, r, k_in, dtype=self.dtype, device=self.device)
        if self.device.type == "cpu":
            # Same [S, N, R] shape, stored as [S, R, N]: B[slot, :, :r].T is then one contiguous block, which
            # the CPU twin's addmm reads ~30% faster than the strided slice. Triton (CUDA) keeps row-major B.
            self.b[key] = torch.zeros(s, r, n_out, dtype=self.dtype, device=self.device).transpose(1, 2)
        else:
            self.b[key] = torch.zeros(s, n_out, r, dtype=self.dtype, device=self.device)
        # ranks are only read on the host (kernel tile lists): keep them there, no device sync per module
        self.ranks[key] = torch.zeros(s, dtype=torch.int32)
        self.scales[key] = torch.zeros(s, dtype=torch.float32, device=self.device)
        self._host_ranks[key] = [0] * s

    def _check(self, slot: int, weights: LoRAWeights) -> None:
        if not 0 <= slot < self.max_adapters:
            raise ValueError(f"LoRA slot {slot} not in [0, {self.max_adapters})")
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
            if tuple(a.shape) != (r, k_in) or tuple(b.shape) != (n_out, r):
                raise ValueError(f"{where}: expected A [r, {k_in}] and B [{n_out}, r], "
                                 f"got A {tuple(a.shape)} and B {tuple(b.shape)}")

    def load_slot(self, slot: int, weights: LoRAWeights) -> None:
        """Install an adapter in a slot; modules absent from `weights` get rank 0 there.

        Everything is checked before anything is written, so a bad adapter leaves the slot as it was.
        """
        self._check(slot, weights)
        self.clear_slot(slot)
        self._drop_stacks()
        for key, (a, b, scaling) in weights.items():
            if key not in self.a:
                self._allocate(key)
            r = a.shape[0]
            self.a[key][slot, :r].copy_(a)
            self.b[key][slot, :, :r].copy_(b)
            self.ranks[key][slot] = r
            self.scales[key][slot] = float(scaling)
            self._host_ranks[key][slot] = r

    def _drop_stacks(self) -> None:
        if self.stack_cache is not None:
            self.stack_cache.clear()

    def clear_slot(self, slot: int) -> None:
        """Make a slot contribute nothing (rank 0 everywhere, buffers zeroed)."""
        self._drop_stacks()
        for key, host in self._host_ranks.items():
            if host[slot]:
                self.a[key][slot].zero_()
                self.b[key][slot].zero_()
                self.ranks[key][slot] = 0
                self.scales[key][slot] = 0.0
                host[slot] = 0

    def module(self, layer: int, name: str, active_slots: tuple[int, ...]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(A, B, ranks, scales) of a module, or None when no active slot has rank > 0 there (skip it)."""
        key = (layer, name)
        host = self._host_ranks.get(key)
        if host is None or not any(host[s] for s in active_slots):
            return None
        return self.a[key], self.b[key], self.ranks[key], self.scales[key]

    def cache_for(self, layer: int, name: str) -> tuple[StackCache, tuple[int, str]] | None:
        """(stacked-weight cache, module key) for lora_apply on CPU; None on CUDA."""
        return None if self.stack_cache is None else (self.stack_cache, (layer, name))
