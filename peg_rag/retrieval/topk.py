"""Exact top-k inner-product search in bounded memory.

Queries are scored against the candidates block by block (``query_batch`` x ``chunk_size``
scores at a time), so memory stays bounded however large the pool is. faiss's exact
``IndexFlatIP`` is used when faiss is importable, torch matrix products and ``topk``
otherwise. Both order each row by descending score with ties broken by the lower candidate
index, so the result does not depend on the chunking, and across backends differs at most
where two scores are within float32 rounding of each other.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _as_matrix(name: str, vectors: np.ndarray) -> np.ndarray:
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {matrix.shape}")
    return matrix


def _order(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by descending score, then ascending index."""
    order = np.lexsort((indices, -scores), axis=-1)
    return np.take_along_axis(scores, order, -1), np.take_along_axis(indices, order, -1)


def _chunk_best(chunk: torch.Tensor, start: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row of a score block whose columns are candidates start, start+1...

    Among equal scores the lower candidate index wins.
    """
    k = min(k, chunk.shape[1])
    top, where = (t.numpy() for t in torch.topk(chunk, k, dim=1, sorted=False))
    # topk picks arbitrarily among values equal to the k-th one; rows with such a tie at
    # the cut are redone exactly (rare: duplicate vectors).
    kth = torch.from_numpy(top.min(axis=1, keepdims=True))
    for row in np.flatnonzero((chunk >= kth).sum(dim=1).numpy() > k):
        scores = chunk[row].numpy()
        order = np.lexsort((np.arange(len(scores)), -scores))[:k]
        top[row], where[row] = scores[order], order
    return top, where + start


def _torch_block(
    queries: np.ndarray, candidates: np.ndarray, k: int, chunk_size: int
) -> tuple[np.ndarray, np.ndarray]:
    block = torch.from_numpy(queries)
    best = np.empty((len(queries), 0), dtype=np.float32)
    best_indices = np.empty((len(queries), 0), dtype=np.int64)
    for start in range(0, len(candidates), chunk_size):
        chunk = block @ torch.from_numpy(candidates[start : start + chunk_size]).T
        top, where = _chunk_best(chunk, start, k)
        best, best_indices = _order(
            np.concatenate([best, top], axis=1), np.concatenate([best_indices, where], axis=1)
        )
        best, best_indices = best[:, :k], best_indices[:, :k]
    return best, best_indices


def top_k(
    queries: np.ndarray,
    candidates: np.ndarray,
    k: int,
    *,
    chunk_size: int = 16384,
    query_batch: int = 512,
    backend: str = "auto",
    show_progress_bar: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k candidates of each query by inner product (cosine for normalized vectors).

    Returns ``(scores, indices)``, both of shape ``(len(queries), min(k, len(candidates)))``:
    float32 scores and int64 candidate row numbers, best first, ties to the lower index.
    ``backend`` is "auto" (faiss when installed, else torch), "faiss" or "torch".
    Beyond the inputs, the torch backend holds about ``query_batch * chunk_size * 5``
    bytes at a time (a score block and its comparison mask); faiss copies the candidates
    into its index.
    """
    queries = _as_matrix("queries", queries)
    candidates = _as_matrix("candidates", candidates)
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"queries have {queries.shape[1]} dimensions, candidates {candidates.shape[1]}"
        )
    if k < 1 or chunk_size < 1 or query_batch < 1:
        raise ValueError("k, chunk_size and query_batch must be >= 1")
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
    use_faiss = backend == "faiss" or (backend == "auto" and faiss_available())
    k = min(k, len(candidates))
    scores = np.empty((len(queries), k), dtype=np.float32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    if k == 0:
        return scores, indices
    if use_faiss:
        import faiss

        index = faiss.IndexFlatIP(candidates.shape[1])
        index.add(candidates)
    # One more candidate than asked for shows whether faiss cut through a tie.
    extra = 1 if use_faiss and k < len(candidates) else 0
    starts = range(0, len(queries), query_batch)
    for start in tqdm(starts, desc="Searching", unit="batch", disable=not show_progress_bar):
        block = queries[start : start + query_batch]
        if use_faiss:
            found_scores, found = index.search(block, k + extra)
            found_scores, found = _order(found_scores, found)
            if extra:
                redo = np.flatnonzero(found_scores[:, k - 1] == found_scores[:, k])
                if len(redo):  # a tie at the cut: the lower indices must win, as with torch
                    exact = _torch_block(block[redo], candidates, k + extra, chunk_size)
                    found_scores[redo], found[redo] = exact
            found_scores, found = found_scores[:, :k], found[:, :k]
        else:
            found_scores, found = _torch_block(block, candidates, k, chunk_size)
        scores[start : start + len(block)] = found_scores
        indices[start : start + len(block)] = found
    return scores, indices
