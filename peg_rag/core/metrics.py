"""Retrieval and similarity metrics as C-MTEB and BEIR compute them.

Scores are fractions in [0, 1]; reports multiply by 100.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

Qrels = Mapping[str, Mapping[str, int]]


def ndcg_at_k(ranked: Sequence[str], relevance: Mapping[str, int], k: int) -> float:
    """nDCG@k with graded gains 2^rel - 1 and log2(rank + 1) discounts."""
    dcg = sum(
        (2 ** relevance.get(doc, 0) - 1) / math.log2(rank + 2)
        for rank, doc in enumerate(ranked[:k])
    )
    ideal = sorted((r for r in relevance.values() if r > 0), reverse=True)[:k]
    idcg = sum((2**rel - 1) / math.log2(rank + 2) for rank, rel in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def mrr_at_k(ranked: Sequence[str], relevance: Mapping[str, int], k: int) -> float:
    """Reciprocal rank of the first relevant document within the top k, else 0."""
    for rank, doc in enumerate(ranked[:k], start=1):
        if relevance.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def recall_at_k(ranked: Sequence[str], relevance: Mapping[str, int], k: int) -> float:
    """Share of the relevant documents found in the top k."""
    relevant = {doc for doc, rel in relevance.items() if rel > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def retrieval_scores(run: Mapping[str, Sequence[str]], qrels: Qrels) -> dict[str, float]:
    """Mean nDCG@10, MRR@10, Recall@10 and Recall@100 over the queries that have qrels.

    ``run`` maps query id to ranked document ids; a query missing from it scores 0.
    """
    judged = [q for q, rel in qrels.items() if any(v > 0 for v in rel.values())]
    if not judged:
        raise ValueError("qrels hold no relevant document, so there is nothing to score")
    metrics = {
        "ndcg@10": lambda r, q: ndcg_at_k(r, q, 10),
        "mrr@10": lambda r, q: mrr_at_k(r, q, 10),
        "recall@10": lambda r, q: recall_at_k(r, q, 10),
        "recall@100": lambda r, q: recall_at_k(r, q, 100),
    }
    return {
        name: float(np.mean([fn(run.get(q, []), qrels[q]) for q in judged]))
        for name, fn in metrics.items()
    }


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their positions (as Spearman needs)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation with average ranks for ties."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or len(a) < 2:
        raise ValueError("spearman needs two sequences of the same length >= 2")
    return float(np.corrcoef(_average_ranks(a), _average_ranks(b))[0, 1])
