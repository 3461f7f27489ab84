"""Runner level: the Triton paged backend (interpreter) equals the twin; step buffers are reused; the
decode-graph template (bucket padding over the buffers) gives the eager step's logits.

Two runners on one tiny checkpoint run the same script of steps (chunked prefill on top of cached
tokens, a prefix adapter's shared blocks, LoRA rows, decodes), one with attention_backend="torch",
one with "triton"; logits must agree every step.
"""

from __future__ import annotations

import pytest
import torch

from server.families import LORA, AdapterSpec
from server.families.lora import LoraAdapter, LoraModuleWeights
from server.model.batch import build_step
from server.model.cuda_graphs import DecodeGraphs, bucket_for, bucket_sizes
from server.model.runner import ModelRunner, SeqChunk
from server.model.step_buffers import StepBuffers, prefix_blocks
from tests.model.helpers import random_prompts
from tests.tiny import make_tiny_checkpoint

BS = 4
PREFIX_BLOCKS = [40, 41]  # the prefix adapter's blocks (5 of 8 slots used)
PREFIX_SLOTS = [b * BS + o for b in PREFIX_BLOCKS for o in range(BS)][:5]
TABLES = [[3, 17, 9, 30, 11], [5, 22, 1, 27, 14], [8, 2, 33, 19, 6], [12, 25, 7, 36, 0]]


def make_runner(path: str, backend: str, **kw) -> ModelRunner:
    r = ModelRunner(path, block_size=BS, num_blocks=48, max_adapters=2, max_rank=8, max_num_seqs=8,
                    max_batch_tokens=64, attention_backend=backend, **kw)
    g = torch.Generator().manual_seed(5)
    # one LoRA adapter in slot 0 on q/v/down, random A and B so it changes the output
    modules = {}
    for layer in range(r.spec.num_layers):
        for name, (n_in, n_out) in {"q_proj": (64, 64), "v_proj": (64, 32), "down_proj": (128, 64)}.items():
            modules[(layer, name)] = LoraModuleWeights(torch.randn(4, n_in, generator=g) * 0.3,
                                                       torch.randn(n_out, 4, generator=g) * 0.3, 2.0)
    r.load_adapter(0, LoraAdapter(family=LORA, spec=AdapterSpec("LORA", None), modules=modules))
    # a prefix-tuning adapter's K/V in its own blocks (chunks name them through prefix_slots)
    kv = torch.randn(r.spec.num_layers, 5, r.spec.num_kv_heads, r.spec.head_dim, generator=g)
    with torch.inference_mode():
        r.kv_cache.write_all_layers(PREFIX_SLOTS, kv.to(r.device), (kv * 0.5 + 0.1).to(r.device))
    return r


def script() -> list[list[SeqChunk]]:
    """Steps over 4 sequences: 0 base, 1 LoRA, 2 prefix adapter (positions offset by 5), 3 base/window."""
    p = random_prompts([9, 6, 7, 3], seed=2)
    pre = dict(prefix_slots=PREFIX_SLOTS, pos_offset=5)
    steps = [
        [SeqChunk(0, p[0][:5], 0, TABLES[0], False), SeqChunk(1, p[1], 0, TABLES[1], True, adapter_slot=0)],
        [SeqChunk(0, p[0][5:], 5, TABLES[0], True), SeqChunk(2, p[2], 0, TABLES[2], True, **pre),
         SeqChunk(1, [7], 6, TABLES[1], True, adapter_slot=0), SeqChunk(3, p[3], 0, TABLES[3], True)],
    ]
    lens = [9, 7, 7, 3]
    for t in range(3):  # decodes of all four, with a 2-token chunk of seq 3 in the middle step
        step = [SeqChunk(0, [10 + t], lens[0], TABLES[0], True),
                SeqChunk(1, [20 + t], lens[1], TABLES[1], True, adapter_slot=0),
                SeqChunk(2, [30 + t], lens[2], TABLES[2], True, **pre)]
        n3 = 2 if t == 1 else 1
        step.append(SeqChunk(3, [40 + t] * n3, lens[3], TABLES[3], True))
        lens = [x + 1 for x in lens[:3]] + [lens[3] + n3]
        steps.append(step)
    return steps


@pytest.fixture(scope="module", params=["llama", "mistral-window"])
def ckpt(request, ckpt_dir: str) -> str:
    if request.param == "llama":
        return make_tiny_checkpoint(ckpt_dir, "llama", seed=3)
    return make_tiny_checkpoint(ckpt_dir, "mistral", seed=3, sliding_window=5)


def test_triton_backend_equals_twin_step_by_step(ckpt: str) -> None:
    twin, kern = make_runner(ckpt, "torch"), make_runner(ckpt, "triton")
    base = make_runner(ckpt, "torch")
    base.clear_slot(0)
    lora_changed = False
    for step in script():
        a, b, c = twin.execute(step), kern.execute(step), base.execute(step)
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        lora_rows = [i for i, ch in enumerate([x for x in step if x.want_logits]) if ch.adapter_slot == 0]
        lora_changed |= bool((a[lora_rows] - c[lora_rows]).abs().max() > 1e-3)
    assert lora_changed  # the LoRA rows really differ from the base model's
    assert kern.buffers.grows == 0 and twin.buffers.grows == 0


