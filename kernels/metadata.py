"""Per-step LoRA batch metadata, shared by every LoRA module of one forward pass.

Tokens are grouped into segments, one per distinct active slot. Slot -1 means "base only" and
forms no segment, so base tokens cost nothing. Only `token_indices` (and the tile tables built from
the host fields) go to the device: that is all the kernels read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)
class LoRAMeta:
    """One step's segments. Built once per step (`from_token_slots`) and read by every module's kernels."""

    token_indices: torch.Tensor  # [T_lora] int64 on the device: row ids into x/y, grouped by slot (segment order)
    slots: tuple[int, ...]  # slot of each segment (all >= 0)
    starts: tuple[int, ...]  # offset of each segment into token_indices
    lens: tuple[int, ...]  # tokens in each segment
    contiguous: bool  # every segment's rows form one contiguous range (slices, no gather)
    num_tokens: int  # T: rows of x / y
    first_rows: tuple[int, ...] = ()  # first row of each segment in x/y (-1: empty segment)
    # Host-side memo of what is derived from this step's segments (per-segment ranks, tile tables, the
    # CPU backend's runs); a meta lives for one step, so each is computed once per step, not per layer.
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    def rows(self, i: int) -> slice | torch.Tensor:
        """The rows of segment i in x/y: a slice when the meta is contiguous, else an index tensor."""
        start, n = self.starts[i], self.lens[i]
        if self.contiguous:
            first = self.first_rows[i] if n else 0
            return slice(first, first + n)
        return self.token_indices[start:start + n]

    @property
    def num_segments(self) -> int:
        return len(self.slots)

    @property
    def max_seg_len(self) -> int:
        return max(self.lens, default=0)

    @property
    def slot_mask(self) -> int:
        """Bit s set for every slot with a segment in this step (memoised): `mask & self.slot_mask` asks in O(1)
        whether a module serves any of the step's slots."""
        hit = self.memo.get("slot_mask")
        if hit is None:
            hit = self.memo["slot_mask"] = sum(1 << s for s in set(self.slots))
        return hit

    def seg_ranks(self, ranks: torch.Tensor) -> tuple[int, ...]:
        """Rank of each segment's slot, read on the host (memoised per ranks tensor).

        A host ``ranks`` is read every call (free). A device-resident one costs one sync the first
        time this meta sees it and is then memoised by identity and version counter, so a slot's
        rank must not change while this meta is in use.
        """
        if not ranks.is_cuda:
            host = ranks.tolist()
            return tuple(int(host[s]) for s in self.slots)
        key = ("ranks", id(ranks))
        version = _version(ranks)
        hit = self.memo.get(key)
        if hit is not None and hit[0] is ranks and hit[1] == version:
            return hit[2]
        host = ranks.tolist()
        seg = tuple(int(host[s]) for s in self.slots)
        self.memo[key] = (ranks, version, seg)
        return seg

    def page_rows(self, pages: torch.Tensor, page_rank: int, ranks: torch.Tensor) -> tuple[slice | torch.Tensor, ...]:
        """Rows of the flat pools [P * PR, ...] holding each segment's rank rows (`kernels.pages.slot_rows`),
        read on the host once per page table (memoised like `seg_ranks`; a device table costs one sync)."""
        seg_r = self.seg_ranks(ranks)
        key = ("page_rows", id(pages), page_rank, seg_r)
        version = _version(pages)
        hit = self.memo.get(key)
        if hit is not None and hit[0] is pages and hit[1] == version:
            return hit[3]
        from kernels.pages import slot_rows

        host = pages.tolist()
        rows = tuple(slot_rows(host[s], page_rank, r) if r else slice(0, 0)
                     for s, r in zip(self.slots, seg_r, strict=True))
        self.memo[key] = (pages, version, seg_r, rows)
        return rows

    def tile_table(self, ranks: torch.Tensor, block_m: int, block_r: int) -> torch.Tensor:
        """Compact work list for the Triton kernels: int32 [n_tiles, 5] on ``token_indices``' device.

        Row = (tok_off, m_len, slot, r_off, r_len): ``m_len`` rows of ``token_indices`` starting at
        ``tok_off`` (all of one slot) times rank columns [r_off, r_off + r_len). Each segment gets
        ceil(len / block_m) row blocks; with ``block_r > 0`` each row block is split into
        ceil(r_s / block_r) rank blocks of the slot's *own* rank, with ``block_r == 0`` one tile
        covers [0, r_s). Empty segments and rank-0 slots get no tiles, so neither base tokens nor
        another slot's rank padding cost any program instance.
        """
        seg_r = self.seg_ranks(ranks)
        key = ("tiles", block_m, block_r, seg_r)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        rows: list[tuple[int, int, int, int, int]] = []
        for slot, start, n, r in zip(self.slots, self.starts, self.lens, seg_r, strict=True):
            if n == 0 or r == 0:
                continue
            r_step = block_r if block_r > 0 else r
            for m0 in range(0, n, block_m):
                for r0 in range(0, r, r_step):
                    rows.append((start + m0, min(block_m, n - m0), slot, r0, min(r_step, r - r0)))
        table = torch.tensor(rows, dtype=torch.int32).reshape(-1, 5).to(self.token_indices.device)
        self.memo[key] = table
        return table

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
        slots, starts, lens, firsts = [], [], [], []
        contiguous = True
        for s, rows in order.items():
            slots.append(s)
            starts.append(len(indices))
            lens.append(len(rows))
            firsts.append(rows[0])
            if rows[-1] - rows[0] + 1 != len(rows):
                contiguous = False
            indices.extend(rows)
        return cls(
            token_indices=torch.tensor(indices, dtype=torch.int64, device=device),
            slots=tuple(slots),
            starts=tuple(starts),
            lens=tuple(lens),
            contiguous=contiguous,
            num_tokens=len(token_slots),
            first_rows=tuple(firsts),
        )


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors keep no version counter: identity alone keys the memo
        return None
