"""The OpenAI-compatible API (/v1), the chat web app (/), its history (/api/conversations) and /metrics.

Request flow: validate (422 schema, 400 values) -> render the chat template and count prompt tokens ->
admit into the engine worker (429 when the queue is full) -> stream deltas as SSE, or collect them.
Answers carry DeepSeek's `reasoning_content` beside `content`. Every error has OpenAI's error shape.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import time
import uuid
from collections import defaultdict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from seekling.serve.security import (
    APIError,
    Authenticator,
    BodyLimitMiddleware,
    RateLimiter,
    Settings,
    error_body,
    error_response,
    load_key_hashes,
)
from seekling.serve.store import Store
from seekling.serve.worker import EngineFailure, EngineWorker, Ticket

log = logging.getLogger("seekling.serve")
STATIC_DIR = Path(__file__).parent / "static"
KEEPALIVE = object()  # marker yielded by `_deltas` when nothing arrived for `keepalive_s`
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# ---------------------------------------------------------------------------------------------- schemas


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (user, metadata...) are accepted, unused
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    logprobs: int | None = None  # the legacy API: how many top logprobs per token


class StoredMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str
    reasoning: str | None = None
    thought_s: float | None = None


class ConversationIn(BaseModel):
    title: str = "New chat"
    messages: list[StoredMessage] = []
    system: str = ""
    settings: dict[str, Any] = {}


class ConversationUpdate(BaseModel):
    title: str | None = None
    messages: list[StoredMessage] | None = None
    system: str | None = None
    settings: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------- metrics


class Metrics:
    """Prometheus counters and a latency histogram, rendered by hand in the text exposition format."""

    def __init__(self):
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)  # (route, method, status)
        self.latency: dict[str, list[int]] = {}  # route -> cumulative bucket counts (+Inf last)
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests[(route, method, status)] += 1
        buckets = self.latency.setdefault(route, [0] * (len(LATENCY_BUCKETS) + 1))
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
        buckets[-1] += 1
        self.latency_sum[route] += seconds

    def render(self, gauges: dict[str, float]) -> str:
        out = [
            "# HELP seekling_requests_total HTTP requests by route, method and status.",
            "# TYPE seekling_requests_total counter",
        ]
        for (route, method, status), count in sorted(self.requests.items()):
            out.append(f'seekling_requests_total{{route="{route}",method="{method}",status="{status}"}} {count}')
        out += [
            "# HELP seekling_request_duration_seconds Time from request to the last byte of the answer.",
            "# TYPE seekling_request_duration_seconds histogram",
        ]
        for route, buckets in sorted(self.latency.items()):
            for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), buckets, strict=True):
                out.append(f'seekling_request_duration_seconds_bucket{{route="{route}",le="{bound}"}} {count}')
            out.append(f'seekling_request_duration_seconds_sum{{route="{route}"}} {self.latency_sum[route]:.6f}')
            out.append(f'seekling_request_duration_seconds_count{{route="{route}"}} {buckets[-1]}')
        out += [
            "# HELP seekling_prompt_tokens_total Prompt tokens admitted.",
            "# TYPE seekling_prompt_tokens_total counter",
            f"seekling_prompt_tokens_total {self.prompt_tokens}",
            "# HELP seekling_completion_tokens_total Tokens generated.",
            "# TYPE seekling_completion_tokens_total counter",
            f"seekling_completion_tokens_total {self.completion_tokens}",
        ]
        for name, value in gauges.items():
            out += [f"# TYPE seekling_{name} gauge", f"seekling_{name} {value:g}"]
        return "\n".join(out) + "\n"


class MetricsMiddleware:
    """Pure ASGI, outermost: sees every answer (413s and streams included) and times it to its last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def timed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            # Label by route template, never by raw path, so unknown URLs can't grow the label set.
            route = scope.get("route")
            label = (
                route.path
                if route is not None and hasattr(route, "path")
                else ("/static" if scope["path"].startswith("/static/") else "unmatched")
            )
            self.metrics.observe(label, scope["method"], status, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- helpers


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, bool]:
    """A readable message, the offending parameter, and whether the body was not JSON at all."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return "The request body is not valid JSON.", None, True
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        param = param or (".".join(loc) or None)
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return "Invalid request: " + "; ".join(parts), param, False


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


def _check_range(value, lo, hi, param: str, lo_open: bool = False) -> None:
    if value is None:
        return
    if value < lo or value > hi or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise _bad(f"{param} must be in {bound}, got {value}.", param)


def _finish(reason) -> str:
    return reason if reason in ("stop", "length") else "stop"


async def _deltas(ticket: Ticket, keepalive_s: float):
    """Yield the request's deltas as they arrive, or KEEPALIVE after `keepalive_s` of silence.

    One pending `queue.get()` task is kept across timeouts, so a delta is never lost to a timeout.
    """
    getter = None
    try:
        while True:
            if getter is None:
                getter = asyncio.ensure_future(ticket.queue.get())
            done, _ = await asyncio.wait({getter}, timeout=keepalive_s)
            if not done:
                yield KEEPALIVE
                continue
            item, getter = getter.result(), None
            if item is None:
                return
            if isinstance(item, EngineFailure):
                raise item
            yield item
    finally:
        if getter is not None:
            getter.cancel()


class Choice:
    """What one sample (index) has produced so far."""

    def __init__(self):
        self.text, self.reasoning, self.raw = [], [], []  # raw: reasoning and text in order (legacy API)
        self.tokens = self.reasoning_tokens = 0
        self.finish_reason = None
        self.logprobs: list[dict] = []

    def add(self, delta) -> None:
        self.text.append(delta.text or "")
        self.reasoning.append(delta.reasoning or "")
        self.raw.append((delta.reasoning or "") + (delta.text or ""))
        n = len(delta.token_ids or ())
        self.tokens += n
        if delta.reasoning and not delta.text:
            self.reasoning_tokens += n
        if delta.finish_reason is not None:
            self.finish_reason = _finish(delta.finish_reason)


def _usage(prompt_tokens: int, choices: dict[int, Choice]) -> dict:
    completion = sum(c.tokens for c in choices.values())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "completion_tokens_details": {"reasoning_tokens": sum(c.reasoning_tokens for c in choices.values())},
    }


# ---------------------------------------------------------------------------------------------- the app


def create_app(engine, settings: Settings) -> FastAPI:
    from seekling.engine.sampling import SamplingParams

    tokenizer = engine.tokenizer
    model_name = settings.model_name or (
        os.path.basename(os.path.normpath(settings.model)) if settings.model else "seekling"
    )
    auth = Authenticator(load_key_hashes(settings))
    settings = dataclasses.replace(settings, api_key=[])  # from here on only the hashes are kept
    limiter = RateLimiter(settings.rate_limit)
    # A request that leaves a sampling field out gets the checkpoint's recommendation (generation_config.json,
    # e.g. temperature 0.6 / top_p 0.95 for the R1 models), as vLLM does; max_tokens stays the server's cap.
    sampling_defaults = {k: v for k, v in (getattr(engine, "generation_defaults", None) or {}).items()
                         if k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
    worker = EngineWorker(engine, settings.max_queue)
    store = Store(settings.data_dir)
    metrics = Metrics()
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()
        store.close()

    app = FastAPI(title="seekling", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.store, app.state.metrics = worker, store, metrics
    app.state.key_hashes = auth.key_hashes
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origin:  # closed unless origins are named
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin,
            allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # ------------------------------------------------------------------ errors, always OpenAI-shaped
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        message, param, not_json = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), 400 if not_json else 422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        message = (
            f"Invalid URL ({request.method} {request.url.path})" if exc.status_code in (404, 405) else str(exc.detail)
        )
        return JSONResponse(
            error_body(message, "invalid_request_error"),
            exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("The server had an error while processing your request.", "server_error"), 500)

    def guard(request: Request) -> str:
        """Every route but /health and the static app shell: authenticate, then rate-limit per key."""
        owner = auth.owner(request)
        limiter.check(owner)
        return owner

    # ------------------------------------------------------------------ request -> engine
    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{model_name}'.",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def sampling(body: SamplingFields, max_tokens: int | None, logprobs: int | None) -> Any:
        if not 1 <= body.n <= settings.max_n:
            raise _bad(f"n must be between 1 and {settings.max_n}, got {body.n}.", "n")
        _check_range(body.temperature, 0.0, 2.0, "temperature")
        _check_range(body.top_p, 0.0, 1.0, "top_p", lo_open=True)
        _check_range(body.presence_penalty, -2.0, 2.0, "presence_penalty")
        _check_range(body.frequency_penalty, -2.0, 2.0, "frequency_penalty")
        _check_range(body.seed, 0, 2**63 - 1, "seed")
        if body.top_k is not None and body.top_k != -1 and body.top_k < 1:
            raise _bad(f"top_k must be -1 (off) or >= 1, got {body.top_k}.", "top_k")
        if max_tokens is not None and not 1 <= max_tokens <= settings.max_tokens_cap:
            raise _bad(f"max_tokens must be between 1 and {settings.max_tokens_cap}, got {max_tokens}.", "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise _bad("stop must be up to 4 non-empty strings.", "stop")
        kwargs = {**sampling_defaults, "n": body.n, "max_tokens": max_tokens or settings.max_tokens_cap, "stop": stop}
        for name in ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty"):
            if getattr(body, name) is not None:
                kwargs[name] = getattr(body, name)
        if logprobs is not None:
            kwargs["logprobs"] = logprobs
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:  # the engine's own checks (the bounds above catch the common cases first)
            raise _bad(str(e)) from e

    def chat_messages(body: ChatCompletionRequest) -> list[dict]:
        if not body.messages:
            raise _bad("messages must not be empty.", "messages")
        if len(body.messages) > settings.max_messages:
            raise _bad(f"Too many messages: {len(body.messages)} > {settings.max_messages}.", "messages")
        out = []
        for i, m in enumerate(body.messages):
            if m.role not in ("system", "user", "assistant"):
                raise _bad(
                    f"messages[{i}].role must be system, user or assistant, got '{m.role}'.",
                    f"messages.{i}.role",
                )
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
            out.append({"role": m.role, "content": content})  # earlier reasoning is dropped, as R1 expects
        if out[-1]["role"] == "assistant":
            raise _bad("The last message must be from the user or the system.", "messages")
        return out

    def count_prompt(prompt_ids: list[int]) -> int:
        if len(prompt_ids) > settings.max_prompt_tokens:
            raise _bad(
                f"The prompt is {len(prompt_ids)} tokens, over the limit of {settings.max_prompt_tokens}.",
                "messages",
            )
        return len(prompt_ids)

    def admit(prompt, params, n: int) -> Ticket:
        try:
            ticket = worker.submit(prompt, params, n)
        except ValueError as e:  # the engine refused the request (e.g. longer than the model's context)
            raise _bad(str(e)) from e
        if ticket is None:
            raise APIError(
                429,
                "The server is busy: the request queue is full. Retry shortly.",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        return ticket

    def token_logprobs(delta, top: int) -> list[dict]:
        """Chat-format logprobs for a delta; the engine gives, per token, {token_id: logprob} of the top
        candidates including the sampled one."""
        out = []
        for tid, cands in zip(delta.token_ids or (), getattr(delta, "logprobs", None) or (), strict=False):

            def entry(i, lp):
                s = tokenizer.decode([i])
                return {"token": s, "logprob": float(lp), "bytes": list(s.encode())}

            ranked = sorted(cands.items(), key=lambda kv: -kv[1])[:top]
            out.append(
                {
                    **entry(tid, cands.get(tid, float("-inf"))),
                    "top_logprobs": [entry(i, lp) for i, lp in ranked],
                }
            )
        return out

    async def collect(request: Request, ticket: Ticket, n: int, top: int | None) -> dict[int, Choice] | None:
        """Gather a non-streamed answer; None if the client went away (the request is then aborted)."""
        choices = {i: Choice() for i in range(n)}
        try:
            async for item in _deltas(ticket, min(settings.keepalive_s, 1.0)):
                if item is KEEPALIVE:
                    if await request.is_disconnected():
                        return None
                    continue
                choices[item.index].add(item)
                if top is not None:
                    choices[item.index].logprobs += token_logprobs(item, top)
        except EngineFailure as e:
            raise APIError(500, f"The engine failed: {e}", "server_error") from e
        finally:
            worker.abort(ticket)  # a no-op once finished; frees the cache when the client left
        metrics.completion_tokens += sum(c.tokens for c in choices.values())
        return choices

    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def log_exchange(kind: str, prompt, choices: dict[int, Choice]) -> None:
        if settings.log_requests:  # prompts and outputs are private unless asked for
            log.info("%s prompt=%r outputs=%r", kind, prompt, ["".join(c.text) for c in choices.values()])

    # ------------------------------------------------------------------ /v1/chat/completions
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, owner: str = Depends(guard)):
        check_model(body.model)
        messages = chat_messages(body)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise _bad("Give max_tokens or max_completion_tokens, not both.", "max_completion_tokens")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = body.top_logprobs or 0
        if body.top_logprobs is not None and not body.logprobs:
            raise _bad("top_logprobs requires logprobs to be true.", "top_logprobs")
        _check_range(body.top_logprobs, 0, 20, "top_logprobs")
        params = sampling(body, max_tokens, max(1, top) if body.logprobs else None)
        prompt_tokens = count_prompt(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        ticket = admit(messages, params, body.n)
        metrics.prompt_tokens += prompt_tokens
        rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        head = {"id": rid, "created": created, "model": model_name}

        if not body.stream:
            choices = await collect(request, ticket, body.n, top if body.logprobs else None)
            if choices is None:
                return JSONResponse({}, 499)  # nobody is listening; the status is for the logs and metrics
            log_exchange("chat", messages, choices)
            return {
                **head,
                "object": "chat.completion",
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": i,
                        "message": {
                            "role": "assistant",
                            "content": "".join(c.text),
                            "reasoning_content": "".join(c.reasoning) or None,
                        },
                        "logprobs": {"content": c.logprobs} if body.logprobs else None,
                        "finish_reason": c.finish_reason,
                    }
                    for i, c in choices.items()
                ],
                "usage": _usage(prompt_tokens, choices),
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            choices = {i: Choice() for i in range(body.n)}
            chunk = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}
            extra = {"usage": None} if include_usage else {}
            try:
                for i in range(body.n):
                    yield sse(
                        {
                            **chunk,
                            "choices": [
                                {
                                    "index": i,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                            **extra,
                        }
                    )
                async for item in _deltas(ticket, settings.keepalive_s):
                    if item is KEEPALIVE:
                        yield ": keep-alive\n\n"
                        continue
                    choices[item.index].add(item)
                    delta = {}
                    if item.reasoning:
                        delta["reasoning_content"] = item.reasoning
                    if item.text:
                        delta["content"] = item.text
                    lp = {"content": token_logprobs(item, top)} if body.logprobs else None
                    yield sse(
                        {
                            **chunk,
                            "choices": [
                                {
                                    "index": item.index,
                                    "delta": delta,
                                    "logprobs": lp,
                                    "finish_reason": _finish(item.finish_reason)
                                    if item.finish_reason is not None
                                    else None,
                                }
                            ],
                            **extra,
                        }
                    )
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": _usage(prompt_tokens, choices)})
                yield "data: [DONE]\n\n"
                log_exchange("chat", messages, choices)
            except EngineFailure as e:
                yield sse(error_body(f"The engine failed: {e}", "server_error"))
            finally:
                worker.abort(ticket)  # client gone (the task is cancelled here) -> free its slot and cache
                metrics.completion_tokens += sum(c.tokens for c in choices.values())

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # ------------------------------------------------------------------ /v1/completions
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, owner: str = Depends(guard)):
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise _bad("Only one prompt per request is supported.", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise _bad("prompt must not be empty.", "prompt")
        _check_range(body.logprobs, 0, 20, "logprobs")
        params = sampling(body, body.max_tokens, max(1, body.logprobs) if body.logprobs is not None else None)
        prompt_tokens = count_prompt(tokenizer.encode(prompt))
        ticket = admit(prompt, params, body.n)
        metrics.prompt_tokens += prompt_tokens
        rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_name}

        def legacy_logprobs(entries: list[dict]) -> dict | None:
            if body.logprobs is None:
                return None
            return {
                "tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            }

        # A raw completion has no think block to split: any reasoning the engine split off is plain text here.
        if not body.stream:
            choices = await collect(request, ticket, body.n, body.logprobs)
            if choices is None:
                return JSONResponse({}, 499)
            log_exchange("completion", prompt, choices)
            return {
                **head,
                "choices": [
                    {
                        "index": i,
                        "text": "".join(c.raw),
                        "logprobs": legacy_logprobs(c.logprobs),
                        "finish_reason": c.finish_reason,
                    }
                    for i, c in choices.items()
                ],
                "usage": _usage(prompt_tokens, choices),
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            choices = {i: Choice() for i in range(body.n)}
            try:
                async for item in _deltas(ticket, settings.keepalive_s):
                    if item is KEEPALIVE:
                        yield ": keep-alive\n\n"
                        continue
                    choices[item.index].add(item)
                    yield sse(
                        {
                            **head,
                            "choices": [
                                {
                                    "index": item.index,
                                    "text": (item.reasoning or "") + (item.text or ""),
                                    "logprobs": legacy_logprobs(token_logprobs(item, body.logprobs or 0)),
                                    "finish_reason": _finish(item.finish_reason)
                                    if item.finish_reason is not None
                                    else None,
                                }
                            ],
                        }
                    )
                if include_usage:
                    yield sse({**head, "choices": [], "usage": _usage(prompt_tokens, choices)})
                yield "data: [DONE]\n\n"
            except EngineFailure as e:
                yield sse(error_body(f"The engine failed: {e}", "server_error"))
            finally:
                worker.abort(ticket)
                metrics.completion_tokens += sum(c.tokens for c in choices.values())

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------------ models, health, metrics
    model_card = {"id": model_name, "object": "model", "created": started, "owned_by": "seekling"}

    @app.get("/v1/models")
    async def list_models(owner: str = Depends(guard)):
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, owner: str = Depends(guard)):
        check_model(name)
        return model_card

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus(owner: str = Depends(guard)):
        stats = engine.stats()
        gauges = {
            "queue_depth": worker.queue_depth(),
            "requests_in_flight": worker.in_flight(),
            "running": stats.get("running", 0),
            "waiting": stats.get("waiting", 0),
        }
        for key, value in stats.items():  # cache use under whatever name the engine reports it
            if "cache" in key and isinstance(value, (int, float)):
                gauges[key] = value
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ history (web app)
    def found(conv: dict | None) -> dict:
        if conv is None:  # another owner's conversation is reported exactly like a missing one
            raise APIError(404, "No such conversation.", "invalid_request_error", "id", "not_found")
        return conv

    @app.get("/api/conversations")
    def list_conversations(owner: str = Depends(guard)):
        return {"data": store.list(owner)}

    @app.post("/api/conversations", status_code=201)
    def create_conversation(body: ConversationIn, owner: str = Depends(guard)):
        data = body.model_dump(exclude_none=True)
        return store.create(owner, data.pop("title"), data)

    @app.get("/api/conversations/{conv_id}")
    def get_conversation(conv_id: str, owner: str = Depends(guard)):
        return found(store.get(owner, conv_id))

    @app.put("/api/conversations/{conv_id}")
    def update_conversation(conv_id: str, body: ConversationUpdate, owner: str = Depends(guard)):
        data = body.model_dump(exclude_none=True)
        return found(store.update(owner, conv_id, data.pop("title", None), data))

    @app.delete("/api/conversations/{conv_id}")
    def delete_conversation(conv_id: str, owner: str = Depends(guard)):
        if not store.delete(owner, conv_id):
            found(None)
        return {"id": conv_id, "deleted": True}

    @app.get("/api/config")
    def web_config(owner: str = Depends(guard)):
        """What the web app needs: the model id and the server's caps (to bound its settings)."""
        return {"model": model_name, "max_tokens_cap": settings.max_tokens_cap}

    # ------------------------------------------------------------------ the web app shell (no data in it)
    csp = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(
            STATIC_DIR / "index.html",
            headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"},
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# ---------------------------------------------------------------------------------------------- CLI


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The `seekling serve` flags; each also reads SEEKLING_<NAME> (e.g. SEEKLING_API_KEY=k1,k2)."""
    d = Settings.from_env()
    a = parser.add_argument
    a("--model", default=d.model, required=d.model is None, help="model directory (Hugging Face layout)")
    a("--model-name", default=d.model_name, help="model id shown by /v1/models (default: directory name)")
    a("--host", default=d.host, help="bind address (default 127.0.0.1: local only)")
    a("--port", type=int, default=d.port)
    a("--api-key", action="append", default=None, help="accepted API key (repeatable)")
    a("--api-key-file", default=d.api_key_file, help="file with one API key a line")
    a("--rate-limit", type=float, default=d.rate_limit, help="requests per minute per key (0 = no limit)")
    a("--max-body-bytes", type=int, default=d.max_body_bytes)
    a("--max-messages", type=int, default=d.max_messages)
    a("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    a("--max-tokens-cap", type=int, default=d.max_tokens_cap, help="upper bound (and default) for max_tokens")
    a("--max-queue", type=int, default=d.max_queue, help="requests waiting to start before 429s")
    a(
        "--max-num-seqs",
        type=int,
        default=d.max_num_seqs,
        help="engine batch size (1 = one request at a time)",
    )
    a(
        "--cors-origin",
        action="append",
        default=None,
        help="allowed CORS origin (repeatable; none by default)",
    )
    a("--log-requests", action="store_true", default=d.log_requests, help="log prompts and outputs")
    a("--data-dir", default=d.data_dir, help="where the chat history database lives")
    # load options (not Settings fields: they only matter when the server loads the model itself)
    a("--dtype", choices=("float32", "fp32", "bfloat16", "bf16", "float16", "fp16"), default=None,
      help="weights dtype (default: fp32 on CPU when it fits, else the checkpoint's)")
    a("--quantize", choices=("int8",), default=None,
      help="int8 Linear layers: 7-bit weights, per-token 8-bit activations (dense Qwen2/Llama; ~2x decode)")
    a("--compile", action="store_true", default=False,
      help="decode steps of up to 16 requests as one compiled graph (seekling's DeepSeek-V3 models: 1.6x "
           "tokens/s for one client, ~1.2x for 2-16; compiles at start, ~30 s the first time)")


def run_serve(args: argparse.Namespace) -> None:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    serve(Settings.from_env(**overrides), dtype=getattr(args, "dtype", None), quantize=getattr(args, "quantize", None),
          compile=getattr(args, "compile", False))


def load_engine(settings: Settings, dtype: str | None = None, quantize: str | None = None, compile: bool = False):
    from seekling.engine import Engine

    kwargs = {"max_num_seqs": settings.max_num_seqs} if settings.max_num_seqs else {}
    return Engine(settings.model, dtype=dtype, quantize=quantize, compile=compile, **kwargs)


def serve(settings: Settings, dtype: str | None = None, quantize: str | None = None, compile: bool = False) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.model is None:
        raise ValueError("serve needs --model (or SEEKLING_MODEL)")
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not (settings.api_key or settings.api_key_file):
        log.warning("listening on %s without an API key: anyone who can reach it can use it", settings.host)
    app = create_app(load_engine(settings, dtype, quantize, compile), settings)
    log.info("seekling serve: http://%s:%d (history in %s)", settings.host, settings.port, settings.data_dir)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
