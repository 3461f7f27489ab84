"""The device pool of LoRA pages: adapter memory as a byte budget (`--adapter-memory`).

A page holds `page_rank` (PR) rank rows of one adapter in every LoRA-able module of every layer: for module
(layer, name) with input K and output N, pool A [P, PR, K] and Bᵀ [P, PR, N] (B viewed [P, N, PR], the layout
the kernels read, `kernels/pages.py`). An adapter of rank r takes ceil(r / PR) pages, wherever they are, so
a rank-8 adapter costs half a rank-16 one and nothing is padded to `--max-rank`. The page table
[max_slots, ceil(max_rank / PR)] int32 (a fixed-shape device tensor, written only between steps) maps each
slot's rank rows to its pages. LoRA and DoRA share the pool (one budget); the SlotManager
(`server/engine/slots.py`) decides which pages an adapter gets.

Bytes: a page costs PR * layers * sum over the seven LoRA-able projections of (K + N) elements. The budget is
divided by that (a server whose adapters target fewer modules allocates only the modules' pools that are
used, lazily, so it uses less than the budget, never more).
"""

from __future__ import annotations

import math
import os
import re

import torch

from server.model.kv_cache import available_ram
from server.model.shapes import LORA_MODULES, BaseModelInfo

PAGE_RANK = 8  # rank rows per page: ranks 1..8 cost one page, 16 two, 64 eight
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30}


def parse_memory(value: str | int | float) -> int | float:
    """`--adapter-memory`: bytes ("512MiB", "2GB", "1048576") as an int, or a fraction of free device memory
    (0 < f <= 1, "0.1") as a float. ValueError naming the flag otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"--adapter-memory {value!r} is invalid")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError(f"--adapter-memory {value!r} is invalid: a fraction must be in (0, 1]")
        return value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            raise ValueError(f"--adapter-memory {value!r} is invalid: give bytes (e.g. 512MiB, 2GB, 1048576) or "
                             "a fraction of free device memory (e.g. 0.1)")
        num = float(m.group(1))
        if not unit and "." in m.group(1):
            return parse_memory(num)
        n = int(num * _UNITS[unit])
    if n < 1:
        raise ValueError(f"--adapter-memory {value!r} is invalid: must be > 0 bytes")
    return n


def free_device_memory(device: torch.device) -> int:
    """Free bytes on `device` now: CUDA's free memory, or the host's MemAvailable on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    ram = available_ram()
    return ram if ram is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def page_bytes(info: BaseModelInfo, dtype: torch.dtype, page_rank: int = PAGE_RANK) -> int:
    """Bytes of one page over every LoRA-able module of every layer (A and B rows)."""
    per_rank = sum(sum(info.module_shape(m)) for m in LORA_MODULES) * info.num_layers
    return page_rank * per_rank * torch.empty(0, dtype=dtype).element_size()


def budget_pages(memory: int | float | None, info: BaseModelInfo, dtype: torch.dtype, device: torch.device,
                 max_rank: int, default_adapters: int, page_rank: int = PAGE_RANK) -> int:
    """Pages the budget holds. None: what `default_adapters` slots of `max_rank` held before paging."""
    per_max = math.ceil(max_rank / page_rank)
    if memory is None:
        return default_adapters * per_max
    nbytes = int(free_device_memory(device) * memory) if isinstance(memory, float) else memory
    pb = page_bytes(info, dtype, page_rank)
    n = nbytes // pb
    if n < per_max:
        raise ValueError(f"--adapter-memory {nbytes} bytes holds {n} pages of {pb} bytes; one adapter of "
                         f"--max-rank {max_rank} needs {per_max} (raise --adapter-memory or lower --max-rank)")
    return n


class LoRAPagePool:
    """Pool A/Bᵀ pages per module (allocated on a module's first use) and the page table, on the device."""

    def __init__(self, info: BaseModelInfo, num_slots: int, num_pages: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, page_rank: int = PAGE_RANK) -> None:
        self.info = info
        self.num_slots = num_slots
        self.num_pages = num_pages
        self.page_rank = page_rank
        self.max_pages = math.ceil(max_rank / page_rank)  # per adapter: the page table's width
        self.dtype = dtype
        self.device = device
        self.pages = torch.zeros(num_slots, self.max_pages, dtype=torch.int32, device=device)
        self.host_pages: list[list[int]] = [[] for _ in range(num_slots)]
        self.a: dict[tuple[int, str], torch.Tensor] = {}  # [P, PR, K]
        self.b: dict[tuple[int, str], torch.Tensor] = {}  # [P, N, PR] view of storage [P, PR, N]

    def module(self, key: tuple[int, str]) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self.a:
            k_in, n_out = self.info.module_shape(key[1])
            p, pr = self.num_pages, self.page_rank
            self.a[key] = torch.zeros(p, pr, k_in, dtype=self.dtype, device=self.device)
            self.b[key] = torch.zeros(p, pr, n_out, dtype=self.dtype, device=self.device).transpose(1, 2)
        return self.a[key], self.b[key]

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    def set_pages(self, slot: int, pages: list[int]) -> None:
        if len(pages) > self.max_pages or any(not 0 <= p < self.num_pages for p in pages):
            raise ValueError(f"slot {slot}: pages {pages} invalid for a pool of {self.num_pages} pages, "
                             f"at most {self.max_pages} per adapter")
        self.host_pages[slot] = list(pages)
        row = pages + [0] * (self.max_pages - len(pages))
        self.pages[slot].copy_(torch.tensor(row, dtype=torch.int32))

    def rows(self, pages: list[int], r: int) -> slice | torch.Tensor:
        """Rows of the flat pools [P * PR, ...] that hold the first r rank rows on `pages`."""
        from kernels.pages import slot_rows

        if r > len(pages) * self.page_rank:
            raise ValueError(f"rank {r} does not fit {len(pages)} pages of {self.page_rank} rows")
        return slot_rows(pages, self.page_rank, r)

    def write(self, pages: list[int], key: tuple[int, str], a: torch.Tensor, b: torch.Tensor) -> None:
        """Copy A [r, K] and B [N, r] into `pages` of module `key` (pages no active slot reads: a loader
        thread may do this while a step runs)."""
        pa, pb = self.module(key)
        rows = self.rows(pages, a.shape[0])
        pa.view(-1, pa.shape[2])[rows] = a.to(self.dtype)
        pb.transpose(1, 2).reshape(-1, pb.shape[1])[rows] = b.T.to(self.dtype)
