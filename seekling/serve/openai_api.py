"""OpenAI's routes: /v1/chat/completions (reasoning_content, tools, response_format, thinking), /v1/completions
and /v1/models. Answers and stream chunks have OpenAI's shapes, so the official client reads them as they are
(streamed tool calls included: the first chunk of a call carries its id and name, the next ones pieces of its
arguments, by `index`, which the client's stream helpers reassemble)."""

# (no `from __future__ import annotations`: FastAPI reads the routes' body types, local to the router
# builder, from the live annotations)
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from seekling.serve.pipeline import ChatOptions, Context, bad, openai_messages, usage
from seekling.serve.responses import OPENAI_ERRORS, ChatCompletion, Completion, Model, ModelList, answer
from seekling.serve.schemas import Schemas
from seekling.serve.security import error_body
from seekling.serve.streaming import Reasoning, Sample, collect, new_samples, sse, sse_response
from seekling.serve.tools import CallArgs, CallStart, Text


def stop_list(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def token_logprobs(tokenizer, delta, top: int) -> list[dict]:
    """Chat-format logprobs for a delta; the engine gives, per token, {token_id: logprob} of the top candidates
    including the sampled one."""
    def entry(i, lp):
        s = tokenizer.decode([i])
        return {"token": s, "logprob": float(lp), "bytes": list(s.encode())}

    out = []
    for tid, cands in zip(delta.token_ids or (), getattr(delta, "logprobs", None) or (), strict=False):
        ranked = sorted(cands.items(), key=lambda kv: -kv[1])[:top]
        out.append({**entry(tid, cands.get(tid, float("-inf"))), "top_logprobs": [entry(i, lp) for i, lp in ranked]})
    return out


def message(s: Sample) -> dict:
    msg = {"role": "assistant", "content": s.content if (s.content or not s.calls) else None,
           "reasoning_content": s.reasoning or None}
    if s.calls:
        msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in s.calls]
    return msg


def chunk_delta(events) -> dict:
    """One stream chunk's `delta` from the events of one engine delta (tool-call pieces merged by index)."""
    delta: dict = {}
    calls: dict[int, dict] = {}
    for e in events:
        if isinstance(e, Reasoning):
            delta["reasoning_content"] = delta.get("reasoning_content", "") + e.text
        elif isinstance(e, Text):
            delta["content"] = delta.get("content", "") + e.text
        elif isinstance(e, CallStart):
            calls[e.index] = {"index": e.index, "id": e.id, "type": "function",
                              "function": {"name": e.name, "arguments": ""}}
        elif isinstance(e, CallArgs):
            call = calls.setdefault(e.index, {"index": e.index, "function": {"arguments": ""}})
            call["function"]["arguments"] += e.text
    if calls:
        delta["tool_calls"] = list(calls.values())
    return delta


class ChatStream:
    """The chat.completion.chunk stream of one request."""

    keepalive = ": keep-alive\n\n"

    def __init__(self, ctx: Context, head: dict, samples: dict[int, Sample], prompt_tokens: int, include_usage: bool,
                 top: int | None):
        self.ctx, self.samples, self.prompt_tokens, self.top = ctx, samples, prompt_tokens, top
        self.chunk = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}
        self.include_usage = include_usage
        self.extra = {"usage": None} if include_usage else {}

    def _chunk(self, index: int, delta: dict, logprobs=None, finish=None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**self.chunk, "choices": [choice], **self.extra})

    def start(self):
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in self.samples]

    def delta(self, item):
        s = self.samples[item.index]
        delta = chunk_delta(s.add(item))
        logprobs = {"content": token_logprobs(self.ctx.tokenizer, item, self.top)} if self.top is not None else None
        if delta or logprobs or s.finished:
            yield self._chunk(item.index, delta, logprobs, s.finish_reason)

    def end(self):
        if self.include_usage:
            yield sse({**self.chunk, "choices": [], "usage": usage(self.prompt_tokens, self.samples)})
        yield "data: [DONE]\n\n"

    def failure(self, message: str) -> str:
        return sse(error_body(message, "server_error"))

    def close(self) -> None:
        count_completion(self.ctx, self.samples)


class CompletionStream:
    keepalive = ": keep-alive\n\n"

    def __init__(self, ctx: Context, head: dict, samples: dict[int, Sample], prompt_tokens: int, include_usage: bool,
                 legacy_logprobs):
        self.ctx, self.head, self.samples, self.prompt_tokens = ctx, head, samples, prompt_tokens
        self.include_usage, self.legacy_logprobs = include_usage, legacy_logprobs

    def start(self):
        return []

    def delta(self, item):
        s = self.samples[item.index]
        s.add(item)
        text = (item.reasoning or "") + (item.text or "")
        choice = {"index": item.index, "text": text, "logprobs": self.legacy_logprobs(item),
                  "finish_reason": s.finish_reason}
        yield sse({**self.head, "choices": [choice]})

    def end(self):
        if self.include_usage:
            yield sse({**self.head, "choices": [], "usage": usage(self.prompt_tokens, self.samples)})
        yield "data: [DONE]\n\n"

    def failure(self, message: str) -> str:
        return sse(error_body(message, "server_error"))

    def close(self) -> None:
        count_completion(self.ctx, self.samples)


def count_completion(ctx: Context, samples: dict[int, Sample]) -> None:
    ctx.metrics.completion_tokens.inc(sum(s.tokens for s in samples.values()))
    ctx.metrics.cached_tokens.inc(samples[0].cached_tokens if samples else 0)


