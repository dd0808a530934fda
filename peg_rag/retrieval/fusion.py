"""Fuse ranked lists from several retrievers into one ranking.

- Reciprocal rank fusion (Cormack et al., 2009): ``sum_r w_r / (k + rank_r(d))`` with k=60;
  a list that does not contain d adds nothing. It ignores score gaps, so a strong retriever
  and a weak one pull equally hard unless weighted.
- Relative score fusion: each retriever's scores are min-max normalized over the candidate
  pool, then combined as ``sum_r w_r * norm_r(d)``. A retriever that did not score d counts
  as its minimum (0). Keeping score gaps is what lets it beat RRF when one retriever is
  clearly better on a query.

Ties are broken by first appearance (the order of ``lists``, then rank), so results are
deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ScoredList = Sequence[tuple[str, float]]


def check_weights(n: int, weights: Sequence[float] | None) -> list[float]:
    """``n`` weights >= 0 as floats (all 1.0 when None)."""
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"{n} ranked lists but {len(weights)} weights")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0, got {list(weights)}")
    return [float(w) for w in weights]


def _first_seen(lists: Sequence[Sequence[str]]) -> dict[str, int]:
    order: dict[str, int] = {}
    for ranked in lists:
        for item in ranked:
            order.setdefault(item, len(order))
    return order


def _sorted(fused: Mapping[str, float], order: Mapping[str, int]) -> list[tuple[str, float]]:
    return sorted(fused.items(), key=lambda pair: (-pair[1], order[pair[0]]))


def reciprocal_rank(
    rankings: Sequence[Sequence[str]], weights: Sequence[float] | None = None, k: int = 60
) -> list[tuple[str, float]]:
    """Weighted RRF of ranked id lists (best first); returns (id, score) best first."""
    w = check_weights(len(rankings), weights)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    fused: dict[str, float] = {}
    for weight, ranked in zip(w, rankings, strict=True):
        for rank, item in enumerate(ranked, start=1):
            fused[item] = fused.get(item, 0.0) + weight / (k + rank)
    return _sorted(fused, _first_seen(rankings))


def min_max(scores: Sequence[float]) -> list[float]:
    """Scale to [0, 1] by (s - min) / (max - min); all-equal scores become 1."""
    if not scores:
        return []
    low, high = min(scores), max(scores)
    if high == low:
        return [1.0] * len(scores)
    return [(s - low) / (high - low) for s in scores]


def relative_score(
    scored: Sequence[ScoredList], weights: Sequence[float] | None = None
) -> list[tuple[str, float]]:
    """Weighted sum of min-max normalized scores; each list is (id, score) best first."""
    w = check_weights(len(scored), weights)
    fused: dict[str, float] = {}
    for weight, pairs in zip(w, scored, strict=True):
        for (item, _), norm in zip(pairs, min_max([s for _, s in pairs]), strict=True):
            fused[item] = fused.get(item, 0.0) + weight * norm
    return _sorted(fused, _first_seen([[item for item, _ in pairs] for pairs in scored]))
