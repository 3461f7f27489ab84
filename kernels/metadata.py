"""Per-step LoRA batch metadata, shared by every LoRA module of one forward pass.

Tokens are grouped into segments, one per distinct active slot. Slot -1 means "base only" and
forms no segment, so base tokens cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRAMeta:
    token_indices: torch.Tensor  # [T_lora] int64: row ids into x/y, grouped by slot (segment order)
    seg_slots: torch.Tensor  # [D] int32: slot of each segment (all >= 0)
    seg_starts: torch.Tensor  # [D] int32: offset of each segment into token_indices
    seg_lens: torch.Tensor  # [D] int32: tokens in each segment
    slots: tuple[int, ...]  # host copy of seg_slots
    starts: tuple[int, ...]  # host copy of seg_starts
    lens: tuple[int, ...]  # host copy of seg_lens
    contiguous: bool  # every segment's rows form one contiguous range (slices, no gather)
    num_tokens: int  # T: rows of x / y

    @property
    def num_segments(self) -> int:
        return len(self.slots)

    @property
    def max_seg_len(self) -> int:
        return max(self.lens, default=0)

    @classmethod
    def from_token_slots(cls, token_slots: list[int] | torch.Tensor, device: torch.device | str = "cpu"
                         ) -> LoRAMeta:
        """Build segments from each token's slot (-1 = base). Order of segments: by first appearance."""
        if isinstance(token_slots, torch.Tensor):
            token_slots = token_slots.tolist()
        order: dict[int, list[int]] = {}
        for i, s in enumerate(token_slots):
            if s >= 0:
                order.setdefault(int(s), []).append(i)
        indices: list[int] = []
        slots, starts, lens = [], [], []
        contiguous = True
        for s, rows in order.items():
            slots.append(s)
            starts.append(len(indices))
            lens.append(len(rows))
            if rows[-1] - rows[0] + 1 != len(rows):
                contiguous = False
            indices.extend(rows)
        return cls(
            token_indices=torch.tensor(indices, dtype=torch.int64, device=device),
            seg_slots=torch.tensor(slots, dtype=torch.int32, device=device),
            seg_starts=torch.tensor(starts, dtype=torch.int32, device=device),
            seg_lens=torch.tensor(lens, dtype=torch.int32, device=device),
            slots=tuple(slots),
            starts=tuple(starts),
            lens=tuple(lens),
            contiguous=contiguous,
            num_tokens=len(token_slots),
        )
