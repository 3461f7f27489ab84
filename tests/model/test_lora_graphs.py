"""Decode steps with LoRA rows through the decode-graph path (`server/model/cuda_graphs.py`), proven on CPU.

torch on the CPU cannot capture a CUDA graph, so the runner's `graph_template` runs each eligible decode
step through the padded bucket template a graph would capture: every index tensor and the fixed-shape
LoRA metadata (`kernels/capturable.py`) are views of the preallocated step buffers, and the LoRA kernels
are the fixed-shape Triton launches (interpreter). Held to the twin runner (torch attention, CPU LoRA
backend): greedy tokens over mixed adapters of different ranks and target modules must be the same.
"""

from __future__ import annotations

import pytest
import torch

from kernels import FixedLoRAMeta, LoRAMeta
from kernels.capturable import fixed_tiles, max_fixed_tiles
from server.families import LORA, AdapterSpec
from server.families.lora import LoraAdapter, LoraModuleWeights
from server.model.runner import ModelRunner, SeqChunk
from tests.kernels.test_paged_lora import needs_interp
from tests.model.helpers import random_prompts, shuffled_tables
from tests.tiny import make_tiny_checkpoint

pytestmark = needs_interp

BS = 4
SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
          "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
# slot -> (rank, target modules): different ranks and module sets, so per-module ranks differ by slot
ADAPTERS = {0: (4, ("q_proj", "v_proj", "down_proj")), 1: (8, ("k_proj", "o_proj", "up_proj")),
            2: (2, tuple(n for n in SHAPES if n != "gate_proj"))}
LATE = (6, ("q_proj", "gate_proj"))  # loaded into slot 3 mid-run: gate_proj is a module no adapter had
SEQ_SLOTS = [-1, 0, 1, 2, 0, 1]  # base, three adapters, repeats


