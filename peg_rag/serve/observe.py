"""What ``GET /metrics`` reports: requests by route and status, request latency, and per
forward pass the batch sizes, queue time and compute time."""

from __future__ import annotations

import time
from typing import Any

from .batching import BatchStats
from .prometheus import LATENCY_BUCKETS, SIZE_BUCKETS, Counter, Histogram, render

TOKEN_BUCKETS = tuple(2**n for n in range(4, 17))


class ServerMetrics:
    """The server's counters and histograms."""

    def __init__(self) -> None:
        self.requests = Counter("peg_rag_requests_total", "HTTP requests by route and status.")
        self.latency = Histogram(
            "peg_rag_request_seconds", "Time to answer a request, by route.", LATENCY_BUCKETS
        )
        self.disconnects = Counter(
            "peg_rag_client_disconnects_total", "Requests whose client left before the answer."
        )
        self.batch_texts = Histogram(
            "peg_rag_batch_texts", "Texts (or pairs) per forward pass.", SIZE_BUCKETS
        )
        self.batch_requests = Histogram(
            "peg_rag_batch_requests", "Requests sharing a forward pass.", SIZE_BUCKETS
        )
        self.batch_tokens = Histogram(
            "peg_rag_batch_padded_tokens", "Padded tokens per forward pass.", TOKEN_BUCKETS
        )
        self.queue = Histogram(
            "peg_rag_queue_seconds",
            "Time from a request's arrival to its first forward pass.",
            LATENCY_BUCKETS,
        )
        self.forward = Histogram(
            "peg_rag_forward_seconds", "Time of one forward pass.", LATENCY_BUCKETS
        )

    def batch_observer(self, model: str) -> Any:
        """The ``on_batch`` hook of the batcher that runs ``model`` ("embeddings", "rerank")."""

        def observe(stats: BatchStats) -> None:
            self.batch_texts.observe(stats.texts, model=model)
            self.batch_requests.observe(stats.requests, model=model)
            self.batch_tokens.observe(stats.padded_tokens, model=model)
            self.forward.observe(stats.seconds, model=model)
            for seconds in stats.queued:
                self.queue.observe(seconds, model=model)

        return observe

    def render(self) -> str:
        return render(
            [
                self.requests,
                self.latency,
                self.disconnects,
                self.batch_texts,
                self.batch_requests,
                self.batch_tokens,
                self.queue,
                self.forward,
            ]
        )


class ObserveRequests:
    """ASGI middleware counting each HTTP request by route and status and timing it.

    Paths that are no route count as ``other``, so clients cannot create label values.
    """

    def __init__(self, app: Any, metrics: ServerMetrics, routes: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts

        async def recording_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.requests.inc(route=route, status=str(status))
            self.metrics.latency.observe(time.perf_counter() - started, route=route)
