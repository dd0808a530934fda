"""Fusion scores against ranks and scores computed by hand."""

from __future__ import annotations

import pytest

from peg_rag.retrieval.fusion import min_max, reciprocal_rank, relative_score


def test_rrf_matches_hand_computed_scores():
    dense = ["a", "b", "c"]
    bm25 = ["c", "a", "d"]
    fused = dict(reciprocal_rank([dense, bm25], k=60))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["b"] == pytest.approx(1 / 62)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert fused["d"] == pytest.approx(1 / 63)
    assert [item for item, _ in reciprocal_rank([dense, bm25])] == ["a", "c", "b", "d"]


def test_rrf_weights_and_ties():
    dense, bm25 = ["a", "b"], ["b", "a"]
    # Equal weights: a and b tie exactly; the tie goes to first appearance (dense's order).
    assert [i for i, _ in reciprocal_rank([dense, bm25])] == ["a", "b"]
    weighted = reciprocal_rank([dense, bm25], weights=[0.3, 0.7], k=60)
    assert [i for i, _ in weighted] == ["b", "a"]
    assert weighted[0][1] == pytest.approx(0.3 / 62 + 0.7 / 61)
    with pytest.raises(ValueError, match="weights"):
        reciprocal_rank([dense, bm25], weights=[1.0])
    with pytest.raises(ValueError, match=">= 0"):
        reciprocal_rank([dense], weights=[-1.0])


def test_relative_score_matches_hand_computed_scores():
    dense = [("a", 0.9), ("b", 0.7), ("c", 0.5)]
    bm25 = [("c", 12.0), ("d", 4.0), ("a", 2.0)]
    fused = dict(relative_score([dense, bm25], weights=[0.7, 0.3]))
    # min-max: dense a=1, b=0.5, c=0; bm25 c=1, d=0.2, a=0; absent counts as 0.
    assert fused["a"] == pytest.approx(0.7 * 1.0 + 0.3 * 0.0)
    assert fused["b"] == pytest.approx(0.7 * 0.5)
    assert fused["c"] == pytest.approx(0.7 * 0.0 + 0.3 * 1.0)
    assert fused["d"] == pytest.approx(0.3 * 0.2)
    order = [i for i, _ in relative_score([dense, bm25], weights=[0.7, 0.3])]
    assert order == ["a", "b", "c", "d"]
    # With BM25 weighted up, c (BM25's clear winner) comes first.
    assert relative_score([dense, bm25], weights=[0.3, 0.7])[0][0] == "c"


def test_relative_score_edge_cases():
    assert min_max([]) == [] and min_max([3.0, 3.0]) == [1.0, 1.0]
    assert relative_score([[], [("x", 1.0)]]) == [("x", 1.0)]
    assert relative_score([[], []]) == []
