"""Page-table addressing of LoRA A/B, shared by the Triton kernels, the torch twin and the CPU backend.

Weights live in pools of pages: ``a`` is [P, PR, K] (page p holds PR rank rows of A) and ``b`` is viewed
[P, N, PR] (page p holds PR rank columns of B; any strides). ``pages`` [S, MP] int32 maps a slot's rank rows
to pages: rank row j of slot s is row ``j % PR`` of page ``pages[s, j // PR]``. A slot of rank r uses its
first ceil(r / PR) entries; the rest are never read. The unpaged layout (``a`` [S, R_max, K], ``b``
[S, N, R_max]) is the special case PR = R_max with the identity table ``pages[s, 0] = s``
(`identity_pages`), so every backend has one addressing path.
"""

from __future__ import annotations

import torch

_IDENTITY: dict[tuple[int, str], torch.Tensor] = {}


def identity_pages(num_slots: int, device: torch.device) -> torch.Tensor:
    """[S, 1] int32 with pages[s, 0] = s (cached per size and device): the unpaged layout's page table."""
    key = (num_slots, str(device))
    t = _IDENTITY.get(key)
    if t is None:
        t = _IDENTITY[key] = torch.arange(num_slots, dtype=torch.int32, device=device).view(num_slots, 1)
    return t


def resolve_pages(a: torch.Tensor, pages: torch.Tensor | None) -> tuple[torch.Tensor, int, int]:
    """(page table, page rank PR, R_max = MP * PR) for pool ``a`` [P, PR, K] (identity when None)."""
    if pages is None:
        pages = identity_pages(a.shape[0], a.device)
    if pages.dim() != 2 or pages.dtype.is_floating_point:
        raise ValueError(f"pages must be an integer [S, max_pages] tensor, got shape {tuple(pages.shape)} "
                         f"{pages.dtype}")
    return pages, a.shape[1], pages.shape[1] * a.shape[1]


def slot_rows(page_row: list[int], page_rank: int, r: int) -> slice | torch.Tensor:
    """Rows of the flat pool [P * PR, ...] holding a slot's first r rank rows: a slice when its pages are
    consecutive (the allocator's usual case), else an index tensor."""
    n = -(-r // page_rank)
    first = page_row[0]
    if all(page_row[i] == first + i for i in range(n)):
        return slice(first * page_rank, first * page_rank + r)
    idx = [page_row[j // page_rank] * page_rank + j % page_rank for j in range(r)]
    return torch.tensor(idx, dtype=torch.int64)
