"""LangChain integration: ``PEGEmbeddings`` (Embeddings) and ``PEGHybridRetriever``.

One line puts PEG into LangChain:
``Chroma(embedding_function=PEGEmbeddings(model_name="TownsWu/PEG"))``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from peg_rag.encoder import PEGEncoder

from .encoding import (
    DEFAULT_MODEL,
    LOAD_OPTIONS,
    EncoderRunner,
    encoder_name,
    encoder_options,
    load_encoder,
)


class PEGEmbeddings(BaseModel, Embeddings):
    """LangChain embeddings backed by :class:`peg_rag.PEGEncoder`.

    ``model_name`` is a hub id or a local directory, as for ``HuggingFaceEmbeddings``;
    the other fields are PEGEncoder's loading options (None: as the model files say).
    Pass ``encoder=`` to reuse an already loaded PEGEncoder instead. ``embed_query``
    adds the query instruction, ``embed_documents`` the passage instruction. The async
    methods run the model in a worker thread, so the event loop keeps running.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str = Field(default=DEFAULT_MODEL, description="Hub id or local model directory.")
    batch_size: int = Field(default=32, gt=0, description="Texts per forward pass.")
    show_progress: bool = Field(default=False, description="Show a progress bar when encoding.")
    pooling: str | None = Field(default=None, description="'cls' or 'mean'.")
    normalize: bool | None = Field(default=None, description="L2-normalize vectors.")
    query_instruction: str | None = Field(default=None, description="Prefix for queries.")
    passage_instruction: str | None = Field(default=None, description="Prefix for documents.")
    max_length: int | None = Field(default=None, description="Max tokens per text.")
    device: str | None = Field(default=None, description="cpu, cuda, mps (default: best).")
    dtype: str | None = Field(default=None, description="float32, bfloat16 or float16.")
    quantize: str | None = Field(default=None, description="'int8': dynamic int8 on CPU.")
    trust_remote_code: bool = Field(default=False, description="Run code shipped with the model.")

    _runner: EncoderRunner = PrivateAttr()

    def __init__(self, *, encoder: PEGEncoder | None = None, **kwargs: Any) -> None:
        if encoder is not None and "model_name" not in kwargs:
            kwargs["model_name"] = encoder_name(encoder) or DEFAULT_MODEL
        super().__init__(**kwargs)
        options = {name: getattr(self, name) for name in LOAD_OPTIONS}
        self._runner = EncoderRunner(load_encoder(self.model_name, encoder, options))
        for name, value in encoder_options(self.encoder).items():  # record what was loaded
            setattr(self, name, value)

    @property
    def encoder(self) -> PEGEncoder:
        """The PEGEncoder behind these embeddings."""
        return self._runner.encoder

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._runner.passages(
            texts, batch_size=self.batch_size, show_progress_bar=self.show_progress
        )

    def embed_query(self, text: str) -> list[float]:
        return self._runner.queries([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await asyncio.to_thread(self.embed_query, text)
