"""Request and response bodies of the OpenAI API subset the server speaks, as pydantic models.

Requests are validated strictly (``"5"`` is not a number) and unknown top-level fields are refused,
as OpenAI does, so a client never believes a setting took effect when it did not. Fields OpenAI has
but this server cannot honour are declared, so that ``unsupported`` can name them in a 400.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from medusa.decoding import MAX_TOP_LOGPROBS

MAX_STOP_STRINGS = 4  # OpenAI's limit


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(RequestModel):
    include_usage: bool = False


class ChatMessage(BaseModel):
    # Messages a client echoes back from a response carry extra null fields (refusal, annotations, ...).
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Any
    name: str | None = None
    tool_calls: list[Any] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def text_content(cls, value: Any) -> str:
        """Content is a string or a list of text parts; the parts are joined."""
        if isinstance(value, str):
            return value
        if value is None:
            raise ValueError("content is required (a string or a list of text parts)")
        if isinstance(value, list):
            texts = []
            for part in value:
                if not isinstance(part, dict) or "type" not in part:
                    raise ValueError('each content part is an object like {"type": "text", "text": "..."}')
                if part["type"] != "text":
                    raise ValueError(f"content parts of type {part['type']!r} are not supported; only 'text' is")
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs a string 'text'")
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("content must be a string or a list of text parts")


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        raise ValueError("stop must be a string or a list of strings")
    if len(strings) > MAX_STOP_STRINGS:
        raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(strings)}")
    if any(not s for s in strings):
        raise ValueError("stop strings must not be empty")
    return tuple(strings)


class SamplingRequest(RequestModel):
    """Fields common to both completion endpoints."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # not OpenAI's, but common; 0 or -1 disable it
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: Any = ()
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def stop_strings(cls, value: Any) -> tuple[str, ...]:
        return _stop_strings(value)

    def invalid(self) -> tuple[str, str] | None:
        """``(param, message)`` for the first combination of fields that makes no sense, else None."""
        return None

    @property
    def logprobs_asked(self) -> int | None:
        """How many alternatives per token the response carries, or None for no log-probabilities."""
        return None

    def unsupported(self) -> tuple[str, str] | None:
        """``(param, message)`` for the first field set to something this server cannot do, else None."""
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.presence_penalty:
            return "presence_penalty", "presence_penalty is not supported (use 0)"
        if self.frequency_penalty:
            return "frequency_penalty", "frequency_penalty is not supported (use 0)"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        return None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def invalid(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: set logprobs to true to use top_logprobs"
        return super().invalid()

    @property
    def logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tools (function calling) are not supported"
        if self.tool_choice not in (None, "none"):
            return "tool_choice", "tool_choice is not supported (no tools)"
        if self.functions:
            return "functions", "functions (function calling) are not supported"
        if self.function_call not in (None, "none"):
            return "function_call", "function_call is not supported (no functions)"
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            return (
                "response_format",
                f"response_format {self.response_format.get('type')!r} is not supported; only 'text' is",
            )
        for index, message in enumerate(self.messages):
            if message.tool_calls:
                return f"messages[{index}].tool_calls", "tool calls are not supported"
        return super().unsupported()

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: Any
    # OpenAI's default for completions; 0 with echo scores the prompt alone (evaluation harnesses do)
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # OpenAI allows up to 5
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def one_prompt(cls, value: Any) -> str | list[int]:
        """A string, token ids, or a list holding exactly one of those (batches are not supported)."""
        if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
            if len(value) != 1:
                raise ValueError(f"one prompt per request is supported, got a batch of {len(value)}")
            value = value[0]
        if isinstance(value, str):
            if not value:
                raise ValueError("the prompt is empty")
            return value
        if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            if not value:
                raise ValueError("the prompt is empty")
            return value
        raise ValueError("prompt must be a string, a list of token ids, or a list holding one of those")

    def invalid(self) -> tuple[str, str] | None:
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens=0 generates nothing; it is allowed only with echo (to score the prompt)"
        return super().invalid()

    @property
    def logprobs_asked(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix is not None:
            return "suffix", "suffix (insertion) is not supported"
        if self.best_of not in (None, 1):
            return "best_of", f"best_of={self.best_of} is not supported: one candidate is generated per request"
        return super().unsupported()

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


# ----- responses ---------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: dict[str, Any] | None = None  # {"content": [token objects]} when asked for


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None  # {"tokens", "token_logprobs", "top_logprobs", "text_offset"}


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "medusa"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
