"""The dynamic batcher on its own, with a recording forward function: who shares a batch,
in which order rows come back, how large requests are split, and what cancelling drops."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from peg_rag.serve.batching import BatchStats, DynamicBatcher


class Forward:
    """Records each batch and answers ``row(item)``; ``hold()`` blocks the next pass until
    ``release()``, so a test can queue requests while the model is busy."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self._hold_next = False

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()
        self._hold_next = True

    def release(self) -> None:
        self.gate.set()

    def __call__(self, items: list[Any]) -> list[str]:
        self.batches.append(list(items))
        gate = self.gate if self._hold_next else None
        self._hold_next = False
        self.entered.set()
        if gate is not None:
            assert gate.wait(10)
        if "boom" in items:
            raise RuntimeError("the model failed")
        return [f"row:{item}" for item in items]


def run(test: Callable[[DynamicBatcher[Any], Forward], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        forward = Forward()
        with ThreadPoolExecutor(1) as executor:
            batcher: DynamicBatcher[Any] = DynamicBatcher(forward, executor, **options)
            try:
                await test(batcher, forward)
            finally:
                await batcher.close()

    asyncio.run(main())


async def busy(batcher: DynamicBatcher[Any], forward: Forward) -> asyncio.Task[list[Any]]:
    """A request whose forward pass is held: the model is busy until forward.release()."""
    forward.hold()
    first = asyncio.ensure_future(batcher.submit(["first"], [1]))
    while not forward.entered.is_set():
        await asyncio.sleep(0.001)
    return first


def submit(batcher: DynamicBatcher[Any], items: list[Any], cost: int = 1) -> asyncio.Task:
    return asyncio.ensure_future(batcher.submit(items, [cost] * len(items)))


def test_each_request_gets_exactly_its_own_rows_in_order():
    async def test(batcher, forward):
        first = await busy(batcher, forward)
        sizes = [1, 7, 2, 30, 1, 5]
        requests = [[f"r{n}-{i}" for i in range(size)] for n, size in enumerate(sizes)]
        tasks = [submit(batcher, items) for items in requests]
        await asyncio.sleep(0.01)  # all queued behind the held pass
        forward.release()
        answers = await asyncio.gather(first, *tasks)
        assert answers[0] == ["row:first"]
        for items, rows in zip(requests, answers[1:], strict=True):
            assert rows == [f"row:{item}" for item in items]
        computed = [item for batch in forward.batches for item in batch]
        assert sorted(computed) == sorted(["first", *(i for r in requests for i in r)])
        assert len(forward.batches) == 2  # the held pass, then one shared pass for all six

    run(test, max_batch_tokens=1000)


def test_an_idle_batcher_dispatches_at_once():
    async def test(batcher, forward):
        started = time.perf_counter()
        assert await submit(batcher, ["alone"]) == ["row:alone"]
        assert time.perf_counter() - started < 1.0  # max_wait is 5 s: it was not waited

    run(test, max_wait=5.0)


def test_requests_that_arrive_while_the_model_is_busy_share_the_next_pass():
    async def test(batcher, forward):
        first = await busy(batcher, forward)
        tasks = [submit(batcher, [f"q{i}"]) for i in range(5)]
        await asyncio.sleep(0.01)
        forward.release()
        await asyncio.gather(first, *tasks)
        assert forward.batches == [["first"], ["q0", "q1", "q2", "q3", "q4"]]

    run(test)


def test_under_concurrent_load_a_lone_request_waits_briefly_for_company():
    async def test(batcher, forward):
        first = await busy(batcher, forward)
        pair = [submit(batcher, ["a"]), submit(batcher, ["b"])]
        await asyncio.sleep(0.01)
        forward.release()
        await asyncio.gather(first, *pair)  # that pass served two requests: load
        early = submit(batcher, ["early"])
        await asyncio.sleep(0.1)
        late = submit(batcher, ["late"])
        await asyncio.gather(early, late)
        assert forward.batches[-1] == ["early", "late"]

    run(test, max_wait=0.4)


def test_a_large_request_is_split_and_small_requests_are_not_starved():
    async def test(batcher, forward):
        first = await busy(batcher, forward)
        large = submit(batcher, [f"L{i}" for i in range(40)])
        await asyncio.sleep(0.01)
        small = submit(batcher, ["small"])
        await asyncio.sleep(0.01)
        forward.release()
        assert await small == ["row:small"]
        assert not large.done()  # the small one finished first
        assert await large == [f"row:L{i}" for i in range(40)]
        assert await first == ["row:first"]
        assert "small" in forward.batches[1]  # in the first pass after the held one
        assert all(len(batch) <= 8 for batch in forward.batches)  # 8 tokens, cost 1 each
        assert len(forward.batches) == 1 + 6  # 41 items in passes of at most 8

    run(test, max_batch_tokens=8)


def test_the_token_budget_counts_padding():
    async def test(batcher, forward):
        first = await busy(batcher, forward)
        # Padded to the longest: 3 + 3 fit in 10 tokens, 3 + 9 do not (2 x 9 = 18).
        task = asyncio.ensure_future(batcher.submit(["a", "b", "long", "c"], [3, 3, 9, 3]))
        await asyncio.sleep(0.01)
        forward.release()
        await asyncio.gather(first, task)
        assert forward.batches[1:] == [["a", "b"], ["long"], ["c"]]

    run(test, max_batch_tokens=10)


def test_a_text_over_the_budget_goes_alone_and_next():
    async def test(batcher, forward):
        first = await busy(batcher, forward)
        small = submit(batcher, [f"s{i}" for i in range(6)])
        over = asyncio.ensure_future(batcher.submit(["over"], [50]))
        await asyncio.sleep(0.01)
        forward.release()
        await asyncio.gather(first, small, over)
        assert forward.batches[1:] == [["s0"], ["over"], ["s1", "s2", "s3", "s4", "s5"]]

    run(test, max_batch_tokens=10)


def test_cancelling_a_request_drops_its_texts_that_have_not_started():
    async def test(batcher, forward):
        first = await busy(batcher, forward)
        doomed = submit(batcher, [f"d{i}" for i in range(12)])
        await asyncio.sleep(0.01)
        doomed.cancel()  # its client left while another request computed
        forward.release()
        assert await first == ["row:first"]
        assert await submit(batcher, ["next"]) == ["row:next"]
        assert forward.batches == [["first"], ["next"]]
        with pytest.raises(asyncio.CancelledError):
            await doomed

    run(test, max_batch_tokens=4)


def test_cancelling_mid_request_stops_after_the_pass_in_progress():
    async def test(batcher, forward):
        forward.hold()
        doomed = submit(batcher, [f"d{i}" for i in range(12)])
        while not forward.entered.is_set():
            await asyncio.sleep(0.001)
        doomed.cancel()  # its first 4 texts are computing; the other 8 never start
        forward.release()
        assert await submit(batcher, ["next"]) == ["row:next"]
        assert forward.batches == [["d0", "d1", "d2", "d3"], ["next"]]

    run(test, max_batch_tokens=4)


def test_a_failing_pass_fails_its_requests_and_the_batcher_keeps_serving():
    async def test(batcher, forward):
        with pytest.raises(RuntimeError, match="the model failed"):
            await submit(batcher, ["boom"])
        assert await submit(batcher, ["ok"]) == ["row:ok"]

    run(test)


def test_with_batching_off_requests_never_share_a_pass():
    async def test(batcher, forward):
        first = await busy(batcher, forward)
        tasks = [submit(batcher, [f"q{i}", f"q{i}'"]) for i in range(4)]
        await asyncio.sleep(0.01)
        forward.release()
        await asyncio.gather(first, *tasks)
        assert forward.batches[1:] == [[f"q{i}", f"q{i}'"] for i in range(4)]

    run(test, enabled=False)


def test_each_pass_is_reported_for_the_metrics():
    seen: list[BatchStats] = []

    async def test(batcher, forward):
        first = await busy(batcher, forward)
        tasks = [submit(batcher, ["a", "b"], cost=5), submit(batcher, ["c"], cost=2)]
        await asyncio.sleep(0.01)
        forward.release()
        await asyncio.gather(first, *tasks)

    run(test, on_batch=seen.append)
    assert [(s.texts, s.requests, s.padded_tokens) for s in seen] == [(1, 1, 1), (3, 2, 15)]
    assert all(s.seconds >= 0 for s in seen) and len(seen[1].queued) == 2