def test_step_tensors_live_in_preallocated_buffers(ckpt_dir: str) -> None:
    """No per-step allocation of the step's index tensors: every one is a view of the same buffers."""
    r = make_runner(make_tiny_checkpoint(ckpt_dir, "llama", seed=3), "triton")
    owned = r.buffers.storages()
    seen: list = []
    forward = r._forward

    def record(batch):  # observes the real step, then runs it
        seen.append(batch)
        return forward(batch)

    r._forward = record
    for step in script():
        r.execute(step)
    assert len(seen) == 5
    for batch in seen:
        tensors = [batch.token_ids, batch.positions, batch.write_slots, batch.logits_rows]
        if batch.segments is not None:
            tensors.append(batch.segments.token_indices)
        for part in (batch.attn.decode, batch.attn.prefill):
            if part is not None:
                tensors += [part.block_tables, part.q_start, part.ctx_len, part.prefix_len]
                tensors += [part.q_len] if part.q_len is not None else []
        assert all(t.untyped_storage().data_ptr() in owned for t in tensors)
    assert r.buffers.storages() == owned and r.buffers.grows == 0
    # and the same buffer backs a field across steps
    assert len({b.token_ids.data_ptr() for b in seen}) == 1


def test_buffers_grow_for_an_undeclared_step_size() -> None:
    bufs = StepBuffers(4, 2, 3, torch.device("cpu"))
    bufs.ensure(4, 2, 3)
    assert bufs.grows == 0
    bufs.ensure(9, 2, 3)
    assert bufs.grows == 1 and bufs.max_tokens == 9
    assert bufs.put("token_ids", list(range(9))).tolist() == list(range(9))


def test_prefix_blocks_must_be_aligned() -> None:
    assert prefix_blocks([8, 9, 10, 11, 20], 4) == [2, 5]
    with pytest.raises(ValueError, match="not block-aligned"):
        prefix_blocks([8, 9, 11], 4)


def test_bucket_sizes() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]
    assert bucket_for(3, bucket_sizes(12)) == 4 and bucket_for(9, bucket_sizes(12)) == 12
    assert bucket_for(13, bucket_sizes(12)) is None


def test_graph_template_padding_gives_eager_logits(ckpt_dir: str) -> None:
    """A decode step of 3 sequences replayed through the padded bucket-4 template (what a CUDA graph
    captures) gives the eager logits, and the padding row writes only the scratch block."""
    path = make_tiny_checkpoint(ckpt_dir, "llama", seed=3)
    eager, padded = make_runner(path, "triton"), make_runner(path, "triton")
    scratch = 47  # a block no table of the script uses
    graphs = DecodeGraphs(padded._forward, padded.buffers, 8, scratch, BS, capture=False)
    steps = script()
    for step in steps[:2]:  # the prefills
        eager.execute(step)
        padded.execute(step)
    dec = [c for c in steps[2] if c.adapter_slot < 0]  # 3 decode rows without LoRA (graph-eligible)
    dec = [SeqChunk(c.seq_id, c.token_ids[:1], c.start_pos, c.block_table, True, prefix_slots=c.prefix_slots,
                    pos_offset=c.pos_offset) for c in dec]
    want = eager.execute(dec)
    batch = build_step(dec, block_size=BS, num_blocks=padded.info.num_blocks, max_model_len=padded.info.max_model_len,
                       max_adapters=2, hidden=64, vocab_size=padded.spec.vocab_size, device=padded.device,
                       buffers=padded.buffers, paged=True)
    with torch.inference_mode():  # as the runner calls it
        got = graphs.try_run(batch)
    assert got is not None and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert padded.buffers.dev["write_slots"][3].item() == scratch * BS  # row 3 was padding
    for layer in range(padded.spec.num_layers):  # caches agree everywhere but the scratch block
        keep = torch.ones(padded.info.num_blocks, dtype=torch.bool)
        keep[scratch] = False
        torch.testing.assert_close(padded.kv_cache.k[layer][keep], eager.kv_cache.k[layer][keep])
    # a step with a LoRA row is not graph-eligible
    lora_step = build_step([SeqChunk(1, [3], 8, TABLES[1], True, adapter_slot=0)], block_size=BS,
                           num_blocks=padded.info.num_blocks, max_model_len=padded.info.max_model_len, max_adapters=2,
                           hidden=64, vocab_size=padded.spec.vocab_size, device=padded.device,
                           buffers=padded.buffers, paged=True)
    assert graphs.try_run(lora_step) is None


def test_triton_backend_on_cpu_needs_the_interpreter(ckpt_dir: str, monkeypatch) -> None:
    from server.model.runner import resolve_attention_backend

    assert resolve_attention_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_attention_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="attention_backend 'flash'"):
        resolve_attention_backend("flash", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager_on_gpu(ckpt_dir: str) -> None:
    """Decode steps replayed from CUDA graphs (bucket 4) give the eager logits (fp16: the padded batch may
    pick another matmul algorithm, so not bit-identical)."""
    path = make_tiny_checkpoint(ckpt_dir, "llama", seed=3)
    kw = dict(device="cuda", dtype="float16")
    graphed, eager = make_runner(path, "triton", **kw), make_runner(path, "triton", enforce_eager=True, **kw)
    assert graphed.graphs is not None and eager.graphs is None
    for step in script():
        for c in step:  # base and prefix rows only: LoRA steps are not graph-eligible
            c.adapter_slot = -1
        torch.testing.assert_close(graphed.execute(step), eager.execute(step), atol=2e-2, rtol=2e-2)
    assert graphed.graphs.replays >= 2
