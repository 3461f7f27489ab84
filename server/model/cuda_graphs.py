"""CUDA graphs for decode steps at bucketed batch sizes (1, 2, 4, 8, ... max_num_seqs).

A decode step of B sequences is padded to the smallest bucket Bb >= B and replays the graph captured
for Bb. Every per-step input (token ids, positions, KV write slots, logits rows, block tables,
query rows, context and prefix lengths) is a view into `StepBuffers` at a fixed address, so the
replay reads whatever the step wrote there; padding rows decode a dummy token whose K/V go to a
scratch block the engine never hands out and whose context is that one slot, so they disturb no
real sequence. Eligible steps: single-token chunks only, the paged (Triton) attention backend, no
input embeddings, and either no adapter row or adapter rows whose metadata the step also carries in
fixed-shape form (`StepBatch.lora_fixed`: LoRA slots only; the runner asks for it). Everything else
runs eagerly.

LoRA steps replay their own graph per bucket: its inputs are, besides the above, the LoRA row order
and the fixed-shape row tiles (`kernels/capturable.py`) in the buffers, padded with empty tiles to
`max_fixed_tiles(bucket, max_adapters)`; the kernels read each slot's rank, scale and page table
on the device, so loading or clearing an adapter needs no re-capture. A LoRA graph launches the
kernels of every module that has adapter weights allocated, so `signature()` (the runner's: each
capturable form's `graph_version`) keys it, and a new allocation re-captures. Base-only steps keep
their graph without LoRA launches.

Off CUDA (or with `capture=False`) the same padded template runs eagerly, which is how the CPU tests
prove the padding and buffer plumbing give the eager step's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from kernels.capturable import FixedLoRAMeta, max_fixed_tiles
from server.model.batch import StepBatch
from server.model.step_buffers import PagedAttnMeta, PagedSeqs, StepBuffers


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """Powers of two below max_num_seqs, then max_num_seqs itself."""
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_num_seqs]


def bucket_for(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest bucket holding num_seqs sequences, or None if none does."""
    return next((s for s in sizes if s >= num_seqs), None)


def eligible(batch: StepBatch) -> bool:
    """A pure decode step the graphs can replay (see the module docstring)."""
    a = batch.attn
    return (a is not None and a.prefill is None and a.decode is not None
            and (batch.segments is None or batch.lora_fixed is not None) and not batch.embeds
            and a.decode.num_seqs == batch.num_tokens
            and batch.logits_rows.shape[0] == batch.num_tokens)


def pad_lora(bufs: StepBuffers, batch: StepBatch, bucket: int, max_adapters: int) -> None:
    """Empty tiles (m_len 0) from the step's padded tile count up to the bucket's."""
    assert batch.lora_fixed is not None
    have = batch.lora_fixed.tiles.shape[0]
    want = max_fixed_tiles(bucket, max_adapters)
    if want > have:
        host = bufs.host["lora_tiles"]
        host.numpy()[have:want] = 0
        if host is not bufs.dev["lora_tiles"]:
            bufs.dev["lora_tiles"][have:want].copy_(host[have:want], non_blocking=True)


def pad_decode(bufs: StepBuffers, num_seqs: int, bucket: int, scratch_block: int, block_size: int) -> None:
    """Fill rows num_seqs..bucket-1 of the decode buffers with harmless dummy sequences (no adapter)."""
    n = bucket - num_seqs
    if n <= 0:
        return
    rows = list(range(num_seqs, bucket))
    for name, values in (("token_ids", [0] * n), ("positions", [0] * n),
                         ("write_slots", [scratch_block * block_size] * n), ("logits_rows", rows),
                         ("dec_q_start", rows), ("dec_ctx_len", [1] * n), ("dec_prefix_len", [0] * n)):
        host = bufs.host[name]
        host.numpy()[num_seqs:bucket] = values
        if host is not bufs.dev[name]:
            bufs.dev[name][num_seqs:bucket].copy_(host[num_seqs:bucket], non_blocking=True)
    tables = bufs.host["dec_tables"]
    tables.numpy()[num_seqs:bucket, 0] = scratch_block
    if tables is not bufs.dev["dec_tables"]:
        bufs.dev["dec_tables"][num_seqs:bucket].copy_(tables[num_seqs:bucket], non_blocking=True)


