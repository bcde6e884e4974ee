"""Request schemas (OpenAI, Anthropic, history), built for one server's limits so that the OpenAPI document
states exactly what the server enforces: a request the schema allows is accepted, any other is refused
with a 4xx. What a schema cannot say (the prompt's token count, cross-field rules such as a `tool` message
answering an earlier call) is checked in code and named in the field descriptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from seekling.serve.security import Settings

# Unknown OpenAI/Anthropic fields (user, metadata, service_tier...) are accepted and unused, as vLLM does;
# NaN and Infinity are refused everywhere (the body check in security.py catches them inside free-form
# objects too).
LENIENT = ConfigDict(extra="ignore", allow_inf_nan=False)
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
MAX_TOOLS = 128
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
TOKEN_ID = r"^[0-9]{1,9}$"  # a logit_bias key (a token id, as JSON object keys are strings)
TOP_K_MAX = 2**31 - 1
TOP_K_DOC = "-1 or 0: off; past the vocabulary it is the whole vocabulary."
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's and Anthropic's rule for function names


class StreamOptions(BaseModel):
    model_config = LENIENT
    include_usage: bool = False


class FunctionDef(BaseModel):
    model_config = LENIENT
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema for the arguments object.")
    strict: bool | None = None


class Tool(BaseModel):
    model_config = LENIENT
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = LENIENT
    name: str = Field(pattern=NAME_PATTERN)


class NamedToolChoice(BaseModel):
    model_config = LENIENT
    type: Literal["function"] = "function"
    function: FunctionName


class CallFunction(BaseModel):
    model_config = LENIENT
    name: str = Field(pattern=NAME_PATTERN)
    arguments: str = Field(description="The arguments as JSON text.")


class ToolCall(BaseModel):
    model_config = LENIENT
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: CallFunction


class ThinkingSwitch(BaseModel):
    """DeepSeek's thinking switch (OpenAI clients send it through `extra_body`)."""

    model_config = LENIENT
    type: Literal["enabled", "disabled"]


class JSONSchemaSpec(BaseModel):
    model_config = LENIENT
    name: str = Field("response", pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class TextFormat(BaseModel):
    type: Literal["text"]


class JSONObjectFormat(BaseModel):
    type: Literal["json_object"]


class JSONSchemaFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]


class AnthropicThinking(BaseModel):
    model_config = LENIENT
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1, le=2**31 - 1, description="Less than max_tokens (checked, not "
                                      "enforced: the model reasons until it closes its think block).")


class AnthropicToolChoice(BaseModel):
    model_config = LENIENT
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, pattern=NAME_PATTERN)
    disable_parallel_tool_use: bool = False


class AnthropicTool(BaseModel):
    model_config = LENIENT
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    input_schema: dict[str, Any] = Field(description="A JSON Schema for the tool's input object.")


@dataclass
class Schemas:
    """The request models of one server, with its limits built in."""

    chat: type[BaseModel]
    completion: type[BaseModel]
    messages: type[BaseModel]
    conversation_in: type[BaseModel]
    conversation_update: type[BaseModel]


