"""What retrieval returns, and the reranking stage that reorders it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from peg_rag.core.reranker import Reranker

STAGES = ("dense", "bm25", "rerank")


@dataclass
class RetrievalResult:
    """One retrieved chunk.

    ``id`` is the chunk id (``"<doc_id>#<n>"``), ``doc_id`` the source document's id,
    ``start``/``end`` the chunk's character offsets in the document text. ``score`` is what
    the results are ordered by: the reranker's logit when a reranker ran, else the fused
    score (the retriever's own score with ``method="dense"`` or ``"bm25"``).
    ``ranks``/``scores`` hold the 1-based rank and raw score each stage gave, under
    ``"dense"``, ``"bm25"`` and ``"rerank"`` (None where the chunk was not among that
    stage's candidates, or the stage did not run). Dense scores are cosine similarities,
    BM25 scores are BM25 scores, rerank scores are the cross-encoder's logits.
    """

    id: str
    doc_id: str
    text: str
    metadata: dict[str, Any]
    score: float
    ranks: dict[str, int | None]
    scores: dict[str, float | None]
    start: int
    end: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rerank(
    reranker: Reranker,
    queries: Sequence[str],
    candidates: Sequence[Sequence[RetrievalResult]],
    k: int,
) -> list[list[RetrievalResult]]:
    """Each query's candidates reordered by the reranker, top k, with their rerank rank and
    score recorded. All pairs go to the reranker in one call (one length-sorted run)."""
    pairs = [
        (query, r.text) for query, found in zip(queries, candidates, strict=True) for r in found
    ]
    scores = iter(reranker.score_pairs(pairs).tolist()) if pairs else iter([])
    reranked = []
    for found in candidates:
        scored = sorted(
            ((next(scores), n, r) for n, r in enumerate(found)), key=lambda t: (-t[0], t[1])
        )
        reranked.append(
            [
                replace(
                    r,
                    score=score,
                    ranks={**r.ranks, "rerank": rank},
                    scores={**r.scores, "rerank": score},
                )
                for rank, (score, _, r) in enumerate(scored[:k], start=1)
            ]
        )
    return reranked