def template(bufs: StepBuffers, bucket: int, block_size: int, lora_slots: int = 0) -> StepBatch:
    """A StepBatch of `bucket` decode rows whose every tensor is a fixed view into the buffers; with
    `lora_slots` (the adapter slot count), LoRA segments as fixed-shape views too."""
    d = bufs.dev
    lora = None
    if lora_slots:
        lora = FixedLoRAMeta(token_indices=d["lora_rows"][:bucket],
                             tiles=d["lora_tiles"][:max_fixed_tiles(bucket, lora_slots)], num_tokens=bucket)
    seqs = PagedSeqs(block_tables=d["dec_tables"][:bucket], q_start=d["dec_q_start"][:bucket], q_len=None,
                     ctx_len=d["dec_ctx_len"][:bucket], prefix_len=d["dec_prefix_len"][:bucket], max_q_len=1)
    return StepBatch(token_ids=d["token_ids"][:bucket], positions=d["positions"][:bucket],
                     write_slots=d["write_slots"][:bucket], embeds=[], segments=lora, active_slots=(),
                     logits_rows=d["logits_rows"][:bucket], decode_rows=None, decode_ctx=None, decode_len=None,
                     prefills=[], attn=PagedAttnMeta(decode=seqs, prefill=None, block_size=block_size),
                     lora_fixed=lora)


class DecodeGraphs:
    """Captures `forward(template)` per bucket on first use and replays it for eligible steps."""

    def __init__(self, forward: Callable[[StepBatch], torch.Tensor], bufs: StepBuffers, max_num_seqs: int,
                 scratch_block: int, block_size: int, capture: bool, max_adapters: int = 1,
                 signature: Callable[[], Hashable] = lambda: None) -> None:
        self.forward = forward
        self.bufs = bufs
        self.sizes = bucket_sizes(min(max_num_seqs, bufs.max_seqs))
        self.scratch_block = scratch_block
        self.block_size = block_size
        self.capture = capture
        self.max_adapters = max_adapters
        self.signature = signature
        # (bucket, LoRA signature or None for base-only steps) -> (graph, its static output)
        self.graphs: dict[tuple[int, Hashable], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._generation = bufs.grows
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0  # steps run through a graph (or, with capture off, through its template)
        self.lora_replays = 0  # of which steps with adapter rows
        self.captures = 0

    def try_run(self, batch: StepBatch) -> torch.Tensor | None:
        """Logits of the step through a graph (or its padded template), or None to run it eagerly."""
        if not eligible(batch):
            return None
        num = batch.num_tokens
        bucket = bucket_for(num, self.sizes)
        if bucket is None:
            return None
        if self.bufs.grows != self._generation:  # buffers were reallocated: old captures read stale addresses
            self.graphs.clear()
            self._generation = self.bufs.grows
        pad_decode(self.bufs, num, bucket, self.scratch_block, self.block_size)
        lora = batch.segments is not None
        if lora:
            pad_lora(self.bufs, batch, bucket, self.max_adapters)
        self.replays += 1
        self.lora_replays += int(lora)
        if not self.capture:
            return self.forward(template(self.bufs, bucket, self.block_size, self.max_adapters * lora))[:num]
        sig = self.signature() if lora else None
        key = (bucket, sig)
        if key not in self.graphs:
            for old in [k for k in self.graphs if k[0] == bucket and (k[1] is None) == (sig is None)]:
                del self.graphs[old]  # a stale LoRA signature: its modules changed; free the graph
            self.graphs[key] = self._capture(bucket, lora)
            self.captures += 1
        graph, out = self.graphs[key]
        graph.replay()
        return out[:num].clone()

    def _capture(self, bucket: int, lora: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        t = template(self.bufs, bucket, self.block_size, self.max_adapters * lora)
        # the warm-up compiles the Triton kernels and lets the allocator settle (outside the capture);
        # it runs on the step's real rows plus padding, which is a correct step, not a dummy
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.forward(t)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the engine's adapter loader thread may write pages (and allocate a module's pool) while
        # this worker thread captures; its calls are not part of the graph and must not invalidate the capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self.forward(t)
        return graph, out
