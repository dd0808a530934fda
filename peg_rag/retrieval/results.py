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
    ``start``/``end`` the chunk's character offsets in the document text. ``score`` is the
    reranker's logit for a reranked result, else the fused score (the retriever's own score
    with ``method="dense"`` or ``"bm25"``); results come best first, reranked ones before
    any first-stage results that follow them.
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
    top_n: int,
    k: int,
) -> list[list[RetrievalResult]]:
    """Each query's first ``top_n`` candidates reordered by the reranker (with their rerank
    rank and score), then the rest in their first-stage order; the best k of that.

    All pairs go to the reranker in one call, so they share one length-sorted run.
    """
    heads = [found[:top_n] for found in candidates]
    pairs = [(q, r.text) for q, head in zip(queries, heads, strict=True) for r in head]
    scores = iter(reranker.score_pairs(pairs).tolist())
    reranked = []
    for head, found in zip(heads, candidates, strict=True):
        scored = sorted(
            ((next(scores), n, r) for n, r in enumerate(head)), key=lambda t: (-t[0], t[1])
        )
        ordered = [
            replace(
                r,
                score=score,
                ranks={**r.ranks, "rerank": rank},
                scores={**r.scores, "rerank": score},
            )
            for rank, (score, _, r) in enumerate(scored, start=1)
        ]
        reranked.append((ordered + list(found[top_n:]))[:k])
    return reranked
