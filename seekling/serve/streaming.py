"""From engine deltas to answers: each sample's state (`Sample`), collecting a whole answer, and the one SSE
helper that chat completions, completions and Anthropic messages stream through.

A route supplies a `Renderer` (what its wire format says at the start, for each delta, at the end, on an
engine failure and while nothing happens); `sse_response` does the rest: keep-alives, the client hanging up
(the request is aborted and its cache freed), the token metrics.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse

from seekling.serve.security import APIError
from seekling.serve.tools import CallArgs, CallStart, Event, Text, ToolParser
from seekling.serve.worker import EngineFailure, EngineWorker, Ticket

KEEPALIVE = object()  # marker yielded by `deltas` when nothing arrived for `keepalive_s`


@dataclass
class Reasoning:
    text: str


async def deltas(ticket: Ticket, keepalive_s: float) -> AsyncIterator[Any]:
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


@dataclass
class Call:
    id: str
    name: str
    arguments: str = ""


@dataclass
class Sample:
    """What one sample (index) has produced so far. With a tool parser, the answer text goes through it and
    comes out as text and tool calls; without, it is text."""

    parser: ToolParser | None = None
    reasoning: str = ""
    content: str = ""
    raw: str = ""  # reasoning and text in order, as generated (the legacy completions API)
    calls: list[Call] = field(default_factory=list)
    tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    engine_finish: str | None = None
    logprobs: list[dict] = field(default_factory=list)
    cut: bool = False  # the answer ended inside a tool call (which is then text, not a call)

    def add(self, delta) -> list[Event | Reasoning]:
        """Take one engine delta; returns the events it releases, in order."""
        final = delta.finish_reason is not None
        self.raw += (delta.reasoning or "") + (delta.text or "")
        n = len(delta.token_ids or ())
        self.tokens += n
        if delta.reasoning and not delta.text:
            self.reasoning_tokens += n
        self.cached_tokens = max(self.cached_tokens, getattr(delta, "num_cached_tokens", 0) or 0)
        if final:
            self.engine_finish = delta.finish_reason
        events: list[Event | Reasoning] = [Reasoning(delta.reasoning)] if delta.reasoning else []
        if self.parser is not None:
            events += self.parser.push(delta.text or "", final=final)
        elif delta.text:
            events.append(Text(delta.text))
        for e in events:
            if isinstance(e, Reasoning):
                self.reasoning += e.text
            elif isinstance(e, Text):
                self.content += e.text
            elif isinstance(e, CallStart):
                self.calls.append(Call(e.id, e.name))
            elif isinstance(e, CallArgs):
                self.calls[e.index].arguments += e.text
        if final and self.parser is not None:
            self._drop_cut_call()
        return events

    def _drop_cut_call(self) -> None:
        """A call the answer ended inside (max_tokens, the context, a stop string) is not a call: its text, as the
        model wrote it, is kept in the content, and the calls are those that ended."""
        cut = self.parser.cut_call()
        if cut is not None:
            index, header = cut
            call = self.calls.pop(index)
            self.content += header + call.arguments
            self.cut = True

    @property
    def finished(self) -> bool:
        return self.engine_finish is not None

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's: length when max_tokens or the context cut the answer (whatever it was writing, a tool call
        too), else tool_calls when it holds calls that all ended, else stop (an abort, seen only when the client
        left, reads as stop)."""
        if self.engine_finish is None:
            return None
        if self.engine_finish == "length":
            return "length"
        return "tool_calls" if self.calls and not self.cut else "stop"


def new_samples(n: int, parser_factory) -> dict[int, Sample]:
    return {i: Sample(parser_factory() if parser_factory else None) for i in range(n)}


async def collect(request: Request, worker: EngineWorker, ticket: Ticket, samples: dict[int, Sample],
                  keepalive_s: float, on_delta=None) -> bool:
    """Gather a non-streamed answer into `samples`; False if the client went away (the request is aborted).
    `on_delta(sample, delta)` sees each delta (logprobs)."""
    try:
        async for item in deltas(ticket, min(keepalive_s, 1.0)):
            if item is KEEPALIVE:
                if await request.is_disconnected():
                    return False
                continue
            samples[item.index].add(item)
            if on_delta is not None:
                on_delta(samples[item.index], item)
    except EngineFailure as e:
        raise APIError(500, f"The engine failed: {e}", "server_error") from e
    finally:
        worker.abort(ticket)  # a no-op once finished; frees the cache when the client left
    return True


def sse(obj: dict, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Renderer(Protocol):
    keepalive: str  # what to send after `keepalive_s` of silence (an SSE comment, or Anthropic's ping)

    def start(self) -> Iterable[str]: ...
    def delta(self, item) -> Iterable[str]: ...
    def end(self) -> Iterable[str]: ...
    def failure(self, message: str) -> str: ...
    def close(self) -> None: ...  # always called last: the client may be gone


def sse_response(renderer: Renderer, worker: EngineWorker, ticket: Ticket, keepalive_s: float) -> StreamingResponse:
    async def events():
        try:
            for s in renderer.start():
                yield s
            async for item in deltas(ticket, keepalive_s):
                if item is KEEPALIVE:
                    yield renderer.keepalive
                    continue
                for s in renderer.delta(item):
                    yield s
            for s in renderer.end():
                yield s
        except EngineFailure as e:
            yield renderer.failure(f"The engine failed: {e}")
        finally:
            worker.abort(ticket)  # client gone (the task is cancelled here) -> free its slot and cache
            renderer.close()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
