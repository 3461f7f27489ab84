"""A prompt-tuning chunk that ends inside the virtual-token region (the step's token budget ran out there)
gets exactly its own token ids. Regression: a negative slice end once gave it most of the prompt, and the
runner refused it with 'block table of 1 blocks x 16 does not cover 78 tokens'."""

from __future__ import annotations

import pytest

from server.engine.block_manager import BlockAllocator
from server.engine.scheduler import Scheduler
from server.engine.sequence import SamplingParams, Sequence
from server.engine.slots import SlotManager


def _seq(n_prompt: int, *, virtual: int = 0, key=None) -> Sequence:
    s = Sequence(request_id=f"r{n_prompt}-{virtual}", prompt_ids=list(range(1, n_prompt + 1)),
                 params=SamplingParams(max_tokens=32), num_virtual=virtual)
    s.adapter_key = key
    return s


@pytest.mark.parametrize("start,n", [(0, 15), (0, 1), (3, 5), (0, 16), (10, 20), (16, 4)])
def test_token_ids_has_n_ids(start: int, n: int) -> None:
    s = _seq(64, virtual=16)
    assert len(s.token_ids(start, n)) == n


def test_budget_running_out_inside_virtual_tokens_gives_a_covered_chunk() -> None:
    """The benchmark's situation: the step's token budget has 15 tokens left when a prompt-tuning
    request (16 virtual + 64 prompt tokens) is admitted, so its first chunk is 15 virtual tokens."""
    bs = 16
    sched = Scheduler(BlockAllocator(64, bs), max_num_seqs=32, max_batch_tokens=64 + 15, slots=SlotManager(4))
    base = _seq(64)
    prompt = _seq(64, virtual=16, key=("pt", 1))
    sched.add(base)
    sched.add(prompt)
    out = sched.schedule()
    c = next(c for c in out.chunks if c.seq is prompt)
    assert (c.start, c.num_tokens) == (0, 15)
    ids = prompt.token_ids(c.start, c.num_tokens)
    end = c.start + len(ids)  # what batch._check computes from the SeqChunk
    assert len(prompt.block_table) * bs >= end, (
        f"block table of {len(prompt.block_table)} blocks x {bs} does not cover {end} tokens")


def test_engine_step_with_real_runner(tmp_path) -> None:
    """Same, through AsyncEngine._model_chunk and the real tiny ModelRunner (the runner's _check)."""
    torch = pytest.importorskip("torch")
    from server.engine.async_engine import AsyncEngine
    from server.engine.registry import AdapterHandle
    from server.families import PROMPT, AdapterSpec
    from server.families.prompt import PromptAdapter
    from server.model.runner import ModelRunner
    from tests.tiny import make_tiny_checkpoint

    runner = ModelRunner(make_tiny_checkpoint(str(tmp_path)), block_size=16, num_blocks=64, max_adapters=4)
    eng = AsyncEngine(runner, max_num_seqs=32, max_batch_tokens=64 + 15)
    loaded = PromptAdapter(family=PROMPT, spec=AdapterSpec("PROMPT_TUNING", None),
                           embeds=torch.randn(16, runner.spec.hidden_size))
    handle = AdapterHandle("pt", 1, loaded)
    base = _seq(64)
    prompt = _seq(64, virtual=16, key=handle.key)
    prompt.adapter, prompt.num_virtual = handle, 16
    eng.scheduler.add(base)
    eng.scheduler.add(prompt)
    out = eng.scheduler.schedule()
    for slot, seq in out.loads:
        eng._load_slot(slot, seq.adapter)
    logits = runner.execute([eng._model_chunk(c) for c in out.chunks])  # once raised "does not cover 78 tokens"
    assert logits.shape[0] == 1  # only the base sequence finished its prompt
