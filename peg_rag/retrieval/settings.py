"""Settings of a hybrid index, saved with it, and the names of its retrieval options.

No heavy imports: the command line takes its defaults from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .fusion import check_weights as check_list_weights

RETRIEVERS = ("dense", "bm25")
METHODS = ("hybrid", "dense", "bm25")
FUSIONS = ("relative", "rrf")
CHUNK_UNITS = ("token", "char")
BM25_TOKENIZERS = ("jieba", "rjieba")  # the word segmenter under BM25: jieba, or jieba-rs
Method = Literal["hybrid", "dense", "bm25"]
Fusion = Literal["relative", "rrf"]
BM25Tokenizer = Literal["jieba", "rjieba"]
# New indexes segment with this one; an index keeps the one it was built with. rjieba: 4.3x
# jieba's indexing rate, nDCG@10 within 0.08 on every shared set (RESULTS.md, BM25 tokenizers).
DEFAULT_BM25_TOKENIZER: BM25Tokenizer = "rjieba"


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_weights(weights: Mapping[str, float]) -> None:
    """Per-retriever weights: one >= 0 for each of 'dense' and 'bm25'."""
    if set(weights) != set(RETRIEVERS):
        raise ValueError(f"weights must give a weight >= 0 for 'dense' and 'bm25', got {weights}")
    check_list_weights(len(RETRIEVERS), list(weights.values()))


@dataclass
class HybridSettings:
    """Chunking and retrieval defaults, saved with the index.

    ``chunk_size`` counts encoder tokens (or characters with ``chunk_unit="char"``; 0 keeps
    documents whole); ``chunk_overlap`` defaults to an eighth of it.
    ``weights`` are per retriever (``dense``, ``bm25``); ``candidates`` is how many
    results each retriever contributes to fusion, and ``rerank_top_n`` how many fused
    results a reranker (when there is one) reorders. The defaults (relative-score fusion,
    dense 0.7 / BM25 0.3, 100 candidates) were chosen once for all data sets; see the
    "Hybrid retrieval" section of benchmarks/RESULTS.md for the comparison.
    """

    chunk_size: int = 256
    chunk_overlap: int | None = None
    chunk_unit: Literal["token", "char"] = "token"
    normalize_width: bool = False
    fusion: Fusion = "relative"
    weights: dict[str, float] = field(default_factory=lambda: {"dense": 0.7, "bm25": 0.3})
    rrf_k: int = 60
    candidates: int = 100
    rerank_top_n: int = 30

    def __post_init__(self) -> None:
        check_choice("chunk_unit", self.chunk_unit, CHUNK_UNITS)
        check_choice("fusion", self.fusion, FUSIONS)
        check_weights(self.weights)
        if self.chunk_size < 0:
            raise ValueError(
                f"chunk_size must be >= 0 (0 keeps documents whole), got {self.chunk_size}"
            )
        if self.chunk_overlap is None:
            self.chunk_overlap = self.chunk_size // 8
        if self.chunk_size and not 0 <= self.chunk_overlap < self.chunk_size:
            raise ValueError(
                f"chunk_overlap must be in [0, chunk_size={self.chunk_size}), "
                f"got {self.chunk_overlap}"
            )
        for name in ("candidates", "rerank_top_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
