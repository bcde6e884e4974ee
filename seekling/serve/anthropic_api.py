"""Anthropic's Messages API at /v1/messages (what Claude Code and other agent tools speak), on the same
engine, template, tool parser and limits as the OpenAI routes. Errors on this route have Anthropic's shape
(security.py); the key may come as `x-api-key` or `Authorization: Bearer`.

Content blocks map onto the chat template's messages: `thinking` <-> reasoning_content, `tool_use` <-> an
assistant tool call, `tool_result` <-> a `tool` message. Thinking is off unless the request enables it
(`thinking.type` "enabled", or "adaptive": the template's default), as Anthropic's API does, so a plain request's
answer is its text. A response carries the blocks its stop_reason implies: `end_turn` at least one text block,
`tool_use` its tool_use blocks (a call cut by max_tokens is text, and the stop_reason `max_tokens`). Anthropic's
`input_tokens` excludes the prompt tokens read from the cache, which are `cache_read_input_tokens`.
"""

# (no `from __future__ import annotations`: FastAPI reads the routes' body types, local to the router
# builder, from the live annotations)
import json
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from seekling.serve.openai_api import count_completion
from seekling.serve.pipeline import ChatOptions, Context, bad, text_of
from seekling.serve.responses import ANTHROPIC_ERRORS, Message, answer
from seekling.serve.schemas import Schemas
from seekling.serve.security import anthropic_error_body
from seekling.serve.streaming import Reasoning, Sample, collect, new_samples, sse, sse_response
from seekling.serve.tools import CallArgs, CallStart, Text

STOP_REASONS = {"tool_calls": "tool_use", "length": "max_tokens", "stop": "end_turn"}


def chat_messages(body) -> list[dict]:
    """Anthropic messages (and `system`) -> template messages."""
    out = [{"role": "system", "content": text_of(body.system) if not isinstance(body.system, str) else body.system}
           ] if body.system else []
    for m in body.messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        kinds = {b.type for b in m.content}
        if m.role == "user" and kinds & {"thinking", "tool_use"} or m.role == "assistant" and "tool_result" in kinds:
            raise bad(f"A {m.role} message cannot hold {sorted(kinds)} blocks.", "messages")
        for b in m.content:  # tool results first: they answer the assistant's calls before the user speaks on
            if b.type == "tool_result":
                content = b.content if isinstance(b.content, str) else text_of(b.content)
                out.append({"role": "tool", "tool_call_id": b.tool_use_id,
                            "content": ("Error: " + content) if b.is_error else content})
        text = "".join(b.text for b in m.content if b.type == "text")
        if m.role == "user" and (text or "tool_result" not in kinds):
            out.append({"role": "user", "content": text})
        elif m.role == "assistant":
            msg = {"role": "assistant", "content": text,
                   "reasoning_content": "".join(b.thinking for b in m.content if b.type == "thinking") or None}
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
                     for b in m.content if b.type == "tool_use"]
            if calls:
                msg["tool_calls"] = calls
            out.append({k: v for k, v in msg.items() if v is not None})
    if out[-1]["role"] == "assistant":
        raise bad("The last message must be the user's (a prefilled assistant answer is not supported).", "messages")
    return out


def options(body) -> ChatOptions:
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                               "parameters": t.input_schema}} for t in body.tools or ()]
    choice, parallel = "auto", True
    if body.tool_choice is not None:
        tc = body.tool_choice
        parallel = not tc.disable_parallel_tool_use
        if tc.type == "tool":
            if not tc.name:
                raise bad('tool_choice of type "tool" needs a name.', "tool_choice")
            choice = {"type": "function", "function": {"name": tc.name}}
        else:
            choice = {"auto": "auto", "any": "required", "none": "none"}[tc.type]
    thinking = {None: False, "disabled": False, "enabled": True, "adaptive": None}[
        body.thinking.type if body.thinking is not None else None]
    if body.thinking is not None and body.thinking.budget_tokens is not None \
            and body.thinking.budget_tokens >= body.max_tokens:
        raise bad("max_tokens must be greater than thinking.budget_tokens.", "thinking.budget_tokens")
    return ChatOptions(tools=tools or None, tool_choice=choice, parallel_tool_calls=parallel, thinking=thinking)


def usage(prompt_tokens: int, sample: Sample) -> dict:
    return {"input_tokens": prompt_tokens - sample.cached_tokens, "output_tokens": sample.tokens,
            "cache_read_input_tokens": sample.cached_tokens, "cache_creation_input_tokens": 0}


def tool_input(arguments: str) -> dict:
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"arguments": arguments}  # unparseable: kept, not lost


def stop_reason(s: Sample) -> str:
    return STOP_REASONS[s.finish_reason or "stop"]


