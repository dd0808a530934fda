"""LangChain integration: ``PEGEmbeddings`` (Embeddings), ``PEGHybridRetriever`` and
``PEGReranker`` (a document compressor).

One line puts PEG into LangChain:
``Chroma(embedding_function=PEGEmbeddings(model_name="TownsWu/PEG"))``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from peg_rag.core.extras import require

require("langchain_core", "langchain", "peg_rag.integrations.langchain")
from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
    Callbacks,
)
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr, field_validator

from peg_rag.core import Encoder, Reranker
from peg_rag.retrieval import HybridRetriever, validate_filter

from .encoding import EncoderOptions, wrapper_name
from .hybrid import (
    EncoderLike,
    RerankerChoice,
    load_hybrid,
    open_hybrid,
    result_id,
    result_metadata,
)
from .reranking import RerankerOptions


class PEGEmbeddings(EncoderOptions, Embeddings):
    """LangChain embeddings backed by :class:`peg_rag.PEGEncoder`.

    ``model_name`` is a hub id or a local directory, as for ``HuggingFaceEmbeddings``;
    the other fields are PEGEncoder's loading options (None: as the model files say).
    Pass ``encoder=`` to reuse an already loaded PEGEncoder instead. ``embed_query``
    adds the query prompt, ``embed_documents`` the passage prompt. The async
    methods run the model in a worker thread, so the event loop keeps running.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    batch_size: int = Field(default=32, gt=0, description="Texts per forward pass.")
    show_progress: bool = Field(default=False, description="Show a progress bar when encoding.")

    def __init__(self, *, encoder: Encoder | None = None, **kwargs: Any) -> None:
        kwargs["model_name"] = wrapper_name(kwargs.get("model_name"), encoder)
        super().__init__(**kwargs)
        self._start(encoder)

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


