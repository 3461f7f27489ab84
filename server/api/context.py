"""What a generation handler tells the operations middleware about its request (no body sniffing).

The handler puts one `GenerationContext` on `request.state.generation` as soon as it has the body, and
fills it in as it learns more; the middleware reads it when the response ends, for the request log
line and the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STATE_KEY = "generation"


@dataclass
class GenerationContext:
    model: str | None  # the body's "model" as sent (None: the base model by default)
    resolved: bool = False  # the model resolved to the base or a served adapter
    adapter: str | None = None  # the adapter it resolved to (None: the base model)
    response_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    complete: bool = False  # the whole answer was produced (a stream reached its end)
    streaming: bool = False


def context_of(scope: dict[str, Any]) -> GenerationContext | None:
    """The handler's context of an ASGI request, if it set one (`request.state` lives in scope["state"])."""
    state = scope.get("state")
    ctx = state.get(STATE_KEY) if isinstance(state, dict) else None
    return ctx if isinstance(ctx, GenerationContext) else None
