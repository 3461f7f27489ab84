"""One generation request as the scheduler sees it: tokens, KV blocks, adapter, sampling params."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None = off; 0 = chosen token only; N = chosen + top-N
    # Score the prompt (echo, vLLM prompt_logprobs): None = off; 0 = each prompt token only; N = + top-N.
    # With max_tokens 0 the prompt is scored and nothing is generated.
    prompt_logprobs: int | None = None
    # Guided decoding: a compiled grammar (server.structured.grammar.Guide) the output must match; None = free.
    guide: Any = None

    @property
    def greedy(self) -> bool:
        # a temperature this small divides logits into inf/nan; vLLM treats it as greedy too
        return self.temperature < 1e-5 or self.top_k == 1


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """A sequence's token state. `num_computed` tokens have their K/V in `block_table`."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: Any = None  # engine-level adapter handle (None = base); opaque to the scheduler
    adapter_key: Any = None  # hashable id of the adapter version for slot accounting (None = base)
    num_virtual: int = 0  # prompt-tuning virtual tokens placed ahead of the prompt (count in the KV)
    num_prefix: int = 0  # prefix-tuning KV prefix length (shared blocks, not in this sequence's own KV)
    adapter_pages: int = 0  # LoRA pool pages its adapter takes when loaded (server/engine/slots.py)
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: SeqStatus = SeqStatus.WAITING
    arrival: float = field(default_factory=time.monotonic)
    finish_reason: str | None = None
    slot: int = -1  # device slot of the adapter while running (-1 = base / none)
    num_preemptions: int = 0
    # Prefix caching (prefix_cache.py): content keys of the full blocks so far, how many blocks of
    # block_table are registered in the cache, and what the first admission queried / found cached.
    block_keys: list[bytes] = field(default_factory=list)
    num_registered: int = 0
    num_cache_queried: int = 0
    num_cache_hit: int = 0
    # Scheduler steps (Scheduler.step): when the sequence was added, first admitted, and since when it has
    # been waiting for a device adapter slot (-1: not blocked) — the slot-fairness rule reads these.
    arrival_step: int = -1
    admit_step: int = -1
    slot_blocked_since: int = -1
    overtaken_since: int = -1  # first step a younger request was admitted (or took a load) ahead of it

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def cached_prompt_tokens(self) -> int:
        """The user's prompt tokens the prefix cache served at first admission (virtual tokens not counted)."""
        return max(0, min(self.num_cache_hit - self.num_virtual, len(self.prompt_ids)))

    @property
    def num_tokens(self) -> int:
        """Tokens this sequence holds in the KV cache once fully computed (virtual tokens included)."""
        return self.num_virtual + len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, n: int) -> list[int]:
        """Token ids at KV positions [start, start+n); virtual (prompt-tuning) positions read as 0."""
        v = self.num_virtual
        head = [0] * max(0, min(v, start + n) - start)
        return head + self.all_ids[max(start - v, 0):max(start + n - v, 0)]

    @property
    def context_len(self) -> int:
        """Tokens this sequence attends over, counted against max_model_len (prefix and virtual included)."""
        return self.num_prefix + self.num_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
