"""One job's training: a PEFT adapter over the resident base, advanced one bounded micro-step at a time.

A micro-step runs on the engine's worker thread between two serving steps (`AsyncEngine.call_in_worker`):
that thread owns the device and its CPU threads, so training and serving never fight over them, and a
serving step waits for at most one micro-step. Between micro-steps, while requests are in the engine, the
driver waits `d * (1 - share) / share` after a micro-step of `d` seconds, so training takes at most `share`
of the engine thread's time under load, and all of it when the server is idle.

The bound on one micro-step is `max_step_tokens` tokens (`--train-max-step-tokens`): an optimizer step's
batch is cut into micro-steps with gradient accumulation. Short examples are packed, whole, into one
micro-step up to the cap; an example longer than the cap is cut into chunks of at most `max_step_tokens`
tokens, trained exactly (the same gradient as the whole sequence, up to float rounding) by backpropagating
through the key/value cache: forward chunks 1..k-1 without gradient to build the cache (one micro-step
each), then for chunk k down to 1, run it again with the cached keys/values of the chunks before it as
leaf tensors, backward its loss together with the gradient that later chunks sent into its own
keys/values, and pass the leaves' gradient on to the chunks before it. So one micro-step is a forward (and
backward) of at most `max_step_tokens` query tokens attending over at most max_model_len positions.
Prompt- and prefix-tuning jobs (PEFT's own forward puts the virtual tokens in front) are packed but not
cut: there a micro-step is one whole example when it is longer than the cap; so is an example longer than
the model's sliding window (Mistral-style), which the full cache used here would not reproduce.
"""

from __future__ import annotations

import functools
import inspect
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


BASE_LEARNING_RATES = {"LORA": BASE_LEARNING_RATE, "PROMPT_TUNING": 3e-2, "PREFIX_TUNING": 1e-2}
DEFAULT_MAX_STEP_TOKENS = 256


@dataclass
class Hyper:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    seed: int
    base_learning_rate: float = BASE_LEARNING_RATE

    @property
    def learning_rate(self) -> float:
        return self.base_learning_rate * self.learning_rate_multiplier


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    total_steps: int = 0
    micro: int = 0  # micro-steps done
    trained_tokens: int = 0
    losses: list[float] = field(default_factory=list)  # mean train loss of each optimizer step
    train_seconds: float = 0.0  # time spent in micro-steps on the engine thread
    largest_micro_tokens: int = 0  # most tokens one micro-step ran (at most max_step_tokens when splittable)
    longest_micro_seconds: float = 0.0  # the longest one micro-step held the engine thread


@dataclass
class _Unit:
    """One micro-step's work: whole examples ("whole"), or chunk [start, end) of one long example run
    forward to fill the cache ("fwd") or run again with gradient ("bwd")."""

    kind: str
    examples: list[Example]
    start: int = 0
    end: int = 0

    @property
    def tokens(self) -> int:
        return self.end - self.start if self.kind != "whole" else sum(len(e.ids) for e in self.examples)


