"""What the Triton launchers share: accepted dtypes, the row-block rule, and the metadata checks."""

from __future__ import annotations

import torch

from kernels.metadata import LoRAMeta

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def block_m_for(max_seg_len: int) -> int:
    """Rows per tile: the smallest of 16 / 32 / 64 that holds the longest segment (decode: 16)."""
    return 16 if max_seg_len <= 16 else 32 if max_seg_len <= 32 else 64


def check_meta(meta: LoRAMeta, ranks: torch.Tensor, num_tokens: int, num_slots: int, r_max: int,
               device: torch.device) -> None:
    """The metadata and ranks fit a pool of `num_slots` slots of rank <= `r_max` over `num_tokens` rows."""
    if ranks.dim() != 1 or ranks.shape[0] != num_slots or ranks.dtype.is_floating_point:
        raise ValueError(f"ranks must be an integer [S={num_slots}] tensor, got shape {tuple(ranks.shape)} "
                         f"{ranks.dtype}")
    if meta.num_tokens != num_tokens:
        raise ValueError(f"meta.num_tokens {meta.num_tokens} != {num_tokens} rows")
    if meta.token_indices.device != device:
        raise ValueError(f"meta on {meta.token_indices.device}, tensors on {device}")
    if meta.num_segments and max(meta.slots) >= num_slots:
        raise ValueError(f"slot {max(meta.slots)} out of range for a pool of {num_slots} slots")
    for s, r in zip(meta.slots, meta.seg_ranks(ranks), strict=True):
        if not 0 <= r <= r_max:
            raise ValueError(f"rank {r} of slot {s} outside [0, R_max={r_max}]")