class PEGHybridRetriever(BaseRetriever):
    """A LangChain retriever over :class:`peg_rag.HybridRetriever` (jieba BM25 + dense).

    ``k``, ``filters`` (a Chroma-style ``where`` dict, applied to both retrievers),
    ``reranker`` and ``rerank_top_n`` are set in the constructor and can be overridden per
    call: ``retriever.invoke("问题", k=3, filters={"domain": "医保"})``. ``reranker`` is
    the second stage: None uses the index's own (recorded by ``peg-rag index
    --reranker``), False none, or a Reranker; it reorders the fused top ``rerank_top_n``
    (default: the index's). Each ``Document`` has the id of its document (chunk_size=0) or
    chunk (``"<doc id>#<n>"``), and its metadata holds ``doc_id``, ``chunk_id``, the final
    ``score`` (the reranker's, when one ran) and ``dense_score``/``dense_rank``/
    ``bm25_score``/``bm25_rank``/``rerank_score``/``rerank_rank`` besides its own.

    Build one with :meth:`from_texts`, :meth:`from_documents` or :meth:`from_index_dir`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    hybrid: HybridRetriever
    k: int = Field(default=4, gt=0, description="How many documents to return.")
    filters: dict[str, Any] | None = Field(default=None, description="Chroma-style where.")
    method: Literal["hybrid", "dense", "bm25"] = "hybrid"
    reranker: RerankerChoice = Field(
        default=None, description="None: the index's reranker; False: none; or a Reranker."
    )
    rerank_top_n: int | None = Field(
        default=None, gt=0, description="Fused results to rerank (default: the index's)."
    )

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @field_validator("filters")
    @classmethod
    def _valid_filters(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            validate_filter(value)
        return value or None

    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str],
        encoder: EncoderLike,
        *,
        metadatas: Iterable[dict[str, Any]] | None = None,
        ids: Iterable[str] | None = None,
        index_dir: str | os.PathLike[str] | None = None,
        show_progress: bool = False,
        k: int = 4,
        filters: dict[str, Any] | None = None,
        reranker: RerankerChoice = None,
        rerank_top_n: int | None = None,
        **settings: Any,
    ) -> PEGHybridRetriever:
        """Index texts (ids default to a hash of the text) and return a retriever.

        ``encoder``: a PEGEncoder, a model name or directory, or PEGEmbeddings.
        ``index_dir``: where the index persists (None: in memory); an existing index
        there is reused and brought up to date. ``settings`` are HybridRetriever's
        (chunk_size, chunk_overlap, fusion, weights...).
        """
        texts = list(texts)
        ids = list(ids) if ids is not None else [text_id(t) for t in texts]
        metadatas = list(metadatas) if metadatas is not None else [{} for _ in texts]
        if not len(texts) == len(ids) == len(metadatas):
            raise ValueError(
                f"{len(texts)} texts, {len(ids)} ids and {len(metadatas)} metadatas: "
                "give one of each per text"
            )
        records = (
            {"id": i, "text": t, "metadata": m}
            for i, t, m in zip(ids, texts, metadatas, strict=True)
        )
        hybrid = open_hybrid(
            records, encoder, index_dir, reranker=reranker, show_progress=show_progress, **settings
        )
        return cls(
            hybrid=hybrid, k=k, filters=filters, reranker=reranker, rerank_top_n=rerank_top_n
        )

    @classmethod
    def from_documents(
        cls, documents: Iterable[Document], encoder: EncoderLike, **kwargs: Any
    ) -> PEGHybridRetriever:
        """Index LangChain documents under their ``id`` (a hash of the text when unset)."""
        documents = list(documents)
        return cls.from_texts(
            [d.page_content for d in documents],
            encoder,
            metadatas=[d.metadata for d in documents],
            ids=[d.id or text_id(d.page_content) for d in documents],
            **kwargs,
        )

    @classmethod
    def from_index_dir(
        cls, index_dir: str | os.PathLike[str], encoder: EncoderLike | None = None, **kwargs: Any
    ) -> PEGHybridRetriever:
        """Open an index saved by ``peg-rag index`` or an earlier ``from_texts``.

        The model saved with the index is loaded unless ``encoder`` is given.
        """
        return cls(hybrid=load_hybrid(index_dir, encoder, kwargs.get("reranker")), **kwargs)

    def _get_relevant_documents(
        self,
        query: str,
        *,
        run_manager: CallbackManagerForRetrieverRun,
        k: int | None = None,
        filters: dict[str, Any] | None = None,
        reranker: RerankerChoice = None,
        rerank_top_n: int | None = None,
    ) -> list[Document]:
        with self._lock:  # one retrieval at a time: async callers share this object
            results = self.hybrid.retrieve(
                query,
                k=k or self.k,
                filters=filters if filters is not None else self.filters,
                method=self.method,
                reranker=reranker if reranker is not None else self.reranker,
                rerank_top_n=rerank_top_n or self.rerank_top_n,
            )
        return [
            Document(id=result_id(self.hybrid, r), page_content=r.text, metadata=result_metadata(r))
            for r in results
        ]

    async def _aget_relevant_documents(
        self,
        query: str,
        *,
        run_manager: AsyncCallbackManagerForRetrieverRun,
        k: int | None = None,
        filters: dict[str, Any] | None = None,
        reranker: RerankerChoice = None,
        rerank_top_n: int | None = None,
    ) -> list[Document]:
        return await asyncio.to_thread(
            self._get_relevant_documents,
            query,
            run_manager=run_manager.get_sync(),
            k=k,
            filters=filters,
            reranker=reranker,
            rerank_top_n=rerank_top_n,
        )


class PEGReranker(RerankerOptions, BaseDocumentCompressor):
    """A LangChain document compressor that reranks documents with :class:`peg_rag.Reranker`.

    Used like ``CrossEncoderReranker``, with the same default ``top_n=3``, typically in a
    ``ContextualCompressionRetriever(base_compressor=PEGReranker(...),
    base_retriever=...)``. It returns the ``top_n`` best documents, best first, as copies
    whose metadata holds the reranker's score as ``relevance_score`` (as Cohere's, Jina's
    and FlashRank's compressors do): a raw logit, or a sigmoid in [0, 1] with
    ``normalize=True``.

    ``model`` is a hub id or a local directory; ``max_length``, ``device``, ``dtype``,
    ``quantize``, ``backend`` and ``trust_remote_code`` are Reranker's loading options. Pass
    ``reranker=`` to reuse an already loaded Reranker instead. ``acompress_documents``
    runs the model in a worker thread, so the event loop keeps running meanwhile.
    """

    top_n: int = Field(default=3, gt=0, description="Number of documents to return.")

    def __init__(self, *, reranker: Reranker | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._start(reranker)

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        ranked = self._rerank(query, [d.page_content for d in documents], self.top_n)
        return [
            documents[i].model_copy(
                update={"metadata": {**documents[i].metadata, "relevance_score": score}}
            )
            for i, score in ranked
        ]


def text_id(text: str) -> str:
    """A stable id for a text that came without one."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
