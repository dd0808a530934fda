"""Exact top-k search against brute force, across chunk boundaries, ties and backends."""

from __future__ import annotations

import numpy as np
import pytest

from peg_rag.retrieval.topk import faiss_available, top_k

BACKENDS = [
    "torch",
    pytest.param(
        "faiss", marks=pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
    ),
]


def brute_force(queries: np.ndarray, candidates: np.ndarray, k: int):
    """Full score matrix, sorted by descending score then ascending index."""
    scores = queries @ candidates.T
    columns = np.broadcast_to(np.arange(len(candidates)), scores.shape)
    order = np.lexsort((columns, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.fixture
def tied_vectors():
    """Small-integer vectors (exact float32 products) with duplicated rows: many exact ties."""
    rng = np.random.default_rng(0)
    base = np.round(rng.standard_normal((61, 6)) * 2).astype(np.float32)
    candidates = np.concatenate([base, base[:30], base[:10]])
    queries = np.round(rng.standard_normal((23, 6)) * 2).astype(np.float32)
    return queries, candidates


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 7, 50, 100, 101, 10_000])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_matches_brute_force_with_ties(tied_vectors, backend, chunk_size, k):
    queries, candidates = tied_vectors
    expected_scores, expected = brute_force(queries, candidates, k)
    scores, indices = top_k(
        queries, candidates, k, chunk_size=chunk_size, query_batch=4, backend=backend
    )
    assert indices.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(scores, expected_scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalized_float_vectors(backend):
    rng = np.random.default_rng(1)
    candidates = rng.standard_normal((500, 16)).astype(np.float32)
    candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
    queries = candidates[:40] + 0.1 * rng.standard_normal((40, 16)).astype(np.float32)
    expected_scores, _ = brute_force(queries, candidates, 20)
    scores, indices = top_k(queries, candidates, 20, chunk_size=64, backend=backend)
    # Float rounding differs between kernels, so compare scores, and each index's own score.
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    rescored = np.einsum("qd,qkd->qk", queries, candidates[indices])
    np.testing.assert_allclose(rescored, scores, atol=1e-5)
    assert (indices[:, 0] == np.arange(40)).all()


def test_k_above_pool_and_errors():
    candidates = np.eye(3, dtype=np.float32)
    scores, indices = top_k(np.array([[0.0, 1.0, 0.5]]), candidates, 10, backend="torch")
    assert indices.tolist() == [[1, 2, 0]] and scores.tolist() == [[1.0, 0.5, 0.0]]
    with pytest.raises(ValueError, match="dimensions"):
        top_k(np.ones((1, 2)), candidates, 1)
    with pytest.raises(ValueError, match=">= 1"):
        top_k(candidates, candidates, 0)
    with pytest.raises(ValueError, match="backend"):
        top_k(candidates, candidates, 1, backend="annoy")