def build_schemas(settings: Settings, model_name: str) -> Schemas:
    text = Annotated[str, Field(max_length=settings.max_body_bytes)]
    model_field = Field(description="The served model's id.", json_schema_extra={"enum": [model_name]})
    stop_field = Field(None, description="Up to 4 stop strings.")
    stop_type = Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                                 Field(max_length=4)] | None
    tokens = Annotated[int, Field(ge=1, le=settings.max_tokens_cap)]
    messages_doc = (f"1 to {settings.max_messages} messages; the rendered prompt is at most "
                    f"{settings.max_prompt_tokens} tokens.")

    class TextPart(BaseModel):
        model_config = LENIENT
        type: Literal["text"]
        text: text

    message_content = text | list[TextPart]

    class SystemMessage(BaseModel):
        model_config = LENIENT
        role: Literal["system", "developer"]
        content: message_content

    class UserMessage(BaseModel):
        model_config = LENIENT
        role: Literal["user"]
        content: message_content

    class AssistantMessage(BaseModel):
        model_config = LENIENT
        role: Literal["assistant"]
        content: message_content | None = None
        reasoning_content: text | None = Field(None, description="Sent back to the model for a turn that called "
                                               "tools after the last user message (DeepSeek's rule), else dropped.")
        tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)

    class ToolMessage(BaseModel):
        model_config = LENIENT
        role: Literal["tool"]
        content: message_content
        tool_call_id: str = Field(max_length=256, description="The id of a call of the assistant message before.")

    chat_message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage,
                             Field(discriminator="role")]

    class SamplingFields(BaseModel):
        model_config = LENIENT
        model: str = model_field
        stream: bool = False
        stream_options: StreamOptions | None = None
        n: int = Field(1, ge=1, le=settings.max_n)
        stop: stop_type = stop_field
        max_tokens: tokens | None = Field(None, description=f"Default and upper bound: {settings.max_tokens_cap}.")
        temperature: float | None = Field(None, ge=0.0, le=2.0)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        top_k: int | None = Field(None, ge=-1, le=TOP_K_MAX, description=TOP_K_DOC)
        seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)
        presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
        frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
        logit_bias: dict[Annotated[str, Field(pattern=TOKEN_ID)], Annotated[float, Field(ge=-100, le=100)]] | None = (
            Field(None, max_length=MAX_LOGIT_BIAS, description="Token id -> a bias in [-100, 100] added to its logit."))

    class ChatCompletionRequest(SamplingFields):
        messages: list[chat_message] = Field(min_length=1, max_length=settings.max_messages, description=(
            messages_doc + " The last one is not the assistant's; a tool message answers a call of the assistant "
            "message before it."))
        max_completion_tokens: tokens | None = Field(None, description="Same as max_tokens (give one of them).")
        logprobs: bool = False
        top_logprobs: int | None = Field(None, ge=0, le=20, description="Needs logprobs: true.")
        tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
        tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
        parallel_tool_calls: bool = True
        response_format: ResponseFormat | None = None
        thinking: ThinkingSwitch | None = None
        reasoning_effort: Literal[REASONING_EFFORTS] | None = Field(  # type: ignore[valid-type]
            None, description='"none" turns thinking off; the others are passed to the chat template.')

    class CompletionRequest(SamplingFields):
        prompt: Annotated[str, Field(min_length=1, max_length=settings.max_body_bytes)] | Annotated[
            list[Annotated[str, Field(min_length=1, max_length=settings.max_body_bytes)]],
            Field(min_length=1, max_length=1)] = Field(description="One prompt.")
        logprobs: int | None = Field(None, ge=0, le=20, description="How many top logprobs per token.")

    class AnthropicText(BaseModel):
        model_config = LENIENT
        type: Literal["text"]
        text: text

    class AnthropicThinkingBlock(BaseModel):
        model_config = LENIENT
        type: Literal["thinking"]
        thinking: text
        signature: str | None = None

    class AnthropicToolUse(BaseModel):
        model_config = LENIENT
        type: Literal["tool_use"]
        id: str = Field(min_length=1, max_length=256)
        name: str = Field(pattern=NAME_PATTERN)
        input: dict[str, Any]

    class AnthropicToolResult(BaseModel):
        model_config = LENIENT
        type: Literal["tool_result"]
        tool_use_id: str = Field(min_length=1, max_length=256)
        content: text | list[AnthropicText] = ""
        is_error: bool = False

    block = Annotated[AnthropicText | AnthropicThinkingBlock | AnthropicToolUse | AnthropicToolResult,
                      Field(discriminator="type")]

    class AnthropicMessage(BaseModel):
        model_config = LENIENT
        role: Literal["user", "assistant"]
        content: text | list[block]

    class MessagesRequest(BaseModel):
        model_config = LENIENT
        model: str = model_field
        max_tokens: tokens
        messages: list[AnthropicMessage] = Field(min_length=1, max_length=settings.max_messages,
                                                 description=messages_doc)
        system: text | list[AnthropicText] | None = None
        stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=4)
        stream: bool = False
        temperature: float | None = Field(None, ge=0.0, le=1.0)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        top_k: int | None = Field(None, ge=-1, le=TOP_K_MAX, description=TOP_K_DOC)
        tools: list[AnthropicTool] | None = Field(None, max_length=MAX_TOOLS)
        tool_choice: AnthropicToolChoice | None = None
        thinking: AnthropicThinking | None = None

    class StoredMessage(BaseModel):
        model_config = LENIENT
        role: Literal["system", "user", "assistant", "tool"]
        content: text
        reasoning: text | None = None
        thought_s: float | None = Field(None, ge=0)
        tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)
        tool_call_id: str | None = Field(None, max_length=256)

    max_history = 10 * settings.max_messages  # (a class body that defines `settings` can't read ours)

    class ConversationIn(BaseModel):
        model_config = LENIENT
        title: str = Field("New chat", max_length=200)
        messages: list[StoredMessage] = Field(default_factory=list, max_length=max_history)
        system: text = ""
        settings: dict[str, Any] = {}

    class ConversationUpdate(BaseModel):
        model_config = LENIENT
        title: str | None = Field(None, max_length=200)
        messages: list[StoredMessage] | None = Field(None, max_length=max_history)
        system: text | None = None
        settings: dict[str, Any] | None = None

    return Schemas(ChatCompletionRequest, CompletionRequest, MessagesRequest, ConversationIn, ConversationUpdate)
