"""The engine loop: one thread calls `engine.step()` and hands each delta to the asyncio request that owns it.

The engine batches every running request into each step (continuous batching), so the server keeps exactly
one thread driving it; request handlers only add, abort and read their own asyncio queue. A request counts
as "queued" from admission until its first delta arrives: that is the depth `--max-queue` bounds.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("seekling.serve")


class EngineFailure(Exception):
    """The engine failed this request: a fault of its own (a delta with finish_reason "error", the other requests
    went on), or step() itself raised (every request in flight at that moment is ended with this)."""


@dataclass
class Ticket:
    request_id: str
    queue: asyncio.Queue  # receives Delta objects, then None when every sample has finished
    loop: asyncio.AbstractEventLoop
    n: int
    started: bool = False  # the first delta has arrived (no longer queued)
    finished: set[int] = field(default_factory=set)
    admitted_at: float = field(default_factory=time.monotonic)


class EngineWorker:
    def __init__(self, engine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self.tickets: dict[str, Ticket] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.running = False
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="seekling-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.running = False
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def queue_depth(self) -> int:
        with self.lock:
            return sum(not t.started for t in self.tickets.values())

    def in_flight(self) -> int:
        with self.lock:
            return len(self.tickets)

    def submit(self, prompt, params, n: int, loop: asyncio.AbstractEventLoop, prompt_ids: list[int] | None = None
               ) -> Ticket | None:
        """Admit a request (from any thread; its deltas go to `loop`), or return None when the queue is full (the
        caller answers 429). `prompt_ids`: the prompt's tokens when the caller has them already."""
        with self.lock:
            if sum(not t.started for t in self.tickets.values()) >= self.max_queue:
                return None
            # The lock is held across add_request so that the ticket exists before step() can emit for it.
            request_id = self.engine.add_request(prompt, params, prompt_ids=prompt_ids)
            ticket = Ticket(request_id, asyncio.Queue(), loop, n)
            self.tickets[request_id] = ticket
        self.wake.set()
        return ticket

    def abort(self, ticket: Ticket) -> None:
        """Cancel a request (client gone, or finished reading); idempotent."""
        with self.lock:
            live = self.tickets.pop(ticket.request_id, None) is not None
        if live:
            self.engine.abort(ticket.request_id)

    def _loop(self) -> None:
        while self.running:
            if not self.engine.has_unfinished():
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # keep serving: fail the requests in flight, leave the thread alive
                log.exception("engine.step() failed")
                self._fail_all(e)
                continue
            with self.lock:
                for request_id, delta in outputs:
                    ticket = self.tickets.get(request_id)
                    if ticket is None:  # aborted meanwhile
                        continue
                    ticket.started = True
                    if delta.finish_reason == "error":  # this request alone failed
                        del self.tickets[request_id]
                        failure = EngineFailure(getattr(delta, "error", None) or "the request failed")
                        ticket.loop.call_soon_threadsafe(ticket.queue.put_nowait, failure)
                        continue
                    ticket.loop.call_soon_threadsafe(ticket.queue.put_nowait, delta)
                    if delta.finish_reason is not None:
                        ticket.finished.add(delta.index)
                        if len(ticket.finished) >= ticket.n:
                            del self.tickets[request_id]
                            ticket.loop.call_soon_threadsafe(ticket.queue.put_nowait, None)

    def _fail_all(self, error: Exception) -> None:
        with self.lock:
            tickets, self.tickets = list(self.tickets.values()), {}
        for t in tickets:
            try:
                self.engine.abort(t.request_id)
            except Exception:
                log.exception("engine.abort() failed after a step failure")
            t.loop.call_soon_threadsafe(t.queue.put_nowait, EngineFailure(str(error)))
