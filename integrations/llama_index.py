"""LlamaIndex integration: ``PEGEmbedding`` (an embed model), ``PEGHybridRetriever`` and
``PEGRerank`` (a node postprocessor).

One line puts PEG into LlamaIndex: ``Settings.embed_model = PEGEmbedding("TownsWu/PEG")``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from peg_rag.core.extras import require

require("llama_index.core", "llama-index", "peg_rag.integrations.llama_index")
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import (
    BaseNode,
    Document,
    MetadataMode,
    NodeRelationship,
    NodeWithScore,
    QueryBundle,
    RelatedNodeInfo,
    TextNode,
)
from llama_index.core.vector_stores.types import FilterCondition, FilterOperator, MetadataFilters

from peg_rag.core import Encoder, Reranker
from peg_rag.retrieval import HybridRetriever, RetrievalResult, validate_filter

from .encoding import EncoderOptions, wrapper_name
from .hybrid import (
    RETRIEVAL_KEYS,
    EncoderLike,
    RerankerChoice,
    load_hybrid,
    open_hybrid,
    result_id,
    result_metadata,
)
from .reranking import RerankerOptions

dispatcher = get_dispatcher(__name__)


class PEGEmbedding(EncoderOptions, BaseEmbedding):
    """A LlamaIndex embed model backed by :class:`peg_rag.PEGEncoder`.

    ``model_name`` is a hub id or a local directory, as for ``HuggingFaceEmbedding``;
    the other fields are PEGEncoder's loading options (None: as the model files say).
    Pass ``encoder=`` to reuse an already loaded PEGEncoder instead. Queries get the
    query prompt, nodes the passage prompt. ``embed_batch_size`` texts go
    through the model in one forward pass; the async methods run the model in a
    worker thread, so the event loop keeps running meanwhile.
    """

    embed_batch_size: int = Field(default=32, gt=0, le=2048, description="Texts per forward pass.")

    def __init__(
        self, model_name: str | None = None, *, encoder: Encoder | None = None, **kwargs: Any
    ) -> None:
        super().__init__(model_name=wrapper_name(model_name, encoder), **kwargs)
        self._start(encoder)

    @classmethod
    def class_name(cls) -> str:
        return "PEGEmbedding"

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


# LlamaIndex filter operators and their Chroma-style equivalents in peg_rag.retrieval.filters.
_OPERATORS = {
    FilterOperator.EQ: "$eq",
    FilterOperator.NE: "$ne",
    FilterOperator.GT: "$gt",
    FilterOperator.GTE: "$gte",
    FilterOperator.LT: "$lt",
    FilterOperator.LTE: "$lte",
    FilterOperator.IN: "$in",
    FilterOperator.NIN: "$nin",
}


def to_where(filters: MetadataFilters) -> dict[str, Any] | None:
    """LlamaIndex ``MetadataFilters`` (nested too) as a Chroma-style ``where`` dict.

    AND and OR conditions and the operators ==, !=, >, >=, <, <=, in and nin are
    supported; others raise ValueError. An empty filter list means no filter.
    """
    clauses = []
    for item in filters.filters:
        if isinstance(item, MetadataFilters):
            nested = to_where(item)
            if nested:
                clauses.append(nested)
            continue
        operator = getattr(item, "operator", FilterOperator.EQ)
        if operator not in _OPERATORS:
            supported = ", ".join(op.value for op in _OPERATORS)
            raise ValueError(
                f"filter on {item.key!r}: operator {operator.value!r} is not supported by "
                f"PEGHybridRetriever; use one of {supported}"
            )
        clauses.append({item.key: {_OPERATORS[operator]: item.value}})
    condition = filters.condition or FilterCondition.AND
    if condition not in (FilterCondition.AND, FilterCondition.OR):
        raise ValueError(f"filter condition {condition.value!r} is not supported; use and/or")
    if len(clauses) <= 1:
        return clauses[0] if clauses else None
    return {"$and" if condition == FilterCondition.AND else "$or": clauses}


class PEGHybridRetriever(BaseRetriever):
    """A LlamaIndex retriever over :class:`peg_rag.HybridRetriever` (jieba BM25 + dense).

    It returns ``NodeWithScore`` with the fused score; each node keeps its id and metadata,
    and its metadata also holds ``doc_id``, ``chunk_id`` and the per-retriever scores and
    ranks (kept out of what the LLM and the embedder see). With chunk_size=0 a document
    is its own node and keeps its id; otherwise nodes are chunks ``"<doc id>#<n>"`` with
    the document as their source. ``filters`` (``MetadataFilters`` or a Chroma-style
    dict) apply to both retrievers. ``reranker`` is the second stage: None uses the
    index's own (recorded by ``peg-rag index --reranker``), False none, or a Reranker; it
    reorders the fused top ``rerank_top_n`` (default: the index's), each node's score is
    then the reranker's, and its metadata has ``rerank_rank`` and ``rerank_score``.

    Build one with :meth:`from_documents`, :meth:`from_nodes` or :meth:`from_index_dir`,
    or wrap an existing HybridRetriever.
    """

    def __init__(
        self,
        retriever: HybridRetriever,
        *,
        similarity_top_k: int = 10,
        filters: MetadataFilters | Mapping[str, Any] | None = None,
        method: str = "hybrid",
        reranker: RerankerChoice = None,
        rerank_top_n: int | None = None,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
    ) -> None:
        if similarity_top_k < 1:
            raise ValueError(f"similarity_top_k must be >= 1, got {similarity_top_k}")
        if rerank_top_n is not None and rerank_top_n < 1:
            raise ValueError(f"rerank_top_n must be >= 1, got {rerank_top_n}")
        super().__init__(callback_manager=callback_manager, verbose=verbose)
        self.hybrid = retriever
        self.similarity_top_k = similarity_top_k
        self.method = method
        self.filters = filters
        self.reranker = reranker
        self.rerank_top_n = rerank_top_n
        self._lock = threading.Lock()

    @property
    def filters(self) -> MetadataFilters | Mapping[str, Any] | None:
        return self._filters

    @filters.setter
    def filters(self, value: MetadataFilters | Mapping[str, Any] | None) -> None:
        where = to_where(value) if isinstance(value, MetadataFilters) else value
        if where:
            validate_filter(where)
        self._filters, self._where = value, where or None

    @classmethod
    def from_documents(
        cls,
        documents: Sequence[Document],
        encoder: EncoderLike,
        *,
        index_dir: str | os.PathLike[str] | None = None,
        show_progress: bool = False,
        similarity_top_k: int = 10,
        filters: MetadataFilters | Mapping[str, Any] | None = None,
        method: str = "hybrid",
        reranker: RerankerChoice = None,
        rerank_top_n: int | None = None,
        callback_manager: CallbackManager | None = None,
        **settings: Any,
    ) -> PEGHybridRetriever:
        """Chunk and index LlamaIndex documents under their ``doc_id``.

        ``encoder``: a PEGEncoder, a model name or directory, or a PEGEmbedding.
        ``index_dir``: where the index persists (None: in memory); an existing index
        there is reused and brought up to date. ``settings`` are HybridRetriever's
        (chunk_size, chunk_overlap, fusion, weights...).
        """
        records = (
            {"id": d.doc_id, "text": d.get_content(MetadataMode.NONE), "metadata": d.metadata}
            for d in documents
        )
        hybrid = open_hybrid(
            records, encoder, index_dir, reranker=reranker, show_progress=show_progress, **settings
        )
        return cls(
            hybrid,
            similarity_top_k=similarity_top_k,
            filters=filters,
            method=method,
            reranker=reranker,
            rerank_top_n=rerank_top_n,
            callback_manager=callback_manager,
        )

    @classmethod
    def from_nodes(
        cls,
        nodes: Sequence[BaseNode],
        encoder: EncoderLike,
        *,
        index_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> PEGHybridRetriever:
        """Index already-split nodes as they are (chunk_size=0): each keeps its node id."""
        kwargs.setdefault("chunk_size", 0)
        documents = [
            Document(id_=n.node_id, text=n.get_content(MetadataMode.NONE), metadata=n.metadata)
            for n in nodes
        ]
        return cls.from_documents(documents, encoder, index_dir=index_dir, **kwargs)

    @classmethod
    def from_index_dir(
        cls, index_dir: str | os.PathLike[str], encoder: EncoderLike | None = None, **kwargs: Any
    ) -> PEGHybridRetriever:
        """Open an index saved by ``peg-rag index`` or an earlier ``from_documents``.

        The model saved with the index is loaded unless ``encoder`` is given.
        """
        return cls(load_hybrid(index_dir, encoder, kwargs.get("reranker")), **kwargs)

    def _node(self, result: RetrievalResult) -> NodeWithScore:
        node = TextNode(
            id_=result_id(self.hybrid, result),
            text=result.text,
            metadata=result_metadata(result),
            excluded_embed_metadata_keys=list(RETRIEVAL_KEYS),
            excluded_llm_metadata_keys=list(RETRIEVAL_KEYS),
            start_char_idx=result.start,
            end_char_idx=result.end,
            relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=result.doc_id)},
        )
        return NodeWithScore(node=node, score=result.score)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        with self._lock:  # one retrieval at a time: async callers share this object
            results = self.hybrid.retrieve(
                query_bundle.query_str,
                k=self.similarity_top_k,
                filters=self._where,
                method=self.method,
                reranker=self.reranker,
                rerank_top_n=self.rerank_top_n,
            )
        return [self._node(r) for r in results]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)


class PEGRerank(RerankerOptions, BaseNodePostprocessor):
    """A LlamaIndex node postprocessor that reranks nodes with :class:`peg_rag.Reranker`.

    Used like ``SentenceTransformerRerank`` and ``FlagEmbeddingReranker``, with the same
    default ``top_n=2``: ``node_postprocessors=[PEGRerank(model="BAAI/bge-reranker-base",
    top_n=3)]``. It scores each node's text as the embedder sees it
    (``MetadataMode.EMBED``), as those do, and returns the ``top_n`` best with the
    reranker's score as their score: raw logits, or sigmoids in [0, 1] with
    ``normalize=True``. ``keep_retrieval_score=True`` keeps each node's previous score in
    its metadata as ``retrieval_score`` (out of what the LLM and the embedder see).

    ``model`` is a hub id or a local directory; ``max_length``, ``device``, ``dtype``,
    ``quantize``, ``backend`` and ``trust_remote_code`` are Reranker's loading options. Pass
    ``reranker=`` to reuse an already loaded Reranker instead. The async path runs the
    model in a worker thread, so the event loop keeps running meanwhile.
    """

    top_n: int = Field(default=2, gt=0, description="Number of nodes to return sorted by score.")
    keep_retrieval_score: bool = Field(
        default=False, description="Whether to keep the retrieval score in metadata."
    )

    def __init__(self, *, reranker: Reranker | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._start(reranker)

    @classmethod
    def class_name(cls) -> str:
        return "PEGRerank"

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        if query_bundle is None:
            raise ValueError("PEGRerank needs the query: pass query_bundle or query_str")
        dispatcher.event(
            ReRankStartEvent(
                query=query_bundle, nodes=nodes, top_n=self.top_n, model_name=self.model
            )
        )
        texts = [hit.node.get_content(metadata_mode=MetadataMode.EMBED) for hit in nodes]
        with self.callback_manager.event(
            CBEventType.RERANKING,
            payload={
                EventPayload.NODES: nodes,
                EventPayload.MODEL_NAME: self.model,
                EventPayload.QUERY_STR: query_bundle.query_str,
                EventPayload.TOP_K: self.top_n,
            },
        ) as event:
            reranked = []
            for i, score in self._rerank(query_bundle.query_str, texts, self.top_n):
                node = nodes[i].node
                if self.keep_retrieval_score:
                    node.metadata["retrieval_score"] = nodes[i].score
                    # A score is for the application, not for the LLM's context.
                    for keys in (
                        node.excluded_llm_metadata_keys,
                        node.excluded_embed_metadata_keys,
                    ):
                        if "retrieval_score" not in keys:
                            keys.append("retrieval_score")
                reranked.append(NodeWithScore(node=node, score=score))
            event.on_end(payload={EventPayload.NODES: reranked})
        dispatcher.event(ReRankEndEvent(nodes=reranked))
        return reranked