def content_blocks(s: Sample) -> list[dict]:
    blocks = [{"type": "thinking", "thinking": s.reasoning, "signature": ""}] if s.reasoning else []
    if s.content or (stop_reason(s) == "end_turn" and not s.calls):  # end_turn: a text block, even empty
        blocks.append({"type": "text", "text": s.content})
    blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": tool_input(c.arguments)} for c in s.calls]
    return blocks


class MessageStream:
    """Anthropic's event stream: message_start, ping, then per content block content_block_start / _delta /
    _stop, then message_delta (stop reason, usage) and message_stop."""

    keepalive = sse({"type": "ping"}, "ping")

    def __init__(self, ctx: Context, message: dict, sample: Sample, prompt_tokens: int):
        self.ctx, self.message, self.sample, self.prompt_tokens = ctx, message, sample, prompt_tokens
        self.block = -1  # index of the open content block
        self.kind: str | None = None  # its type

    def start(self):
        message = {**self.message, "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {**usage(self.prompt_tokens, self.sample), "output_tokens": 0}}
        return [sse({"type": "message_start", "message": message}, "message_start"), self.keepalive]

    def _open(self, kind: str, block: dict) -> list[str]:
        out = self._close_block()
        self.block, self.kind = self.block + 1, kind
        return out + [sse({"type": "content_block_start", "index": self.block, "content_block": block},
                          "content_block_start")]

    def _close_block(self) -> list[str]:
        if self.kind is None:
            return []
        self.kind = None
        return [sse({"type": "content_block_stop", "index": self.block}, "content_block_stop")]

    def _delta(self, delta: dict) -> str:
        return sse({"type": "content_block_delta", "index": self.block, "delta": delta}, "content_block_delta")

    def delta(self, item):
        out = []
        for e in self.sample.add(item):
            if isinstance(e, Reasoning):
                if self.kind != "thinking":
                    out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                out.append(self._delta({"type": "thinking_delta", "thinking": e.text}))
            elif isinstance(e, Text):
                if self.kind != "text":
                    out += self._open("text", {"type": "text", "text": ""})
                out.append(self._delta({"type": "text_delta", "text": e.text}))
            elif isinstance(e, CallStart):
                out += self._open("tool_use", {"type": "tool_use", "id": e.id, "name": e.name, "input": {}})
            elif isinstance(e, CallArgs):
                out.append(self._delta({"type": "input_json_delta", "partial_json": e.text}))
        return out

    def end(self):
        reason = stop_reason(self.sample)
        opened = []
        if reason == "end_turn" and not self.sample.content and not self.sample.calls:  # (a text block, even empty)
            opened = self._open("text", {"type": "text", "text": ""})
        stop = {"stop_reason": reason, "stop_sequence": None}
        return opened + self._close_block() + [
            sse({"type": "message_delta", "delta": stop, "usage": {"output_tokens": self.sample.tokens}},
                "message_delta"),
            sse({"type": "message_stop"}, "message_stop"),
        ]

    def failure(self, message: str) -> str:
        return sse(anthropic_error_body(500, message), "error")

    def close(self) -> None:
        count_completion(self.ctx, {0: self.sample})


def anthropic_router(ctx: Context, schemas: Schemas, guard) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["anthropic"], responses=ANTHROPIC_ERRORS)
    MessagesRequest = schemas.messages

    @router.post("/messages", responses=answer(Message, streamed=True))
    async def messages(body: MessagesRequest, request: Request, owner: str = Depends(guard)):
        ctx.check_model(body.model)
        chat = chat_messages(body)
        prepared = await ctx.prepare(chat, options(body))
        prompt_tokens = ctx.count_prompt(prepared.prompt_ids)
        params = ctx.sampling(body, ctx.completion_tokens(prompt_tokens, body.max_tokens),
                              list(body.stop_sequences or ()), None, prepared.structured)
        ticket = await ctx.admit(request, prepared.prompt, prepared.prompt_ids, params, prompt_tokens)
        message = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant", "model": ctx.model_name}
        samples = new_samples(1, prepared.new_parser)
        if body.stream:
            stream = MessageStream(ctx, message, samples[0], prompt_tokens)
            return sse_response(stream, ctx.worker, ticket, ctx.settings.keepalive_s)
        done = await collect(request, ctx.worker, ticket, samples, ctx.settings.keepalive_s)
        count_completion(ctx, samples)
        if not done:
            return JSONResponse({}, 499)
        s = samples[0]
        ctx.log_exchange("messages", chat, [s.content])
        return {**message, "content": content_blocks(s), "stop_reason": stop_reason(s),
                "stop_sequence": None, "usage": usage(prompt_tokens, s)}

    return router
