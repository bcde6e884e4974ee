"""Request -> engine, shared by the OpenAI and Anthropic routes: check the model, build SamplingParams,
render the chat template (tools, thinking), build the constraint, count and admit the prompt.

Nothing heavy runs on the event loop: rendering, tokenizing, schema checks, grammar compiles and admission run
on worker threads (the body's size was bounded first), so one big request never holds up another, nor /health.
A grammar compile is bounded in size and time (seekling/engine/grammar.py) and stops when its client leaves or
the server stops.

Thinking control goes through the chat template: `thinking` / `enable_thinking` reach it as variables, and
seekling's template then ends the generation prompt in `<｜Assistant｜></think>` (DeepSeek-V3.1's). A template
that opens `<think>` whatever it is told (the released R1-Distill ones) gets the block closed empty right
after it, `<think>\\n\\n</think>\\n\\n`, the way Qwen3 turns thinking off: the model then answers at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import jinja2
import jsonschema
from tokenizers import Tokenizer as HFTokenizer

from seekling.engine.detok import THINK_END, prompt_opens_think
from seekling.engine.grammar import MAX_CONSTRAINT_BYTES, CompileCancelled, token_bytes
from seekling.engine.sampling import SamplingParams, StructuredOutputsParams
from seekling.serve.security import APIError, Settings
from seekling.serve.tools import ToolFormat, ToolParser, json_constraint, tool_constraint, tool_format
from seekling.serve.worker import EngineWorker, Ticket

log = logging.getLogger("seekling.serve")

# DeepSeek's mapping of requested effort to the effort its models use; "none" turns thinking off.
EFFORT = {"minimal": "low", "low": "low", "medium": "high", "high": "high", "xhigh": "high", "max": "max"}
SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


@dataclass
class Context:
    """What every route needs of the server."""

    engine: Any
    settings: Settings
    worker: EngineWorker
    model_name: str
    metrics: Any
    tokenizer: Any = field(init=False)
    tool_format: ToolFormat = field(init=False)
    tool_template: str = field(init=False)
    sampling_defaults: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.tokenizer = self.engine.tokenizer
        if self.tokenizer is None:
            raise ValueError("the server needs the model's tokenizer (tokenizer.json beside the weights)")
        self.context = getattr(self.engine, "max_model_len", None)  # the model's context, in tokens
        try:  # the longest token, in bytes: a prompt of n bytes is at least n // it tokens
            self.max_token_bytes: int | None = max(map(len, token_bytes(self.tokenizer)))
        except ValueError:  # (not a byte-level BPE vocabulary: no early bound)
            self.max_token_bytes = None
        model_type = getattr(getattr(self.engine, "config", None), "model_type", None)
        self.tool_format, self.tool_template = tool_format(self.tokenizer.chat_template, model_type)
        # A request that leaves a sampling field out gets the checkpoint's recommendation (generation_config
        # .json, e.g. temperature 0.6 / top_p 0.95 for the R1 models), as vLLM does; max_tokens stays ours.
        defaults = getattr(self.engine, "generation_defaults", None) or {}
        self.sampling_defaults = {k: v for k, v in defaults.items() if k in SAMPLING_DEFAULTS}

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                           "invalid_request_error", "model", "model_not_found")

    def completion_tokens(self, prompt_tokens: int, requested: int | None, param: str = "max_tokens") -> int:
        """max_tokens for the engine: the request's, or what fits in the context up to the cap; a request whose
        prompt plus max_tokens is past the model's context is refused (400, both numbers: vLLM's message)."""
        if self.context is None:
            return requested or self.settings.max_tokens_cap
        if requested is None:
            return max(1, min(self.settings.max_tokens_cap, self.context - prompt_tokens))
        if prompt_tokens + requested > self.context:
            raise bad(f"This model's maximum context length is {self.context} tokens. However, you requested "
                      f"{prompt_tokens + requested} tokens ({prompt_tokens} in the messages, {requested} in the "
                      "completion). Please reduce the length of the messages or completion.", param)
        return requested

    def sampling(self, body, max_tokens: int, stop: list[str], logprobs: int | None = None,
                 structured: StructuredOutputsParams | None = None) -> SamplingParams:
        """The request's SamplingParams; the schema already bounded each field."""
        kwargs = {**self.sampling_defaults, "n": getattr(body, "n", 1), "stop": stop,
                  "max_tokens": max_tokens, "structured_outputs": structured}
        for name in ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty"):
            if getattr(body, name, None) is not None:
                kwargs[name] = getattr(body, name)
        if kwargs.get("top_k") == 0:
            kwargs["top_k"] = -1
        if getattr(body, "logit_bias", None):
            kwargs["logit_bias"] = {int(t): b for t, b in body.logit_bias.items()}
        if logprobs is not None:
            kwargs["logprobs"] = logprobs
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:  # the engine's own checks
            raise bad(str(e)) from e

    def count_prompt(self, prompt_ids: list[int], param: str = "messages") -> int:
        """The prompt's token count; 400 past the server's limit (which is below the model's context)."""
        if len(prompt_ids) > self.settings.max_prompt_tokens:
            context = f" (the model's context is {self.context})" if self.context else ""
            raise bad(f"The prompt is {len(prompt_ids)} tokens, over the limit of {self.settings.max_prompt_tokens}"
                      f"{context}.", param)
        return len(prompt_ids)

    async def prepare(self, messages: list[dict], opts: ChatOptions) -> Prepared:
        """prepare_chat on a worker thread: a big tool list renders and tokenizes for seconds."""
        return await asyncio.to_thread(prepare_chat, self, messages, opts)

    async def encode(self, text: str, param: str = "prompt") -> list[int]:
        return await asyncio.to_thread(self.tokenize, text, param)

    def tokenize(self, text: str, param: str = "messages") -> list[int]:
        """The prompt's tokens (on a worker thread). A prompt whose bytes alone prove it is over the cap (every
        token is at most `max_token_bytes`) is refused without tokenizing it: a megabyte takes seconds. The
        tokenizers library releases the GIL in encode_batch (not always in encode), so the loop goes on meanwhile."""
        if self.max_token_bytes:
            at_least = len(text.encode("utf-8", "surrogatepass")) // self.max_token_bytes
            if at_least > self.settings.max_prompt_tokens:
                raise bad(f"The prompt is at least {at_least} tokens, over the limit of "
                          f"{self.settings.max_prompt_tokens}.", param)
        backend = getattr(self.tokenizer, "tokenizer", None)
        if isinstance(backend, HFTokenizer):
            return backend.encode_batch([text], add_special_tokens=False)[0].ids
        return self.tokenizer.encode(text)

    async def compile(self, request, constraint: StructuredOutputsParams) -> None:
        """Compile a new grammar on a worker thread, bounded (400 past the bounds), and stop it when the client
        leaves or this task is cancelled (the server stopping); add_request then finds it in the cache."""
        cancel = threading.Event()
        job = asyncio.ensure_future(asyncio.to_thread(self.engine.compile_constraint, constraint, cancel.is_set))
        try:
            while not job.done():
                await asyncio.wait({job}, timeout=0.25)
                if not job.done() and await request.is_disconnected():
                    cancel.set()
            job.result()
        except ValueError as e:
            raise bad(f"The output's constraint (tools or response_format) is refused: {e}.") from e
        except CompileCancelled as e:
            raise APIError(499, "The client closed the request.", "invalid_request_error") from e
        finally:
            cancel.set()  # (a no-op once compiled; else the compile is killed)

    async def admit(self, request, prompt, prompt_ids: list[int], params: SamplingParams,
                    prompt_tokens: int) -> Ticket:
        if params.structured_outputs is not None:
            await self.compile(request, params.structured_outputs)
        loop = asyncio.get_running_loop()
        try:  # (off the loop: the engine checks the prompt, and its tokens are copied)
            ticket = await asyncio.to_thread(self.worker.submit, prompt, params, params.n, loop, prompt_ids)
        except ValueError as e:  # the engine refused the request (e.g. longer than the model's context)
            raise bad(str(e)) from e
        if ticket is None:
            raise APIError(429, "The server is busy: the request queue is full. Retry shortly.", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"})
        self.metrics.prompt_tokens.inc(prompt_tokens)
        return ticket

    def log_exchange(self, kind: str, prompt, outputs: list[str]) -> None:
        if self.settings.log_requests:  # prompts and outputs are private unless asked for
            log.info("%s prompt=%r outputs=%r", kind, prompt, outputs)


# ---------------------------------------------------------------------------------------------- chat


@dataclass
class ChatOptions:
    tools: list[dict] | None = None  # OpenAI tool definitions
    tool_choice: str | dict = "auto"  # none | auto | required | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool = True
    thinking: bool | None = None  # None: the template's default (on, for seekling's and R1's)
    reasoning_effort: str | None = None
    response_schema: dict | None = None  # response_format json_schema
    json_object: bool = False  # response_format json_object


@dataclass
class Prepared:
    prompt: str
    prompt_ids: list[int]
    parser: ToolFormat | None  # parse tool calls out of the answer, in this format
    parallel: bool
    structured: StructuredOutputsParams | None

    def new_parser(self) -> ToolParser | None:
        return self.parser.parser(self.parallel) if self.parser else None


def check_tools(tools: list[dict]) -> None:
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise bad("Tool names must be unique.", "tools")
    for i, t in enumerate(tools):
        check_schema(t["function"].get("parameters"), f"tools.{i}.function.parameters")


# A JSON Schema's bounds: nesting (JSON levels: an object property is two, `properties` and the property) and
# size in nodes. Past them a check recurses past Python's stack and a grammar takes minutes to compile; real tool
# schemas are a few levels and a few hundred nodes (OpenAI's structured outputs allow 10 levels, 5000 properties).
MAX_SCHEMA_DEPTH = 128
MAX_SCHEMA_NODES = 20_000


def schema_size(schema) -> tuple[int, int]:
    """(nodes, depth) of a JSON value, without recursion."""
    nodes, deepest, stack = 0, 0, [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        deepest = max(deepest, depth)
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return nodes, deepest


def check_schema(schema: dict | None, param: str) -> None:
    if schema is None:
        return
    nodes, depth = schema_size(schema)
    size = len(json.dumps(schema)) if depth <= MAX_SCHEMA_DEPTH else 0
    if depth > MAX_SCHEMA_DEPTH or nodes > MAX_SCHEMA_NODES or size > MAX_CONSTRAINT_BYTES:
        raise bad(f"{param} is too large: {depth} levels deep, {nodes} nodes and {size} bytes of JSON (at most "
                  f"{MAX_SCHEMA_DEPTH}, {MAX_SCHEMA_NODES} and {MAX_CONSTRAINT_BYTES}).", param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise bad(f"{param} is not a valid JSON Schema: {e.message}", param) from e
    except RecursionError as e:  # ($ref cycles are resolved lazily; a deep one may still recurse)
        raise bad(f"{param} nests too deeply to check.", param) from e


def prepare_chat(ctx: Context, messages: list[dict], opts: ChatOptions) -> Prepared:
    """Render the prompt and build the tool parser and constraint for one chat request."""
    tools, choice = opts.tools or None, opts.tool_choice
    if tools:
        check_tools(tools)
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if (named or choice == "required") and not tools:
        raise bad("tool_choice needs tools.", "tool_choice")
    if named and named not in {t["function"]["name"] for t in tools}:
        raise bad(f"tool_choice names '{named}', which is not in tools.", "tool_choice")
    if (opts.response_schema is not None or opts.json_object) and (named or choice == "required"):
        raise bad("response_format json and a required tool call cannot both hold.", "response_format")
    check_schema(opts.response_schema, "response_format.json_schema.schema")
    use_tools = bool(tools) and choice != "none"
    tool_history = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    variables: dict[str, Any] = {}
    thinking = False if opts.reasoning_effort == "none" else opts.thinking
    if thinking is not None:
        variables.update(thinking=thinking, enable_thinking=thinking)
    if opts.reasoning_effort in EFFORT:
        variables["reasoning_effort"] = EFFORT[opts.reasoning_effort]
    template = ctx.tool_template if (use_tools or tool_history) else None
    try:
        prompt = ctx.tokenizer.apply_chat_template(messages, True, tools=tools if use_tools else None,
                                                   chat_template=template, **variables)
    except jinja2.TemplateError as e:  # the template refused the conversation (e.g. an unknown role)
        raise bad(f"The chat template cannot render these messages: {e}", "messages") from e
    if thinking is False and prompt_opens_think(prompt):  # a template that always opens <think>
        prompt += "\n" + THINK_END + "\n\n"
    reasoning = prompt_opens_think(prompt)
    structured = None
    if named:
        structured = tool_constraint(ctx.tool_format, [t for t in tools if t["function"]["name"] == named],
                                     False, reasoning)
    elif choice == "required":
        structured = tool_constraint(ctx.tool_format, tools, opts.parallel_tool_calls, reasoning)
    elif opts.response_schema is not None or opts.json_object:
        structured = json_constraint(opts.response_schema, reasoning)
    parallel = opts.parallel_tool_calls and not named
    return Prepared(prompt, ctx.tokenize(prompt), ctx.tool_format if use_tools else None, parallel,
                    structured)


def text_of(content) -> str:
    """A message's text: a string, or the text of its parts."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.text for p in content)


def arguments_value(text: str) -> Any:
    """Tool-call arguments for the template: the object when the text is one (templates such as Qwen's
    render `arguments | tojson`), else the text as it is."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def openai_messages(messages) -> list[dict]:
    """OpenAI chat messages -> template messages, with the rules a schema cannot state."""
    out, open_calls = [], set()
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role, "content": text_of(m.content)}
        if role == "assistant":
            if m.reasoning_content:
                msg["reasoning_content"] = m.reasoning_content
            if m.tool_calls:
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": arguments_value(c.function.arguments)}}
                    for c in m.tool_calls]
            open_calls = {c.id for c in m.tool_calls or ()}
        elif role == "tool":
            if m.tool_call_id not in open_calls:
                raise bad(f"messages[{i}].tool_call_id '{m.tool_call_id}' answers no tool call of the assistant "
                          "message before it.", f"messages.{i}.tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
        else:  # a user or system message closes the tool loop
            open_calls = set()
        out.append(msg)
    if out[-1]["role"] == "assistant":
        raise bad("The last message must be from the user, the system or a tool.", "messages")
    return out


def usage(prompt_tokens: int, samples: dict) -> dict:
    """OpenAI's usage, with DeepSeek's prompt-cache fields beside OpenAI's cached_tokens."""
    completion = sum(s.tokens for s in samples.values())
    cached = samples[0].cached_tokens if samples else 0
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": sum(s.reasoning_tokens for s in samples.values())},
        "prompt_cache_hit_tokens": cached,
        "prompt_cache_miss_tokens": prompt_tokens - cached,
    }
