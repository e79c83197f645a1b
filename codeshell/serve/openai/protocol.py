"""Request bodies of the OpenAI API as strict pydantic models: unknown fields and wrong types
are errors (OpenAI rejects them too). A few vLLM extensions are accepted (top_k, min_p,
repetition_penalty, ignore_eos, ...). Validation of ranges that depend on the served model
(context window, batch size) happens in the routes, not here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..schema import SEED, Out, doc


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    temperature: float | None = doc(None, minimum=0, maximum=2)
    top_p: float | None = doc(None, exclusiveMinimum=0, maximum=1)
    n: int = doc(1, minimum=1)
    stop: str | list[str] | None = doc(None, maxItems=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = doc(None, **SEED)
    presence_penalty: float | None = doc(0.0, minimum=-2, maximum=2)
    frequency_penalty: float | None = doc(0.0, minimum=-2, maximum=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    max_tokens: int | None = doc(16, minimum=1)
    logprobs: int | None = doc(None, minimum=0, maximum=20)
    echo: bool = False
    best_of: int | None = None


class ContentPart(_Strict):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class Message(_Strict):
    model_config = ConfigDict(extra="ignore", strict=True)  # `name`, `tool_calls`, ... are ignored
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = doc(None, minimum=1)
    max_completion_tokens: int | None = doc(None, minimum=1)
    logprobs: bool = False
    top_logprobs: int | None = doc(None, minimum=0, maximum=20)


# ---- responses (documentation of what the routes send; the routes build plain dicts) ------------

class ModelCard(Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptTokensDetails(Out):
    cached_tokens: int


class Usage(Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(Out):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(Out):
    """The body of a non-streamed /v1/completions answer; a streamed one sends the same shape
    per chunk (one choice, `text` holding the new text), an optional usage chunk, then `[DONE]`."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Out):
    content: list[TokenLogprob]


class ChatMessageOut(Out):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Out):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletion(Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(Out):
    """One event of a streamed chat answer; the stream ends with `data: [DONE]`."""
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ErrorDetail(Out):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Out):
    """OpenAI's error body."""
    error: ErrorDetail
