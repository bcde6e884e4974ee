"""Response schemas: what each route answers, for the OpenAPI document (the routes build plain dicts; these
models only describe them, and tests/test_openapi.py checks every answer against them with schemathesis).

OpenAI's shapes on /v1 and /api (chat.completion, text_completion, model list, its error object), Anthropic's on
/v1/messages (message, its error object); a streamed answer is `text/event-stream` beside the JSON one.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

# ---------------------------------------------------------------------------------------------- errors


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


class AnthropicErrorBody(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    type: Literal["error"]
    error: AnthropicErrorBody


ERRORS = {
    400: "A value out of bounds, a rule across fields, a value JSON cannot hold (NaN, Infinity, 1e999, a lone "
         "surrogate), prompt plus max_tokens past the context, a grammar past its bounds, or a body that is not JSON.",
    401: "Missing or wrong API key.",
    403: "A Host header this server does not answer (DNS rebinding; see --allowed-hosts).",
    404: "Another model id, or no such conversation.",
    413: "The request body is over the server's limit.",
    422: "A request of the wrong shape (400 on /v1/messages).",
    429: "Rate limit per key, or the request queue is full.",
    500: "The engine failed on this request.",
}


def error_responses(model: type[BaseModel], statuses=tuple(ERRORS)) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": model, "description": ERRORS[status]} for status in statuses}


OPENAI_ERRORS = error_responses(OpenAIError)
ANTHROPIC_ERRORS = error_responses(AnthropicError, (400, 401, 403, 404, 413, 429, 500))


def answer(model: type[BaseModel], streamed: bool = False, status: int = 200) -> dict[int | str, dict[str, Any]]:
    """A route's success: JSON of `model`, and with `stream: true` server-sent events."""
    if not streamed:
        return {status: {"model": model, "description": "The answer."}}
    return {status: {"model": model, "description": "The answer (JSON), or with `stream: true` server-sent events.",
                     "content": {"text/event-stream": {"schema": SSE_EVENT}}}}


# One server-sent event: `data` is a JSON chunk of the route's stream (or "[DONE]" on OpenAI's routes); Anthropic's
# events are named. Keep-alives are SSE comments (OpenAI's routes) or `ping` events (Anthropic's).
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}


# ---------------------------------------------------------------------------------------------- OpenAI


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None


class PromptDetails(BaseModel):
    cached_tokens: int


class CompletionDetails(BaseModel):
    reasoning_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptDetails
    completion_tokens_details: CompletionDetails
    prompt_cache_hit_tokens: int = Field(description="DeepSeek's name for the prompt tokens read from the cache.")
    prompt_cache_miss_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: Usage


class LegacyLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = Field(description="The model's context: prompt and completion tokens together.")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


# ---------------------------------------------------------------------------------------------- Anthropic


class TextBlock(BaseModel):
    type: Literal["text"]
    text: str


class ThinkingBlock(BaseModel):
    type: Literal["thinking"]
    thinking: str
    signature: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class MessageUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int


class Message(BaseModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[Annotated[TextBlock | ThinkingBlock | ToolUseBlock, Field(discriminator="type")]]
    stop_reason: Literal["end_turn", "max_tokens", "tool_use"]
    stop_sequence: str | None
    usage: MessageUsage


# ---------------------------------------------------------------------------------------------- history, health


class ConversationSummary(BaseModel):
    id: str
    title: str
    created_at: float
    updated_at: float


class ConversationList(BaseModel):
    data: list[ConversationSummary]


class Conversation(ConversationSummary):
    messages: list[dict[str, Any]]
    system: str
    settings: dict[str, Any]


class Deleted(BaseModel):
    id: str
    deleted: Literal[True]


class WebConfig(BaseModel):
    model: str
    max_tokens_cap: int
    context: int | None


class Health(BaseModel):
    status: Literal["ok"]
