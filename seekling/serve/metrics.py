"""Prometheus metrics (prometheus-client), one registry per app so that several servers in one process (the
tests) never share counters. Request counts and latencies are observed by an outermost ASGI middleware, so
413s and streams (timed to their last byte) are counted too; engine gauges are read at scrape time."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class EngineGauges:
    """A custom collector: the worker's queue and the engine's stats, read when Prometheus scrapes."""

    def __init__(self, engine, worker):
        self.engine, self.worker = engine, worker

    def collect(self):
        stats = self.engine.stats()
        values = {"queue_depth": self.worker.queue_depth(), "requests_in_flight": self.worker.in_flight(),
                  "running": stats.get("running", 0), "waiting": stats.get("waiting", 0)}
        for key, value in stats.items():  # cache use under whatever name the engine reports it
            if "cache" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                values[key] = value
        for name, value in values.items():
            yield GaugeMetricFamily(f"seekling_{name}", f"Engine {name.replace('_', ' ')}.", value=value)


class Metrics:
    def __init__(self, engine, worker):
        self.registry = CollectorRegistry()
        self.requests = Counter("seekling_requests", "HTTP requests by route, method and status.",
                                ("route", "method", "status"), registry=self.registry)
        self.latency = Histogram("seekling_request_duration_seconds",
                                 "Time from request to the last byte of the answer.", ("route",),
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("seekling_prompt_tokens", "Prompt tokens admitted.", registry=self.registry)
        self.cached_tokens = Counter("seekling_prompt_cached_tokens", "Prompt tokens served from the prefix cache.",
                                     registry=self.registry)
        self.completion_tokens = Counter("seekling_completion_tokens", "Tokens generated.", registry=self.registry)
        self.registry.register(EngineGauges(engine, worker))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
            label = (route.path if route is not None and hasattr(route, "path")
                     else ("/static" if scope["path"].startswith("/static/") else "unmatched"))
            self.metrics.observe(label, scope["method"], status, time.perf_counter() - start)
