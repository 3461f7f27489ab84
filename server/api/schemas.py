"""Request bodies of the OpenAI-compatible routes (pydantic), with vLLM's extensions."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from server.api.structured_fields import GuidedFields, ToolFields, ToolMessageFields
from server.compose.schema import CompositionFields


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingFields(CompositionFields, GuidedFields):  # + adapters/merge/lora_scale (server/compose), guided_*
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: StrictInt | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: StrictInt = 0  # vLLM extension; 0 or -1 = off
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False  # vLLM extension
    min_tokens: Annotated[int, Field(ge=0)] = 0  # vLLM extension
    return_token_ids: StrictBool = False  # vLLM extension
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or >= 1, got {v}")
        return max(v, 0)

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError(f"penalties are not supported; got {v}, only 0 is accepted")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    # one prompt: a string or token ids; a list of one string or one token-id list (lm-eval sends these)
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: StrictBool = False  # the choice's text (and logprobs) start with the prompt's
    prompt_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None  # vLLM extension: score the prompt

    @property
    def scores_prompt(self) -> bool:
        """Whether the prompt's tokens are scored (echo with logprobs, or vLLM's prompt_logprobs)."""
        return (self.echo and self.logprobs is not None) or self.prompt_logprobs is not None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(ToolMessageFields):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)  # as vLLM joins text parts for string templates


class ChatCompletionRequest(ToolFields, SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: StrictBool = True
