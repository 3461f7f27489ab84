"""Per-key limits in memory: token buckets for requests/min and tokens/min, a count of requests in flight.

A bucket holds at most its per-minute capacity and refills continuously (capacity/60 per second), so a key may
burst its whole minute and then runs at the steady rate. Requests take one token at admission. Tokens/min
cannot know a request's size in advance: a request is admitted while the bucket holds at least one token, and
its prompt + generated tokens are taken when it ends (the level may go below zero: the next requests wait
until it refills). `clock` is injectable so tests advance time instead of sleeping.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class TokenBucket:
    """Levels are kept in sixtieths of a token (tokens x 60), so whole seconds of refill add whole units and a
    wait computed from them is exact."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.capacity = per_minute
        self.clock = clock
        self.level60 = float(per_minute * 60)
        self.at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level60 = min(self.capacity * 60.0, self.level60 + (now - self.at) * self.capacity)
        self.at = now

    def wait_for(self, n: int = 1) -> float:
        """Seconds until the bucket holds `n` tokens (0: it does now)."""
        self._refill()
        short = n * 60 - self.level60
        return 0.0 if short <= 0 else short / self.capacity

    def take(self, n: int) -> None:
        self._refill()
        self.level60 -= n * 60


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait - 1e-9))


@dataclass(frozen=True)
class Refusal:
    limit: str  # the limit's name, as in a key's "limits"
    message: str
    retry_after: int  # seconds, for the Retry-After header


class KeyLimiter:
    """One key's buckets and in-flight count; thread-safe (handlers and the middleware share it)."""

    def __init__(self, key_id: str, limits: dict[str, int | None], clock: Callable[[], float]) -> None:
        self.key_id = key_id
        self.limits = limits
        self._lock = threading.Lock()
        rpm, tpm = limits.get("requests_per_minute"), limits.get("tokens_per_minute")
        self.requests = TokenBucket(rpm, clock) if rpm else None
        self.tokens = TokenBucket(tpm, clock) if tpm else None
        self.in_flight = 0

    def admit(self, generation: bool) -> Refusal | None:
        """Count one request in, or say which limit refuses it (nothing is taken on a refusal)."""
        with self._lock:
            conc = self.limits.get("concurrent_requests")
            if conc and self.in_flight >= conc:
                return Refusal("concurrent_requests", f"key {self.key_id} already has {self.in_flight} requests in "
                               f"flight: its limit concurrent_requests is {conc}", 1)
            if generation and self.tokens is not None:
                wait = self.tokens.wait_for(1)
                if wait > 0:
                    return Refusal("tokens_per_minute", f"key {self.key_id} used its tokens_per_minute limit of "
                                   f"{self.tokens.capacity} (prompt + generated tokens); retry in "
                                   f"{_seconds(wait)} s", _seconds(wait))
            if self.requests is not None:
                wait = self.requests.wait_for(1)
                if wait > 0:
                    return Refusal("requests_per_minute", f"key {self.key_id} used its requests_per_minute limit "
                                   f"of {self.requests.capacity}; retry in {_seconds(wait)} s", _seconds(wait))
                self.requests.take(1)
            self.in_flight += 1
            return None

    def done(self, tokens: int) -> None:
        with self._lock:
            self.in_flight -= 1
            if self.tokens is not None and tokens:
                self.tokens.take(tokens)


def monotonic() -> float:
    return time.monotonic()