class Trainer:
    """Drives `model` (a peft model over the resident base) through `examples` for n_epochs.

    `virtual_tokens`: positions PEFT's prompt tuning puts ahead of the logits (0 otherwise); `can_split`:
    whether a long example may be cut into chunks (LoRA: yes; prompt/prefix tuning: no).
    """

    def __init__(self, model: torch.nn.Module, examples: list[Example], hyper: Hyper, *,
                 max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS, virtual_tokens: int = 0,
                 can_split: bool = True) -> None:
        if max_step_tokens < 2:
            raise ValueError(f"max_step_tokens {max_step_tokens} must be >= 2")
        self.model = model
        self.examples = examples
        self.hyper = hyper
        self.max_step_tokens = max_step_tokens
        self.virtual_tokens = virtual_tokens
        self.can_split = can_split
        self.window = getattr(getattr(model, "config", None), "sliding_window", None)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the adapter has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=hyper.learning_rate, weight_decay=0.0)
        self.rng = random.Random(hyper.seed)
        self.steps_per_epoch = math.ceil(len(examples) / hyper.batch_size)
        self.progress = Progress(total_steps=self.steps_per_epoch * hyper.n_epochs)
        self._order: list[int] = []
        self._units: list[_Unit] = []
        self._batch_len = 0
        self._batch_loss = 0.0
        self._cache: Any = None  # the long example's key/value cache (DynamicCache), while it is chunked
        self._grads: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # d loss / d (its keys, values)
        self.device = next(iter(self.params)).device

    @property
    def done(self) -> bool:
        return self.progress.step >= self.progress.total_steps

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return self.progress.step // self.steps_per_epoch

    def plan(self, batch: list[Example], *, grad: bool = True) -> list[_Unit]:
        """The micro-steps of one batch: whole examples packed up to the cap, long ones cut into chunks."""
        cap, units, pack, size = self.max_step_tokens, [], [], 0
        for ex in batch:
            n = len(ex.ids) + self.virtual_tokens
            # a sliding window shorter than the example would need a windowed cache: such examples are not cut
            if n > cap and self.can_split and (not self.window or self.window >= len(ex.ids)):
                if pack:
                    units.append(_Unit("whole", pack))
                    pack, size = [], 0
                bounds = [(s, min(s + cap, len(ex.ids))) for s in range(0, len(ex.ids), cap)]
                units += [_Unit("fwd", [ex], s, e) for s, e in bounds[:-1]]  # the last chunk's K/V serve no one
                if grad:
                    units += [_Unit("bwd", [ex], s, e) for s, e in reversed(bounds)]
                else:  # evaluation: the forward chunks give the loss as they go, the last one too
                    units.append(_Unit("fwd", [ex], *bounds[-1]))
                continue
            if pack and size + n > cap:
                units.append(_Unit("whole", pack))
                pack, size = [], 0
            pack.append(ex)
            size += n
        if pack:
            units.append(_Unit("whole", pack))
        return units

    def micro_step(self) -> float | None:
        """One micro-step (on the engine thread): at most `max_step_tokens` tokens forward and backward. The
        batch's mean loss when it ended an optimizer step, else None."""
        t0 = time.monotonic()
        p = self.progress
        if not self._units:
            in_epoch = p.step % self.steps_per_epoch
            if in_epoch == 0:
                self._order = list(range(len(self.examples)))
                self.rng.shuffle(self._order)
            lo = in_epoch * self.hyper.batch_size
            batch = [self.examples[i] for i in self._order[lo:lo + self.hyper.batch_size]]
            self._batch_len, self._batch_loss = len(batch), 0.0
            self._units = self.plan(batch)
        unit = self._units.pop(0)
        self.model.train()
        self._batch_loss += self._run(unit, scale=1.0 / self._batch_len, grad=True)
        p.micro += 1
        p.largest_micro_tokens = max(p.largest_micro_tokens, unit.tokens)
        if unit.kind != "fwd":
            p.trained_tokens += unit.tokens
        out = None
        if not self._units:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            out = self._batch_loss / self._batch_len
            p.losses.append(out)
            p.step += 1
        took = time.monotonic() - t0
        p.train_seconds += took
        p.longest_micro_seconds = max(p.longest_micro_seconds, took)
        return out

    def _run(self, unit: _Unit, *, scale: float, grad: bool) -> float:
        """Run one unit; backward (its loss times `scale`) when `grad`. Returns the loss it adds."""
        if unit.kind == "whole":
            total = 0.0
            for ex in unit.examples:
                if grad:
                    loss = example_loss(self.model, ex, self.device, self.virtual_tokens)
                    (loss * scale).backward()
                else:
                    with torch.no_grad():
                        loss = example_loss(self.model, ex, self.device, self.virtual_tokens)
                total += float(loss.detach())
            return total
        ex = unit.examples[0]
        if unit.kind == "fwd":
            with torch.no_grad():
                if unit.start == 0:
                    from transformers import DynamicCache

                    self._cache = DynamicCache()
                if grad:  # only the cache is wanted: no logits beyond the last position
                    self.model(input_ids=torch.tensor([ex.ids[unit.start:unit.end]], device=self.device),
                               position_ids=torch.arange(unit.start, unit.end, device=self.device)[None],
                               use_cache=True, logits_to_keep=1, **{_cache_kwarg(self.model): self._cache})
                    return 0.0
                loss = _chunk_loss(self.model, ex, unit.start, unit.end, self._cache, self.device)
                if unit.end == len(ex.ids):  # evaluation's last chunk: the example is done
                    self._cache = None
            return float(loss)
        return self._backward_chunk(ex, unit.start, unit.end, scale)

    def _backward_chunk(self, ex: Example, start: int, end: int, scale: float) -> float:
        """Chunk [start, end) of `ex` with gradient, over the cached keys/values of the chunks before it."""
        from transformers import DynamicCache

        leaves = []
        if start > 0:
            for layer in self._cache.layers:
                leaves.append((layer.keys[:, :, :start].detach().clone().requires_grad_(True),
                               layer.values[:, :, :start].detach().clone().requires_grad_(True)))
        cache = DynamicCache(ddp_cache_data=leaves) if leaves else DynamicCache()
        loss = _chunk_loss(self.model, ex, start, end, cache, self.device)
        outputs, grads = [loss * scale], [torch.ones((), device=loss.device)]
        if end < len(ex.ids):  # later chunks attended over this chunk's keys/values: their gradient
            assert self._grads is not None
            for layer, (gk, gv) in zip(cache.layers, self._grads, strict=True):
                outputs += [layer.keys[:, :, start:end], layer.values[:, :, start:end]]
                grads += [gk[:, :, start:end], gv[:, :, start:end]]
        torch.autograd.backward(outputs, grads)
        if start > 0:
            if self._grads is None:
                full = lambda t: t.new_zeros(*t.shape[:2], len(ex.ids), *t.shape[3:])  # noqa: E731
                self._grads = [(full(lk), full(lv)) for lk, lv in leaves]
            for (gk, gv), (lk, lv) in zip(self._grads, leaves, strict=True):
                gk[:, :, :start] += lk.grad
                gv[:, :, :start] += lv.grad
        else:
            self._cache, self._grads = None, None
        return float(loss.detach())

    def evaluation(self, examples: list[Example]) -> Evaluation:
        """Validation loss over `examples`, one bounded forward-only micro-step at a time."""
        return Evaluation(self, self.plan(examples, grad=False), len(examples))


