"""The token cap on one training micro-step (`--train-max-step-tokens`): a batch is cut into micro-steps of at
most N tokens (short examples packed, long ones chunked through the key/value cache), and training is the
same as without the cap: the same losses and the same adapter weights, up to float rounding (fp32).
"""

from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model

from server.train.dataset import Example
from server.train.trainer import Hyper, Trainer
from tests.adapters import load_base
from tests.tiny import make_tiny_checkpoint


def examples(n: int, lengths: tuple[int, int], seed: int = 3) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        size = rng.randint(*lengths)
        prompt = rng.randint(2, size // 2)
        ids = [rng.randrange(3, 250) for _ in range(size)]
        out.append(Example(ids, [0.0] * prompt + [1.0] * (size - prompt)))
    return out


@pytest.fixture(scope="module")
def base_dir(tiny_root: str) -> str:
    return make_tiny_checkpoint(tiny_root, "llama", seed=5)


def train(base_dir: str, data: list[Example], cap: int, steps: int, batch: int = 3) -> Trainer:
    torch.manual_seed(0)
    model = get_peft_model(load_base(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj",
                           "v_proj", "o_proj", "down_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    t = Trainer(model, data, Hyper(n_epochs=4, batch_size=batch, learning_rate_multiplier=5.0, seed=1),
                max_step_tokens=cap)
    while t.progress.step < steps:
        t.micro_step()
    return t


def lora_state(t: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}


def test_long_examples_are_chunked_and_train_exactly_as_whole(base_dir: str) -> None:
    data = examples(6, (40, 90))
    start = lora_state(train(base_dir, data, cap=512, steps=0))
    whole = train(base_dir, data, cap=512, steps=4)
    capped = train(base_dir, data, cap=16, steps=4)
    # the cap held: every micro-step ran at most 16 tokens, so more micro-steps than examples
    assert whole.progress.largest_micro_tokens > 40
    assert capped.progress.largest_micro_tokens <= 16
    assert capped.progress.micro > 3 * whole.progress.micro
    assert capped.progress.trained_tokens == whole.progress.trained_tokens  # every token trained once
    # same losses, same weights: the chunked backward is the whole sequence's gradient
    assert torch.allclose(torch.tensor(capped.progress.losses), torch.tensor(whole.progress.losses), rtol=1e-4)
    assert whole.progress.losses[-1] < whole.progress.losses[0]
    a, b = lora_state(whole), lora_state(capped)
    moved = max(float((a[n] - start[n]).abs().max()) for n in a)
    assert moved > 1e-3  # training changed the weights, so equal weights mean equal updates
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-3, atol=1e-5), n


def test_short_examples_are_packed_up_to_the_cap(base_dir: str) -> None:
    data = examples(8, (10, 14))
    t = Trainer(get_peft_model(load_base(base_dir), LoraConfig(r=2, target_modules=["q_proj"],
                                                               task_type="CAUSAL_LM")),
                data, Hyper(n_epochs=1, batch_size=8, learning_rate_multiplier=1.0, seed=0), max_step_tokens=30)
    units = t.plan(data)
    assert [u.kind for u in units] == ["whole"] * len(units)
    assert all(u.tokens <= 30 for u in units) and sum(len(u.examples) for u in units) == 8
    assert len(units) == 4  # two examples of 10-14 tokens a micro-step
    while not t.done:
        t.micro_step()
    assert t.progress.micro == 4 and t.progress.step == 1 and t.progress.largest_micro_tokens <= 30


def test_validation_is_chunked_too_and_gives_the_whole_loss(base_dir: str) -> None:
    data = examples(3, (50, 70))
    torch.manual_seed(0)
    model = get_peft_model(load_base(base_dir), LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False,
                                                           task_type="CAUSAL_LM"))
    losses = {}
    for cap in (512, 12):
        t = Trainer(model, data, Hyper(1, 1, 1.0, 0), max_step_tokens=cap)
        ev = t.evaluation(data)
        steps = 0
        while not ev.done:
            ev.step()
            steps += 1
        losses[cap] = (ev.mean, steps, t.progress.largest_micro_tokens)
    assert losses[512][1] == 1 and losses[12][1] >= 3 * 5 and losses[12][2] <= 12
    assert abs(losses[512][0] - losses[12][0]) < 1e-4 * losses[512][0]
