"""Paged KV cache: fixed-size blocks shared by all sequences; a block table maps a sequence onto them.

Per layer, K and V are [num_blocks, block_size, num_kv_heads, head_dim]. A token at position p of a
sequence lives at flat slot block_table[p // block_size] * block_size + p % block_size. K is stored
after RoPE, so cached keys never need rotating again.
"""

from __future__ import annotations

import torch

from server.model.spec import ModelSpec

CPU_DEFAULT_MIN_TOKENS = 8192


def kv_bytes_per_token(spec: ModelSpec, dtype: torch.dtype) -> int:
    """K and V of one token over all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * elem


def available_ram() -> int | None:
    """MemAvailable (free + reclaimable page cache) in bytes, or None where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_num_blocks(spec: ModelSpec, dtype: torch.dtype, device: torch.device, block_size: int,
                       max_model_len: int, fraction: float) -> int:
    """How many blocks to allocate when the caller doesn't say.

    CUDA: `fraction` of the currently free device memory. CPU: room for max(4 * max_model_len, 8192)
    tokens, capped at `fraction` of the RAM available now, because a CPU server rarely runs more than a
    few long sequences at once and RAM is shared with everything else.
    """
    per_token = kv_bytes_per_token(spec, dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        tokens = int(free * fraction) // per_token
    else:
        tokens = max(4 * max_model_len, CPU_DEFAULT_MIN_TOKENS)
        avail = available_ram()
        if avail is not None:
            tokens = min(tokens, int(avail * fraction) // per_token)
    return tokens // block_size  # the server checks at start-up that one max_model_len sequence fits


class PagedKVCache:
    """Owns the K/V tensors of every layer; writes new tokens at flat slots."""

    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        # flat views [num_blocks * block_size, kv_heads, head_dim] share storage with the block views
        self.k_flat = [t.view(-1, *shape[2:]) for t in self.k]
        self.v_flat = [t.view(-1, *shape[2:]) for t in self.v]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [T, kv_heads, head_dim] of one layer at flat slots [T] (int64)."""
        self.k_flat[layer].index_copy_(0, slots, k)
        self.v_flat[layer].index_copy_(0, slots, v)

    def write_all_layers(self, slots: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store precomputed K/V [num_layers, P, kv_heads, head_dim] at flat slots (e.g. a prefix adapter).

        These keys are stored as given (no RoPE applied), which is how PEFT prefix tuning feeds them.
        """
        idx = torch.tensor(slots, dtype=torch.int64, device=self.k[0].device)
        for layer in range(len(self.k)):
            self.write(layer, idx, k[layer].to(self.k[0].dtype), v[layer].to(self.v[0].dtype))
