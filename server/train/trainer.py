"""One job's training: a PEFT adapter over the resident base, advanced one micro-step at a time.

A micro-step (forward + backward of one example) runs on the engine's worker thread between two serving
steps (`AsyncEngine.call_in_worker`): that thread owns the device and its CPU threads, so training and
serving never fight over them, and the serving step never waits for more than one micro-step. Between
micro-steps, while requests are in the engine, the driver waits `d * (1 - share) / share` after a
micro-step of `d` seconds, so training takes at most `share` of the engine thread's time under load, and
all of it when the server is idle.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from server.train.dataset import Example

BASE_LEARNING_RATE = 1e-3  # learning_rate_multiplier 1.0; LoRA on small models wants ~1e-4..1e-3


class EngineStopped(RuntimeError):
    """The engine's worker thread is gone: nothing can run a micro-step any more."""


def run_on_engine(engine: Any, fn: Callable[[], Any], poll: float = 0.5) -> Any:
    """Run fn on the engine's worker thread between two steps and return its result (or raise its error)."""
    done = threading.Event()
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - an error of ours must never kill the engine loop
            box["error"] = e
        finally:
            done.set()

    engine.call_in_worker(call)
    while not done.wait(poll):
        if not engine.alive:
            raise EngineStopped("the engine stopped while a training step waited for it")
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass
class Hyper:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    seed: int

    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    total_steps: int = 0
    micro: int = 0  # micro-steps done
    trained_tokens: int = 0
    losses: list[float] = field(default_factory=list)  # mean train loss of each optimizer step
    train_seconds: float = 0.0  # time spent in micro-steps on the engine thread


class Trainer:
    """Drives `model` (a peft model over the resident base) through `examples` for n_epochs."""

    def __init__(self, model: torch.nn.Module, examples: list[Example], hyper: Hyper) -> None:
        self.model = model
        self.examples = examples
        self.hyper = hyper
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the adapter has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=hyper.learning_rate, weight_decay=0.0)
        self.rng = random.Random(hyper.seed)
        self.steps_per_epoch = math.ceil(len(examples) / hyper.batch_size)
        self.progress = Progress(total_steps=self.steps_per_epoch * hyper.n_epochs)
        self._order: list[int] = []
        self._epoch = -1
        self._batch_loss = 0.0
        self._in_batch = 0
        self.device = next(iter(self.params)).device

    @property
    def done(self) -> bool:
        return self.progress.step >= self.progress.total_steps

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return self.progress.step // self.steps_per_epoch

    def micro_step(self) -> float | None:
        """One example forward + backward (on the engine thread); the mean loss when it ended an optimizer
        step, else None."""
        t0 = time.monotonic()
        p = self.progress
        pos = (p.step % self.steps_per_epoch) * self.hyper.batch_size + self._in_batch
        if pos == 0 and self._in_batch == 0:
            self._order = list(range(len(self.examples)))
            self.rng.shuffle(self._order)
        batch_len = min(self.hyper.batch_size, len(self.examples) - (p.step % self.steps_per_epoch)
                        * self.hyper.batch_size)
        ex = self.examples[self._order[pos]]
        self.model.train()
        loss = example_loss(self.model, ex, self.device)
        (loss / batch_len).backward()
        self._batch_loss += float(loss.detach())
        self._in_batch += 1
        p.micro += 1
        p.trained_tokens += len(ex.ids)
        out = None
        if self._in_batch == batch_len:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            out = self._batch_loss / batch_len
            p.losses.append(out)
            p.step += 1
            self._batch_loss, self._in_batch = 0.0, 0
        p.train_seconds += time.monotonic() - t0
        return out

    @torch.no_grad()
    def evaluate(self, examples: list[Example]) -> float:
        """Mean loss over `examples` (validation), run like a micro-step without the backward."""
        self.model.eval()
        losses = [float(example_loss(self.model, ex, self.device)) for ex in examples]
        return sum(losses) / max(1, len(losses))


def example_loss(model: torch.nn.Module, ex: Example, device: torch.device) -> torch.Tensor:
    """Weighted next-token cross-entropy: only the assistant's tokens (weight > 0) count."""
    ids = torch.tensor([ex.ids], dtype=torch.long, device=device)
    logits = model(input_ids=ids).logits[0, :-1].float()
    weights = torch.tensor(ex.weights[1:], dtype=torch.float32, device=device)
    ce = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    return (ce * weights).sum() / weights.sum().clamp_min(1.0)


class ShareGovernor:
    """Keeps training at most `share` of the engine thread's time while requests are waiting."""

    def __init__(self, engine: Any, share: float, stop: threading.Event) -> None:
        self.engine = engine
        self.share = share
        self.stop = stop
        self.waited = 0.0

    def after(self, seconds: float) -> None:
        """Called after a micro-step of `seconds`: yield the engine its part while it has work."""
        owed = seconds * (1.0 - self.share) / self.share
        while owed > 0 and self.engine.num_requests > 0 and not self.stop.is_set():
            t0 = time.monotonic()
            time.sleep(min(owed, 0.005))
            dt = time.monotonic() - t0
            owed -= dt
            self.waited += dt
