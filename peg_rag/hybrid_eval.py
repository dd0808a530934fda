"""Evaluate BM25, dense and hybrid retrieval of a HybridRetriever on a BEIR-style set.

Documents are indexed whole (``chunk_size=0``), as BEIR scores whole documents, so chunk ids
and document ids coincide. Score the runs with ``peg_rag.trainer.metrics.retrieval_scores``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .hybrid import Document, HybridRetriever, Method

METHODS: tuple[Method, ...] = ("bm25", "dense", "hybrid")


def index_corpus(
    corpus: Mapping[str, str],
    encoder,
    *,
    index_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = False,
    **settings: Any,
) -> HybridRetriever:
    """A hybrid index of ``{doc_id: text}``, in memory unless ``index_dir`` is given.

    ``settings`` are HybridSettings fields (fusion, weights, candidates...); chunking is off.
    """
    retriever = HybridRetriever.create(index_dir, encoder, **{**settings, "chunk_size": 0})
    retriever.add(
        [Document(doc_id, text) for doc_id, text in corpus.items()], show_progress=show_progress
    )
    return retriever


def run_queries(
    retriever: HybridRetriever,
    queries: Mapping[str, str],
    *,
    k: int = 100,
    methods: Sequence[Method] = METHODS,
    **options: Any,
) -> dict[str, dict[str, list[str]]]:
    """``{method: {query_id: [doc_id, ...]}}`` ranked best first, at most k per query.

    ``options`` go to :meth:`HybridRetriever.retrieve_many` (fusion, weights, candidates).
    A document with several chunks appears once, at its best chunk's rank.
    """
    ids, texts = list(queries), list(queries.values())
    runs: dict[str, dict[str, list[str]]] = {}
    for method in methods:
        results = retriever.retrieve_many(texts, k, method=method, **options)
        runs[method] = {
            query_id: list(dict.fromkeys(r.doc_id for r in found))
            for query_id, found in zip(ids, results, strict=True)
        }
    return runs