class Evaluation:
    """The mean loss of a validation set, advanced by `step()` (each run on the engine thread)."""

    def __init__(self, trainer: Trainer, units: list[_Unit], count: int) -> None:
        self.trainer, self.units, self.count, self.total = trainer, units, count, 0.0

    @property
    def done(self) -> bool:
        return not self.units

    def step(self) -> None:
        t = self.trainer
        t.model.eval()
        unit = self.units.pop(0)
        self.total += t._run(unit, scale=1.0, grad=False)
        t.progress.largest_micro_tokens = max(t.progress.largest_micro_tokens, unit.tokens)

    @property
    def mean(self) -> float:
        return self.total / max(1, self.count)


@functools.cache
def _cache_kwarg_of(forward: Any) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The HF forward's name for the key/value cache (`cache` from transformers 5.x, `past_key_values` before)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_kwarg_of(type(base).forward)


def _chunk_loss(model: torch.nn.Module, ex: Example, start: int, end: int, cache: Any,
                device: torch.device) -> torch.Tensor:
    """Tokens [start, end) of `ex` over `cache` (the keys/values of [0, start); it grows to `end`): their part of
    the example's loss, so the parts sum to `example_loss`."""
    ids = torch.tensor([ex.ids[start:end]], dtype=torch.long, device=device)
    pos = torch.arange(start, end, device=device)[None]
    kw = {_cache_kwarg(model): cache}
    logits = model(input_ids=ids, position_ids=pos, use_cache=True, **kw).logits[0].float()
    stop = min(end + 1, len(ex.ids))  # targets: the next token of each position, within the example
    targets = torch.tensor(ex.ids[start + 1:stop], dtype=torch.long, device=device)
    weights = torch.tensor(ex.weights[start + 1:stop], dtype=torch.float32, device=device)
    ce = F.cross_entropy(logits[:stop - start - 1], targets, reduction="none")
    return (ce * weights).sum() / max(1.0, sum(ex.weights[1:]))


def example_loss(model: torch.nn.Module, ex: Example, device: torch.device, virtual_tokens: int = 0) -> torch.Tensor:
    """Weighted next-token cross-entropy: only the assistant's tokens (weight > 0) count. `virtual_tokens`:
    logits PEFT's prompt tuning puts ahead of the example's (skipped)."""
    ids = torch.tensor([ex.ids], dtype=torch.long, device=device)
    logits = model(input_ids=ids).logits[0, virtual_tokens:-1].float()
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
