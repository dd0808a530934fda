"""The server's models at run time: loaded in a worker thread after start-up (routes answer
503 until then), with their batchers and token counters, and the two worker threads.

Every model computation (the batchers' forward passes, retrieval) runs in one thread, so
passes never compete for the cores; token counting runs in another; the event loop only
parses, validates and answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from peg_rag.core.encoding import Kind

from . import models as served
from .batching import DynamicBatcher
from .errors import APIError
from .observe import ServerMetrics
from .settings import ServeSettings

logger = logging.getLogger("peg_rag")
T = TypeVar("T")


@dataclass
class Ready:
    """What exists once the models have loaded."""

    models: served.Models
    embedder: DynamicBatcher[tuple[str, Kind]]
    texts: served.TokenCounter
    reranker: DynamicBatcher[tuple[str, str]] | None
    pairs: served.TokenCounter | None


class Runtime:
    """Loads the models with ``loader`` and holds them; ``on_load_error`` hears of a failure."""

    def __init__(
        self,
        settings: ServeSettings,
        metrics: ServerMetrics,
        loader: Callable[[ServeSettings], served.Models],
        on_load_error: Callable[[BaseException], None] | None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loader = loader
        self.on_load_error = on_load_error
        self.error: str | None = None
        self._ready: Ready | None = None
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="peg-rag-model")
        self._token_thread = ThreadPoolExecutor(1, thread_name_prefix="peg-rag-tokens")

    @property
    def status(self) -> str:
        return "error" if self.error else "loading" if self._ready is None else "ok"

    def ready(self) -> Ready:
        """The loaded models, or a 503 while they load (or after they failed to)."""
        if self.error:
            raise APIError(503, f"the models failed to load: {self.error}", code="load_failed")
        if self._ready is None:
            raise APIError(
                503,
                "the models are still loading; retry in a few seconds",
                code="model_loading",
                headers={"Retry-After": "5"},
            )
        return self._ready

    async def load(self) -> None:
        try:
            models = await self.in_model_thread(lambda: self.loader(self.settings))
        except Exception as exc:
            logger.exception("loading the models failed")
            self.error = f"{type(exc).__name__}: {exc}"
            if self.on_load_error is not None:
                self.on_load_error(exc)
            return
        encoder, reranker = models.encoder, models.reranker
        self._ready = Ready(
            models,
            self._batcher(lambda items: served.embed(encoder, items), "embeddings"),
            served.TokenCounter(encoder.tokenizer, encoder.max_length),
            self._batcher(lambda pairs: served.score(reranker, pairs), "rerank")
            if reranker
            else None,
            served.TokenCounter(reranker.tokenizer, reranker.max_length) if reranker else None,
        )
        logger.info("peg-rag serve: models loaded; serving %s", self.settings.name)

    def _batcher(self, forward: Callable[[list[Any]], Any], model: str) -> DynamicBatcher[Any]:
        return DynamicBatcher(
            forward,
            self._model_thread,
            max_batch_tokens=self.settings.max_batch_tokens,
            max_wait=self.settings.max_wait_ms / 1000,
            enabled=not self.settings.no_batching,
            on_batch=self.metrics.batch_observer(model),
        )

    async def close(self) -> None:
        if self._ready is not None:
            await self._ready.embedder.close()
            if self._ready.reranker is not None:
                await self._ready.reranker.close()
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        self._token_thread.shutdown(wait=False, cancel_futures=True)

    async def in_model_thread(self, function: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, function)

    async def in_token_thread(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._token_thread, function, *args)
