"""Paged attention kernels (decode split-KV and varlen prefill) against the torch twin and a float64 loop.

Runs Triton through its CPU interpreter here (fp32/fp16, small shapes); the same grid runs in bf16 on
a GPU (`-m gpu`). Caches are filled with random values everywhere, block tables are shuffled and
padded with valid block ids, query rows are permuted and rows of no sequence carry a sentinel, so a
wrong slot, a wrong row or an over-read shows as a mismatch.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels.paged_attention import (
    context_slots,
    decode_workspace,
    paged_attention_ref,
    paged_decode_attention,
    paged_prefill_attention,
)

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
SENTINEL = 7.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(seed: int, q_lens: list[int], own_lens: list[int], prefix_lens: list[int], *, kv_heads: int,
              group: int, head_dim: int, bs: int, dtype: torch.dtype, num_blocks: int = 64) -> dict:
    """Random cache + sequences. own_lens count the sequence's own tokens (chunk included); sequences
    with the same prefix length share the same prefix blocks (prefix tuning)."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    shape = (num_blocks, bs, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    free = list(range(num_blocks))
    rng.shuffle(free)
    shared: dict[int, list[int]] = {}
    tables = []
    for n, p in zip(own_lens, prefix_lens, strict=True):
        if p and p not in shared:
            shared[p] = [free.pop() for _ in range(-(-p // bs))]
        tables.append((shared[p] if p else []) + [free.pop() for _ in range(-(-n // bs))])
    width = max(len(t) for t in tables) + 1
    bt = torch.tensor([t + [rng.randrange(num_blocks) for _ in range(width - len(t))] for t in tables],
                      dtype=torch.int32)
    total = sum(q_lens) + 3
    rows = list(range(total))
    rng.shuffle(rows)
    q_start = []
    pos = 0
    perm_starts = sorted(range(len(q_lens)), key=lambda _: rng.random())
    starts = [0] * len(q_lens)
    for b in perm_starts:  # sequences' query rows in a shuffled order, 3 unused rows at the end
        starts[b] = pos
        pos += q_lens[b]
    q_start = starts
    q = torch.randn(total, kv_heads * group, head_dim, generator=g).to(dtype)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    return dict(q=q.to(DEVICE), k_cache=k_cache.to(DEVICE), v_cache=v_cache.to(DEVICE), block_tables=bt.to(DEVICE),
                q_start=i32(q_start), q_len=i32(q_lens),
                ctx_len=i32([p + n for p, n in zip(prefix_lens, own_lens, strict=True)]),
                prefix_len=i32(prefix_lens))


def loop_f64(c: dict, scale: float, window: int | None, softcap: float) -> torch.Tensor:
    """Independent oracle: python slot arithmetic and a float64 softmax per (query, head)."""
    q = c["q"].double().cpu()
    kc, vc = c["k_cache"].double().cpu(), c["v_cache"].double().cpu()
    bs, kvh = kc.shape[1], kc.shape[2]
    group = q.shape[1] // kvh
    out = torch.full_like(q, SENTINEL)
    bt = c["block_tables"].tolist()
    for b, (qs, n, length, p) in enumerate(zip(*(c[k].tolist() for k in ("q_start", "q_len", "ctx_len",
                                                                         "prefix_len")), strict=True)):
        npb = -(-p // bs)
        where = [(bt[b][j // bs], j % bs) if j < p else (bt[b][npb + (j - p) // bs], (j - p) % bs)
                 for j in range(length)]
        for i in range(n):
            qi = length - n + i
            vis = [j for j in range(length) if j <= qi and (window is None or j > qi - window)]
            blk = torch.tensor([where[j][0] for j in vis])
            off = torch.tensor([where[j][1] for j in vis])
            ks, vs = kc[blk, off], vc[blk, off]  # [visible, KVH, D]
            for h in range(q.shape[1]):
                s = ks[:, h // group] @ q[qs + i, h] * scale
                if softcap:
                    s = softcap * torch.tanh(s / softcap)
                out[qs + i, h] = torch.softmax(s, 0) @ vs[:, h // group]
    return out


def run_kernel(c: dict, decode: bool, scale: float, window: int | None, softcap: float,
               num_splits: int | None = None) -> torch.Tensor:
    out = torch.full_like(c["q"], SENTINEL)
    common = dict(scale=scale, window=window, softcap=softcap, out=out)
    if decode:
        return paged_decode_attention(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["q_start"],
                                      c["ctx_len"], c["prefix_len"], num_splits=num_splits, **common)
    return paged_prefill_attention(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["q_start"],
                                   c["q_len"], c["ctx_len"], c["prefix_len"], max_q_len=int(c["q_len"].max()),
                                   **common)


def run_ref(c: dict, scale: float, window: int | None, softcap: float) -> torch.Tensor:
    return paged_attention_ref(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["q_start"], c["q_len"],
                               c["ctx_len"], c["prefix_len"], scale=scale, window=window, softcap=softcap,
                               out=torch.full_like(c["q"], SENTINEL))


DTYPES = [torch.float32, torch.float16]
# (kv_heads, group, head_dim): MHA, GQA 4 and 8 (Llama-3 70B's ratio), the tiny models' 16, 64 and 128
HEADS = [(2, 1, 16), (2, 4, 16), (1, 8, 64), (2, 2, 128)]


def grid(variants: list[tuple[int | None, float]]) -> list:
    """Every dtype x head shape plain; the window / soft-cap variants on two head shapes per dtype (the
    interpreter costs ~0.4 ms per program instance). Ids name the case, e.g. float16-kv2xg4xd16-w5-c0.0."""
    cases = [(d, h, None, 0.0) for d in DTYPES for h in HEADS]
    cases += [(d, h, w, c) for d in DTYPES for h in (HEADS[1], HEADS[2]) for w, c in variants]
    return [pytest.param(*c, id=f"{str(c[0]).removeprefix('torch.')}-kv{c[1][0]}xg{c[1][1]}xd{c[1][2]}-w{c[2]}-c{c[3]}")
            for c in cases]


@pytest.mark.parametrize("dtype, heads, window, softcap", grid([(5, 0.0), (None, 2.0), (7, 3.0)]))
def test_decode_grid(dtype, heads, window, softcap):
    kvh, group, d = heads
    # lengths across block boundaries, a 1-token context, prefixes not a multiple of the block size
    c = make_case(1, q_lens=[1, 1, 1, 1], own_lens=[1, 9, 23, 40], prefix_lens=[0, 5, 5, 0], kv_heads=kvh,
                  group=group, head_dim=d, bs=8, dtype=dtype)
    scale = d ** -0.5
    got = run_kernel(c, True, scale, window, softcap)
    ref = run_ref(c, scale, window, softcap)
    torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])
    if dtype == torch.float32 and d <= 64:
        torch.testing.assert_close(got.double().cpu(), loop_f64(c, scale, window, softcap), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [2, 4])
@pytest.mark.parametrize("window", [None, 6])
def test_decode_split_kv_merges_partials(num_splits, window):
    """Flash-decoding splits (incl. empty ones past a short context) merge to the unsplit answer."""
    c = make_case(2, q_lens=[1, 1, 1], own_lens=[3, 30, 50], prefix_lens=[0, 4, 0], kv_heads=2, group=2,
                  head_dim=16, bs=4, dtype=torch.float32)
    scale = 0.25
    got = run_kernel(c, True, scale, window, 0.0, num_splits=num_splits)
    torch.testing.assert_close(got, run_ref(c, scale, window, 0.0), **TOL[torch.float32])
    torch.testing.assert_close(got.double().cpu(), loop_f64(c, scale, window, 0.0), atol=1e-5, rtol=1e-5)


def test_decode_preallocated_workspace_is_used():
    c = make_case(3, q_lens=[1, 1], own_lens=[17, 33], prefix_lens=[0, 0], kv_heads=1, group=2, head_dim=16,
                  bs=8, dtype=torch.float32)
    ws = decode_workspace(4, 2, 16, 2, torch.device(DEVICE))
    ws[0].fill_(float("nan"))
    out = paged_decode_attention(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["q_start"], c["ctx_len"],
                                 c["prefix_len"], scale=0.25, num_splits=2, workspace=ws)
    assert not torch.isnan(ws[0][: 2 * 2 * 2 * 16]).any()  # the kernel wrote its partials there
    ref = run_ref(c, 0.25, None, 0.0)
    rows = c["q_start"].long()
    torch.testing.assert_close(out[rows], ref[rows], **TOL[torch.float32])


@pytest.mark.parametrize("dtype, heads, window, softcap", grid([(6, 0.0), (None, 2.5), (3, 1.5)]))
def test_prefill_grid(dtype, heads, window, softcap):
    kvh, group, d = heads
    # a first chunk, chunked prefill on top of cached tokens, a prefix adapter's shared blocks, a chunk
    # longer than one query tile, and a 1-token chunk in the prefill batch
    c = make_case(4, q_lens=[7, 5, 20, 1, 9], own_lens=[7, 18, 20, 4, 9], prefix_lens=[0, 0, 3, 0, 3],
                  kv_heads=kvh, group=group, head_dim=d, bs=8, dtype=dtype)
    scale = d ** -0.5
    got = run_kernel(c, False, scale, window, softcap)
    ref = run_ref(c, scale, window, softcap)
    torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])
    if dtype == torch.float32 and d <= 64:
        torch.testing.assert_close(got.double().cpu(), loop_f64(c, scale, window, softcap), atol=1e-5, rtol=1e-5)


def test_prefix_blocks_matter():
    """Sanity of the oracle: a sequence sees its prefix (changing the shared block changes its output)."""
    c = make_case(5, q_lens=[1], own_lens=[4], prefix_lens=[6], kv_heads=1, group=1, head_dim=16, bs=4,
                  dtype=torch.float32)
    before = run_kernel(c, True, 0.25, None, 0.0).clone()
    c["v_cache"][c["block_tables"][0, 0].long()] += 1.0
    after = run_kernel(c, True, 0.25, None, 0.0)
    assert (after - before).abs().max() > 1e-3


def test_context_slots_maps_prefix_then_own_blocks():
    bt = torch.tensor([5, 9, 2, 7], dtype=torch.int32)
    # prefix of 5 tokens in blocks 5, 9 (bs 4); own tokens start at block 2
    assert context_slots(bt, 11, 5, 4).tolist() == [20, 21, 22, 23, 36, 8, 9, 10, 11, 28, 29]


def test_launcher_errors():
    c = make_case(6, q_lens=[1], own_lens=[4], prefix_lens=[0], kv_heads=1, group=1, head_dim=16, bs=4,
                  dtype=torch.float32)
    args = (c["q"], c["k_cache"], c["v_cache"])
    with pytest.raises(ValueError, match="block_tables must be int32"):
        paged_decode_attention(*args, c["block_tables"].long(), c["q_start"], c["ctx_len"], c["prefix_len"],
                               scale=1.0)
    with pytest.raises(ValueError, match="ctx_len must be int32"):
        paged_decode_attention(*args, c["block_tables"], c["q_start"], c["ctx_len"][:0], c["prefix_len"], scale=1.0)
    with pytest.raises(ValueError, match="cache dtype"):
        paged_decode_attention(c["q"].half(), c["k_cache"], c["v_cache"], c["block_tables"], c["q_start"],
                               c["ctx_len"], c["prefix_len"], scale=1.0)
    with pytest.raises(ValueError, match="num_splits must be a power of two"):
        paged_decode_attention(*args, c["block_tables"], c["q_start"], c["ctx_len"], c["prefix_len"], scale=1.0,
                               num_splits=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_on_gpu(decode, head_dim):
    q_lens, own = ([1] * 6, [1, 64, 300, 513, 1024, 77]) if decode else ([33, 1, 70], [40, 64, 300])
    c = make_case(7, q_lens=q_lens, own_lens=own, prefix_lens=[0] * len(own), kv_heads=8, group=4,
                  head_dim=head_dim, bs=16, dtype=torch.bfloat16, num_blocks=512)
    scale = head_dim ** -0.5
    got = run_kernel(c, decode, scale, None, 0.0)
    torch.testing.assert_close(got.float(), run_ref(c, scale, None, 0.0).float(), **TOL[torch.bfloat16])
