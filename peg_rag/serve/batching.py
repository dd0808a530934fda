"""Dynamic batching: concurrent requests share forward passes.

One asyncio task forms batches and runs each in a worker thread (the event loop keeps
serving while the model computes). How a batch is formed:

- **Quiet: at once.** A request is dispatched as soon as the model is free; a lone client
  never waits for company.
- **Busy: gather.** Requests that arrive while a batch computes queue up and go together in
  the next one, up to ``max_batch_tokens`` padded tokens (texts x longest text). When the
  last batch served several requests (a sign of concurrent clients, whose next requests
  arrive a moment after their answers), the batcher also waits up to ``max_wait`` for the
  batch to fill.
- **Fair.** Texts are taken round-robin, one per queued request, so a large request is
  split over several batches and the small requests behind it go in the next batch; a
  text too long to join the batch opens the next one.
- **Cancellation.** A cancelled request (its client went away) leaves the queue: its texts
  that have not started are never computed.
- With ``enabled=False`` requests never share a forward pass (the baseline the batching is
  measured against).

Each request gets exactly its own rows, in its order.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")


@dataclass
class BatchStats:
    """One forward pass, for the metrics: texts, requests served, padded tokens, seconds
    computing, and the queue time of each request that started in it."""

    texts: int
    requests: int
    padded_tokens: int
    seconds: float
    queued: list[float]


@dataclass(eq=False)
class _Request(Generic[Item]):
    items: Sequence[Item]
    costs: Sequence[int]
    future: asyncio.Future[list[Any]]
    arrived: float
    rows: list[Any] = field(default_factory=list)
    next: int = 0  # first item not yet dispatched
    finished: int = 0  # items whose rows are back

    def __post_init__(self) -> None:
        self.rows = [None] * len(self.items)


class DynamicBatcher(Generic[Item]):
    """Run ``forward(items) -> rows`` (one row per item, in order) over batches of the items
    of concurrent :meth:`submit` calls, in ``executor``.

    ``cost`` of an item is its token count; a batch is kept within ``max_batch_tokens``
    padded tokens, except that a single item always forms a batch. ``on_batch`` receives a
    :class:`BatchStats` after each forward pass.
    """

    def __init__(
        self,
        forward: Callable[[list[Item]], Sequence[Any]],
        executor: Executor,
        *,
        max_batch_tokens: int = 16_384,
        max_wait: float = 0.005,
        enabled: bool = True,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.forward = forward
        self.executor = executor
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait
        self.enabled = enabled
        self.on_batch = on_batch
        self._queue: deque[_Request[Item]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_requests = 0  # requests the last batch served

    async def submit(self, items: Sequence[Item], costs: Sequence[int]) -> list[Any]:
        """The rows of ``items``, in order. Cancelling the caller drops its queued items."""
        if len(items) != len(costs):
            raise ValueError("give one cost per item")
        if not items:
            return []
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        request = _Request(items, costs, future, time.perf_counter())
        self._queue.append(request)
        self._wake.set()
        try:
            return await future
        finally:
            if request in self._queue:  # cancelled (or failed) before all items started
                self._queue.remove(request)

    async def close(self) -> None:
        """Stop forming batches; queued requests fail with RuntimeError."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for request in self._queue:
            if not request.future.done():
                request.future.set_exception(RuntimeError("the server is shutting down"))
        self._queue.clear()

    # ------------------------------------------------------------------ forming batches

    def _queued_cost(self) -> int:
        pending = [c for r in self._queue for c in r.costs[r.next :]]
        return max(pending, default=0) * len(pending)

    async def _gather(self) -> None:
        """Under concurrent load, wait up to max_wait (from the oldest queued request) for
        the batch to fill."""
        if not self.enabled or self._last_requests < 2 or self.max_wait <= 0:
            return
        deadline = self._queue[0].arrived + self.max_wait
        while self._queued_cost() < self.max_batch_tokens:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[tuple[_Request[Item], int]]:
        """The next batch: round-robin over the queued requests, one item each per round,
        until the padded-token budget is reached. The request whose item did not fit goes
        first next time, so a long text is not passed over for ever."""
        batch: list[tuple[_Request[Item], int]] = []
        width = 0
        requests = list(self._queue) if self.enabled else list(self._queue)[:1]
        while requests:
            for request in list(requests):
                cost = request.costs[request.next]
                if batch and max(width, cost) * (len(batch) + 1) > self.max_batch_tokens:
                    self._queue.rotate(-self._queue.index(request))
                    return batch
                batch.append((request, request.next))
                width = max(width, cost)
                request.next += 1
                if request.next == len(request.items):
                    requests.remove(request)
                    self._queue.remove(request)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            await self._gather()
            if not self._queue:  # everything queued was cancelled meanwhile
                continue
            batch = self._take()
            started = time.perf_counter()
            queued = [started - r.arrived for r, i in batch if i == 0]
            served = {r for r, _ in batch}
            try:
                rows = await loop.run_in_executor(
                    self.executor, self.forward, [r.items[i] for r, i in batch]
                )
                if len(rows) != len(batch):
                    raise RuntimeError(f"forward returned {len(rows)} rows for {len(batch)} items")
                seconds = time.perf_counter() - started
            except Exception as exc:  # fail the requests of this batch, keep serving others
                self._fail(served, exc)
                continue
            self._last_requests = len(served)
            for (request, i), row in zip(batch, rows, strict=True):
                request.rows[i] = row
                request.finished += 1
                if request.finished == len(request.items) and not request.future.done():
                    request.future.set_result(request.rows)
            if self.on_batch is not None:
                width = max(r.costs[i] for r, i in batch)
                stats = BatchStats(len(batch), len(served), width * len(batch), seconds, queued)
                self.on_batch(stats)

    def _fail(self, requests: set[_Request[Item]], exc: Exception) -> None:
        for request in requests:
            if request in self._queue:
                self._queue.remove(request)
            if not request.future.done():
                request.future.set_exception(exc)
