"""CPU threads: one OpenMP team, owned by the engine's worker thread.

libgomp gives every thread that enters a parallel region its own team of pool threads. Once more
pool threads exist than CPUs (say the main thread loaded the model with N threads, then the engine
thread runs the forward with N), libgomp stops spinning between regions, and every small op in the
engine pays a futex wake-up: measured here ~100 us for a 4x256x16 matmul that takes 5 us otherwise,
which made a decode step with 8 LoRA adapters 3x slower. So every thread but the engine's does its
torch work on one thread (no team), and the engine thread gets all of them.
"""

from __future__ import annotations

import torch

_engine_threads: int | None = None


def claim_for_engine() -> int:
    """Call on the main thread before any torch work: returns the thread count for the engine worker
    (the process's count, as first seen) and leaves this thread single-threaded."""
    global _engine_threads
    if _engine_threads is None:
        _engine_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return _engine_threads


def single_threaded() -> None:
    """Call at the top of a helper thread's torch work (adapter loading)."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def engine_threads() -> int:
    """Threads the engine worker uses (for reports): the claimed count, else torch's current one."""
    return _engine_threads or torch.get_num_threads()