def chat_options(body) -> ChatOptions:
    rf = body.response_format
    return ChatOptions(
        tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
        tool_choice=(body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump")
                     else body.tool_choice or "auto"),
        parallel_tool_calls=body.parallel_tool_calls,
        thinking=None if body.thinking is None else body.thinking.type == "enabled",
        reasoning_effort=body.reasoning_effort,
        response_schema=rf.json_schema.schema_ if rf is not None and rf.type == "json_schema" else None,
        json_object=rf is not None and rf.type == "json_object",
    )


def openai_router(ctx: Context, schemas: Schemas, guard) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"], responses=OPENAI_ERRORS)
    settings = ctx.settings
    ChatCompletionRequest, CompletionRequest = schemas.chat, schemas.completion

    @router.post("/chat/completions", responses=answer(ChatCompletion, streamed=True))
    async def chat_completions(body: ChatCompletionRequest, request: Request, owner: str = Depends(guard)):
        ctx.check_model(body.model)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise bad("Give max_tokens or max_completion_tokens, not both.", "max_completion_tokens")
        if body.top_logprobs is not None and not body.logprobs:
            raise bad("top_logprobs requires logprobs to be true.", "top_logprobs")
        messages = openai_messages(body.messages)
        prepared = await ctx.prepare(messages, chat_options(body))
        prompt_tokens = ctx.count_prompt(prepared.prompt_ids)
        top = (body.top_logprobs or 0) if body.logprobs else None
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        params = ctx.sampling(body, ctx.completion_tokens(prompt_tokens, requested, param), stop_list(body.stop),
                              max(1, top) if top is not None else None, prepared.structured)
        ticket = await ctx.admit(request, prepared.prompt, prepared.prompt_ids, params, prompt_tokens)
        head = {"id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time()), "model": ctx.model_name}
        samples = new_samples(body.n, prepared.new_parser)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = ChatStream(ctx, head, samples, prompt_tokens, include_usage, top)
            return sse_response(stream, ctx.worker, ticket, settings.keepalive_s)

        def keep_logprobs(sample, delta):
            if top is not None:
                sample.logprobs += token_logprobs(ctx.tokenizer, delta, top)

        done = await collect(request, ctx.worker, ticket, samples, settings.keepalive_s, keep_logprobs)
        count_completion(ctx, samples)
        if not done:
            return JSONResponse({}, 499)  # nobody is listening; the status is for the logs and metrics
        ctx.log_exchange("chat", messages, [s.content for s in samples.values()])
        return {
            **head,
            "object": "chat.completion",
            "system_fingerprint": None,
            "choices": [{"index": i, "message": message(s), "finish_reason": s.finish_reason,
                         "logprobs": {"content": s.logprobs} if top is not None else None}
                        for i, s in samples.items()],
            "usage": usage(prompt_tokens, samples),
        }

    @router.post("/completions", responses=answer(Completion, streamed=True))
    async def completions(body: CompletionRequest, request: Request, owner: str = Depends(guard)):
        ctx.check_model(body.model)
        prompt = body.prompt[0] if isinstance(body.prompt, list) else body.prompt
        prompt_ids = await ctx.encode(prompt)
        prompt_tokens = ctx.count_prompt(prompt_ids, "prompt")
        params = ctx.sampling(body, ctx.completion_tokens(prompt_tokens, body.max_tokens), stop_list(body.stop),
                              max(1, body.logprobs) if body.logprobs is not None else None)
        ticket = await ctx.admit(request, prompt, prompt_ids, params, prompt_tokens)
        head = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
                "model": ctx.model_name}

        def legacy_logprobs(delta) -> dict | None:
            if body.logprobs is None:
                return None
            entries = token_logprobs(ctx.tokenizer, delta, body.logprobs)
            return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                    "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries]}

        samples = new_samples(body.n, None)
        # A raw completion has no think block to split: any reasoning the engine split off is plain text here.
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = CompletionStream(ctx, head, samples, prompt_tokens, include_usage, legacy_logprobs)
            return sse_response(stream, ctx.worker, ticket, settings.keepalive_s)
        pieces: dict[int, list] = {i: [] for i in samples}
        done = await collect(request, ctx.worker, ticket, samples, settings.keepalive_s,
                             lambda s, d: pieces[d.index].append(d))
        count_completion(ctx, samples)
        if not done:
            return JSONResponse({}, 499)
        ctx.log_exchange("completion", prompt, [s.raw for s in samples.values()])

        def merged_logprobs(i: int) -> dict | None:
            parts = [legacy_logprobs(d) for d in pieces[i]]
            if body.logprobs is None:
                return None
            return {k: [x for p in parts for x in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs")}

        return {
            **head,
            "choices": [{"index": i, "text": s.raw, "logprobs": merged_logprobs(i), "finish_reason": s.finish_reason}
                        for i, s in samples.items()],
            "usage": usage(prompt_tokens, samples),
        }

    model_card = {"id": ctx.model_name, "object": "model", "created": int(time.time()), "owned_by": "seekling",
                  "max_model_len": ctx.context}  # (vLLM's field: the context, prompt and completion together)

    @router.get("/models", responses=answer(ModelList))
    async def list_models(owner: str = Depends(guard)):
        return {"object": "list", "data": [model_card]}

    @router.get("/models/{name:path}", responses=answer(Model))
    async def get_model(name: str, owner: str = Depends(guard)):
        ctx.check_model(name)
        return model_card

    return router
