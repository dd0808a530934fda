"""Helpers shared by the LlamaIndex and LangChain integration tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from peg_rag import PEGEncoder


def make_slow(monkeypatch, encoder: PEGEncoder, method: str, seconds: float = 0.3) -> None:
    """Make ``encoder.<method>`` block its thread for ``seconds``, like a busy CPU model."""
    original = getattr(encoder, method)

    def slowly(texts, **kwargs):
        time.sleep(seconds)
        return original(texts, **kwargs)

    monkeypatch.setattr(encoder, method, slowly)


def ticks_during(call: Callable[[], Awaitable[Any]]) -> tuple[Any, int]:
    """Await ``call()`` while a 10 ms ticker runs: (its result, ticks the loop served)."""

    async def main() -> tuple[Any, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        result = await call()
        ticker.cancel()
        return result, ticks

    return asyncio.run(main())