def _adapter(rank: int, targets: tuple[str, ...], num_layers: int, seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = {(layer, n): LoraModuleWeights(torch.randn(rank, SHAPES[n][0], generator=g) * 0.3,
                                             torch.randn(SHAPES[n][1], rank, generator=g) * 0.3, 1.5)
               for layer in range(num_layers) for n in targets}
    return LoraAdapter(family=LORA, spec=AdapterSpec("LORA", None), modules=modules)


def _runner(path: str, **kw) -> ModelRunner:
    r = ModelRunner(path, block_size=BS, num_blocks=64, max_adapters=4, max_rank=8, max_num_seqs=8,
                    max_batch_tokens=64, **kw)
    for slot, (rank, targets) in ADAPTERS.items():
        r.load_adapter(slot, _adapter(rank, targets, r.spec.num_layers, seed=slot))
    return r


def _greedy(r: ModelRunner, steps: int, late_at: int, seq_slots: list[int] = SEQ_SLOTS,
            force: list[list[int]] | None = None, logits_out: list | None = None) -> list[list[int]]:
    """Prefill all sequences in one step, then `steps` greedy decode steps of all; slot 3 gets an adapter
    before decode step `late_at` and the last sequence switches to it. `force`: feed these tokens instead of
    the argmax (teacher forcing); `logits_out` collects each step's logits."""
    prompts = random_prompts([5, 3, 6, 4, 5, 2], seed=11)
    tables = shuffled_tables(len(prompts), 5, 60, seed=1)
    slots = list(seq_slots)
    logits = r.execute([SeqChunk(i, p, 0, tables[i], True, adapter_slot=slots[i]) for i, p in enumerate(prompts)])
    if logits_out is not None:
        logits_out.append(logits)
    toks = [[int(t)] for t in logits.argmax(-1)] if force is None else [[f[0]] for f in force]
    lens = [len(p) for p in prompts]
    for step in range(steps):
        if step == late_at:
            r.load_adapter(3, _adapter(*LATE, r.spec.num_layers, seed=9))
            slots[-1] = 3
        chunks = [SeqChunk(i, [toks[i][-1]], lens[i], tables[i], True, adapter_slot=slots[i])
                  for i in range(len(prompts))]
        logits = r.execute(chunks)
        if logits_out is not None:
            logits_out.append(logits)
        for i, t in enumerate(logits.argmax(-1).tolist()):
            toks[i].append(t if force is None else force[i][step + 1])
            lens[i] += 1
    return toks


@pytest.fixture(scope="module")
def ckpt(ckpt_dir: str) -> str:
    return make_tiny_checkpoint(ckpt_dir, "llama", seed=3)


def test_graph_template_lora_decode_gives_the_twins_tokens(ckpt: str) -> None:
    twin = _runner(ckpt, attention_backend="torch")
    graphed = _runner(ckpt, attention_backend="triton", graph_template=True)
    base = _runner(ckpt, attention_backend="torch")
    for s in range(4):
        base.clear_slot(s)
    want = _greedy(twin, 6, late_at=3)
    sig = graphed._graph_signature()
    got = _greedy(graphed, 6, late_at=3)
    assert graphed._graph_signature() != sig  # gate_proj's allocation would re-capture a LoRA graph on CUDA
    plain = _greedy(base, 6, late_at=99, seq_slots=[-1] * 6)
    # every adapter changes its sequences' tokens (else the match below proves nothing about LoRA)
    assert all(want[i] != plain[i] for i in range(1, 6)), (want, plain)
    assert want[0] == plain[0]
    assert got == want
    g = graphed.graphs
    assert g is not None and g.lora_replays == 6 and g.replays == 6  # every decode step took the LoRA template
    assert graphed.buffers.grows == 0


def test_template_inputs_live_in_the_buffers_and_hold_the_step(ckpt: str) -> None:
    """What a graph would capture: the fixed LoRA metadata of every step is the same buffer views (no per-step
    allocation of metadata), holding the step's tiles followed by empty tiles up to the bucket's count."""
    r = _runner(ckpt, attention_backend="triton", graph_template=True)
    owned = r.buffers.storages()
    seen: list = []
    forward = r.graphs.forward

    def record(batch):  # observes the template the graph path runs, then runs it
        seen.append((batch, batch.lora_fixed.tiles.clone() if batch.lora_fixed is not None else None,
                     batch.lora_fixed.token_indices.clone() if batch.lora_fixed is not None else None))
        return forward(batch)

    r.graphs.forward = record
    built: list = []
    execute_build = __import__("server.model.runner", fromlist=["build_step"]).build_step

    def spy(*a, **kw):  # the step's own (host) segments, to check the buffers against
        b = execute_build(*a, **kw)
        built.append(b)
        return b

    import server.model.runner as runner_mod
    runner_mod.build_step, old = spy, runner_mod.build_step
    try:
        _greedy(r, 4, late_at=2)
    finally:
        runner_mod.build_step = old
    assert len(seen) == 4
    ptrs = set()
    for (batch, tiles, idx), step in zip(seen, built[1:], strict=True):
        fm = batch.segments
        assert isinstance(fm, FixedLoRAMeta) and fm is batch.lora_fixed
        assert fm.tiles.untyped_storage().data_ptr() in owned and fm.token_indices.untyped_storage().data_ptr() in owned
        ptrs.add((fm.tiles.data_ptr(), fm.token_indices.data_ptr(), fm.tiles.shape))
        meta: LoRAMeta = step.segments
        real = fixed_tiles(meta)
        assert fm.tiles.shape[0] == max_fixed_tiles(8, 4)  # 6 sequences pad to the bucket of 8
        assert tiles[:len(real)].tolist() == [list(t) for t in real]
        assert tiles[len(real):].abs().sum() == 0  # padding tiles: m_len 0
        assert idx[:len(meta.token_indices)].tolist() == meta.token_indices.tolist()
        # rows 6 and 7 of the bucket are padding: in no tile
        assert all(int(idx[t[0] + j]) < 6 for t in real for j in range(t[1]))
    assert len(ptrs) == 1  # the same addresses every step, as a replayed graph needs
    assert r.buffers.storages() == owned and r.buffers.grows == 0


def test_smaller_step_pads_stale_tiles_to_the_bucket(ckpt: str) -> None:
    """A 4-adapter decode step leaves 4 real tiles in the buffer; a following 3-row step (bucket 4) must see
    tile 3 emptied, not the stale tile of the step before, and still give the twin's logits."""
    r = _runner(ckpt, attention_backend="triton", graph_template=True)
    twin = _runner(ckpt, attention_backend="torch")
    for x in (r, twin):
        x.load_adapter(3, _adapter(*LATE, x.spec.num_layers, seed=9))
    seen: list = []
    forward = r.graphs.forward
    r.graphs.forward = lambda b: (seen.append(b.segments.tiles.clone()), forward(b))[1]
    prompts = random_prompts([3, 4, 2, 5], seed=5)
    tables = shuffled_tables(4, 3, 60, seed=6)
    pre = [SeqChunk(i, p, 0, tables[i], True, adapter_slot=i) for i, p in enumerate(prompts)]
    dec4 = [SeqChunk(i, [9], len(p), tables[i], True, adapter_slot=i) for i, p in enumerate(prompts)]
    dec3 = [SeqChunk(i, [11], len(p) + 1, tables[i], True, adapter_slot=i) for i, p in enumerate(prompts[:3])]
    for step in (pre, dec4, dec3):
        torch.testing.assert_close(r.execute(step), twin.execute(step), atol=1e-4, rtol=1e-4)
    assert len(seen) == 2
    assert int(seen[0][3, 1]) == 1  # the 4-adapter step's 4th tile is real
    assert seen[1].shape[0] == max_fixed_tiles(4, 4) == 4
    assert seen[1][3].abs().sum() == 0  # emptied for the 3-row step


def test_mixed_families_and_prefill_steps_stay_eager(ckpt: str) -> None:
    """Steps with a multi-token chunk are not graph steps (no fixed metadata is built for them)."""
    r = _runner(ckpt, attention_backend="triton", graph_template=True)
    prompts = random_prompts([5, 2], seed=3)
    tables = shuffled_tables(2, 3, 60, seed=2)
    r.execute([SeqChunk(0, prompts[0], 0, tables[0], True, adapter_slot=0),
               SeqChunk(1, prompts[1], 0, tables[1], True, adapter_slot=1)])
    assert r.graphs.replays == 0
    r.execute([SeqChunk(0, [1], 5, tables[0], True, adapter_slot=0), SeqChunk(1, [2, 3], 2, tables[1], True)])
    assert r.graphs.replays == 0
    r.execute([SeqChunk(0, [1], 6, tables[0], True, adapter_slot=0), SeqChunk(1, [2], 4, tables[1], True)])
    assert r.graphs.replays == 1 and r.graphs.lora_replays == 1


def test_dora_rows_keep_decode_steps_eager(ckpt: str) -> None:
    """DoRA's slots extend LoRA's but are not capturable (its row scale reads host segments): a decode step with
    a DoRA row runs eagerly and gives the twin's logits; the same step without it takes the LoRA template."""
    from server.families import DORA
    from server.families.dora import DoraAdapter

    def dora(r: ModelRunner) -> DoraAdapter:
        lora = _adapter(4, ("q_proj", "up_proj"), r.spec.num_layers, seed=5)
        g = torch.Generator().manual_seed(6)
        mags = {k: torch.rand(SHAPES[k[1]][1], generator=g) + 0.5 for k in lora.modules}
        return DoraAdapter(family=DORA, spec=lora.spec, modules=lora.modules, magnitudes=mags)

    twin, graphed = _runner(ckpt, attention_backend="torch"), _runner(ckpt, attention_backend="triton",
                                                                       graph_template=True)
    for r in (twin, graphed):
        r.load_adapter(3, dora(r))
    prompts = random_prompts([4, 3], seed=8)
    tables = shuffled_tables(2, 3, 60, seed=4)
    slots = [0, 3]
    step = [SeqChunk(i, p, 0, tables[i], True, adapter_slot=slots[i]) for i, p in enumerate(prompts)]
    torch.testing.assert_close(graphed.execute(step), twin.execute(step), atol=1e-4, rtol=1e-4)
    dec = [SeqChunk(i, [7], len(p), tables[i], True, adapter_slot=slots[i]) for i, p in enumerate(prompts)]
    torch.testing.assert_close(graphed.execute(dec), twin.execute(dec), atol=1e-4, rtol=1e-4)
    assert graphed.graphs.replays == 0  # the DoRA row kept the step eager
    dec = [SeqChunk(0, [8], 5, tables[0], True, adapter_slot=0)]
    torch.testing.assert_close(graphed.execute(dec), twin.execute(dec), atol=1e-4, rtol=1e-4)
    assert graphed.graphs.lora_replays == 1


def test_graph_template_needs_the_triton_backend(ckpt: str) -> None:
    with pytest.raises(ValueError, match="graph_template needs attention_backend 'triton'"):
        ModelRunner(ckpt, block_size=BS, num_blocks=16, attention_backend="torch", graph_template=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_lora_decode_equals_eager_on_gpu(ckpt: str) -> None:
    """Captured LoRA decode graphs (real capture; fixed and fused launches) give the eager runner's logits on the
    eager runner's tokens (fp16: other kernels, so not bit-identical), re-capturing after slot 3's adapter
    allocates new modules."""
    kw = dict(device="cuda", dtype="float16", attention_backend="triton")
    graphed, eager = _runner(ckpt, **kw), _runner(ckpt, enforce_eager=True, **kw)
    want: list = []
    toks = _greedy(eager, 6, late_at=3, logits_out=want)
    got: list = []
    _greedy(graphed, 6, late_at=3, force=toks, logits_out=got)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
    assert graphed.graphs.lora_replays == 6 and graphed.graphs.captures >= 2
