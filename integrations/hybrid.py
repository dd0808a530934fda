"""What the LlamaIndex and LangChain hybrid retrievers share: opening a HybridRetriever and
describing a result in metadata."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from peg_rag.core import Encoder, Reranker
from peg_rag.retrieval import HybridRetriever, RetrievalResult, is_index

# Metadata keys a retrieved node/document gets besides its own metadata.
RETRIEVAL_KEYS = (
    "doc_id",
    "chunk_id",
    "score",
    "dense_score",
    "dense_rank",
    "bm25_score",
    "bm25_rank",
    "rerank_score",
    "rerank_rank",
)

EncoderLike = Encoder | str | os.PathLike[str] | Any
# A retriever's second stage: None for the index's own reranker (if any), False for none.
RerankerChoice = Reranker | Literal[False] | None


def as_encoder(encoder: EncoderLike) -> Encoder | str:
    """An encoder, a model name, or an embedding wrapper with an ``.encoder``."""
    inner = getattr(encoder, "encoder", None)
    if isinstance(inner, Encoder):
        return inner
    if isinstance(encoder, Encoder):
        return encoder
    if isinstance(encoder, (str, os.PathLike)):
        return str(encoder)
    raise TypeError(
        f"encoder must be a PEGEncoder, a model name or directory, or PEGEmbedding(s); "
        f"got {type(encoder).__name__}"
    )


def open_hybrid(
    records: Iterable[Mapping[str, Any]],
    encoder: EncoderLike,
    index_dir: str | os.PathLike[str] | None = None,
    *,
    reranker: RerankerChoice = None,
    show_progress: bool = False,
    **settings: Any,
) -> HybridRetriever:
    """A HybridRetriever holding ``records`` (``{"id", "text", "metadata"}``).

    With an ``index_dir`` that already holds an index, that index is loaded and the
    records are added to it: unchanged ones are skipped, changed ones replaced, and
    ``settings`` (chunking, fusion...) are those saved with it. Otherwise a new index is
    created there (or in memory for ``index_dir=None``) with ``settings``. ``reranker``
    only matters when loading (see :func:`load_hybrid`).
    """
    if index_dir is not None and is_index(index_dir):
        retriever = load_hybrid(index_dir, encoder, reranker)
    else:
        retriever = HybridRetriever.create(index_dir, as_encoder(encoder), **settings)
    retriever.add(records, show_progress=show_progress)
    return retriever


def load_hybrid(
    index_dir: str | os.PathLike[str],
    encoder: EncoderLike | None = None,
    reranker: RerankerChoice = None,
) -> HybridRetriever:
    """Open a saved index; its own model is loaded unless an encoder (or wrapper) is given,
    and the reranker it records unless ``reranker`` replaces it (a Reranker) or drops it
    (False), so that a reranker the caller overrides is never loaded for nothing."""
    model = as_encoder(encoder) if encoder is not None else None
    return HybridRetriever.load(
        index_dir, encoder=model if isinstance(model, Encoder) else None, reranker=reranker
    )


def result_id(retriever: HybridRetriever, result: RetrievalResult) -> str:
    """The id a framework sees: the document's id when documents are kept whole
    (chunk_size=0), else the chunk's ``"<doc id>#<n>"``."""
    return result.doc_id if retriever.settings.chunk_size == 0 else result.id


def result_metadata(result: RetrievalResult) -> dict[str, Any]:
    """The result's own metadata plus where it came from and how each retriever scored it."""
    return {
        **result.metadata,
        "doc_id": result.doc_id,
        "chunk_id": result.id,
        "score": result.score,
        "dense_score": result.scores["dense"],
        "dense_rank": result.ranks["dense"],
        "bm25_score": result.scores["bm25"],
        "bm25_rank": result.ranks["bm25"],
        "rerank_score": result.scores["rerank"],
        "rerank_rank": result.ranks["rerank"],
    }
