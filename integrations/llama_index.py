"""LlamaIndex integration: ``PEGEmbedding`` (an embed model) and ``PEGHybridRetriever``.

One line puts PEG into LlamaIndex: ``Settings.embed_model = PEGEmbedding("TownsWu/PEG")``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CallbackManager

from peg_rag.encoder import PEGEncoder

from .encoding import (
    DEFAULT_MODEL,
    LOAD_OPTIONS,
    EncoderRunner,
    encoder_name,
    encoder_options,
    load_encoder,
)


class PEGEmbedding(BaseEmbedding):
    """A LlamaIndex embed model backed by :class:`peg_rag.PEGEncoder`.

    ``model_name`` is a hub id or a local directory, as for ``HuggingFaceEmbedding``;
    the other fields are PEGEncoder's loading options (None: as the model files say).
    Pass ``encoder=`` to reuse an already loaded PEGEncoder instead. Queries get the
    query instruction, nodes the passage instruction. ``embed_batch_size`` texts go
    through the model in one forward pass; the async methods run the model in a
    worker thread, so the event loop keeps running meanwhile.
    """

    model_name: str = Field(default=DEFAULT_MODEL, description="Hub id or local model directory.")
    embed_batch_size: int = Field(default=32, gt=0, le=2048, description="Texts per forward pass.")
    pooling: str | None = Field(default=None, description="'cls' or 'mean'.")
    normalize: bool | None = Field(default=None, description="L2-normalize vectors.")
    query_instruction: str | None = Field(default=None, description="Prefix for queries.")
    passage_instruction: str | None = Field(default=None, description="Prefix for passages.")
    max_length: int | None = Field(default=None, description="Max tokens per text.")
    device: str | None = Field(default=None, description="cpu, cuda, mps (default: best).")
    dtype: str | None = Field(default=None, description="float32, bfloat16 or float16.")
    quantize: str | None = Field(default=None, description="'int8': dynamic int8 on CPU.")
    trust_remote_code: bool = Field(default=False, description="Run code shipped with the model.")

    _runner: EncoderRunner = PrivateAttr()

    def __init__(
        self,
        model_name: str | None = None,
        *,
        encoder: PEGEncoder | None = None,
        embed_batch_size: int = 32,
        callback_manager: CallbackManager | None = None,
        **kwargs: Any,
    ) -> None:
        options = {name: kwargs.pop(name, None) for name in LOAD_OPTIONS}
        name = model_name or (encoder_name(encoder) if encoder else "") or DEFAULT_MODEL
        loaded = load_encoder(name, encoder, options)
        super().__init__(
            model_name=name,
            embed_batch_size=embed_batch_size,
            callback_manager=callback_manager,
            trust_remote_code=bool(options["trust_remote_code"]),
            **encoder_options(loaded),
            **kwargs,
        )
        self._runner = EncoderRunner(loaded)

    @classmethod
    def class_name(cls) -> str:
        return "PEGEmbedding"

    @property
    def encoder(self) -> PEGEncoder:
        """The PEGEncoder behind this embed model."""
        return self._runner.encoder

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._runner.queries([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._runner.passages([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        # LlamaIndex hands over embed_batch_size texts: one forward pass for all of them.
        return self._runner.passages(texts, batch_size=len(texts))

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)
