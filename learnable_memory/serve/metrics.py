"""Prometheus metrics of one app (prometheus-client), and the ASGI middleware that counts requests.

Each app has its own ``CollectorRegistry``, so several apps in one process (tests, embedding) do not
clash. With several worker processes (uvicorn ``--workers``), set ``PROMETHEUS_MULTIPROC_DIR`` to an
empty directory before they start: prometheus-client then keeps every process's values in files there,
and ``/metrics`` of any worker reports the sum over all of them (its multiprocess mode).

Metrics (prefix ``learnable_memory_``): ``requests_total`` and ``request_errors_total`` by endpoint
(the route's path template) and status, ``request_seconds`` (latency histogram by endpoint),
``batch_images`` and ``batch_requests`` (histograms of images and of requests per model pass),
``forward_seconds`` (time of a pass), ``task_images_total`` (images answered per task, ``"base"``
included), ``loaded_adapters`` and ``queued_images`` (gauges, per live process).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .inference import Chunk

PREFIX = "learnable_memory_"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def multiprocess_mode() -> bool:
    """Whether prometheus-client keeps values in files shared by worker processes."""
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """The metrics of one app, in their own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(PREFIX + "requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "method", "status"], registry=r)
        self.errors = Counter(PREFIX + "request_errors", "HTTP requests answered with an error status (>= 400)",
                              ["endpoint", "status"], registry=r)
        self.latency = Histogram(PREFIX + "request_seconds", "Time from request to response, by endpoint",
                                 ["endpoint"], registry=r)
        self.batch_images = Histogram(PREFIX + "batch_images", "Images per model pass", buckets=SIZE_BUCKETS,
                                      registry=r)
        self.batch_requests = Histogram(PREFIX + "batch_requests", "Requests per model pass", buckets=SIZE_BUCKETS,
                                        registry=r)
        self.forward_seconds = Histogram(PREFIX + "forward_seconds", "Time of one model pass (a batch)", registry=r)
        self.task_images = Counter(PREFIX + "task_images", "Images answered per task ('base' included)", ["task"],
                                   registry=r)
        self.loaded_adapters = Gauge(PREFIX + "loaded_adapters", "Tasks loaded (the base model not counted)",
                                     registry=r, multiprocess_mode="liveall")
        self.queued_images = Gauge(PREFIX + "queued_images", "Images waiting for a model pass", registry=r,
                                   multiprocess_mode="livesum")

    def observe_batch(self, chunks: Sequence[Chunk], seconds: float) -> None:
        self.batch_images.observe(sum(c.n for c in chunks))
        self.batch_requests.observe(len({c.request for c in chunks}))
        self.forward_seconds.observe(seconds)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type (all worker processes in multiprocess mode)."""
        if multiprocess_mode():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    @staticmethod
    def process_exit() -> None:
        """Drop this process's live gauges (multiprocess mode), as a worker stops."""
        if multiprocess_mode():
            mark_process_dead(os.getpid())


class MetricsMiddleware:
    """Counts every HTTP request by its route's path template (``/v1/adapters/{task}``, not the task), so
    the number of series stays bounded; requests no route matches count as ``"unmatched"``."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app fails before it starts a response

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = route.path if isinstance(route, Route) else "unmatched"
            self.metrics.observe_request(endpoint, scope["method"], status, time.perf_counter() - start)
