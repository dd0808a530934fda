"""Retrieval layer: chunking, BM25, vector stores, filters, fusion, the hybrid retriever and
its evaluation. Imports only the core layer; heavy modules load on first use."""

from typing import TYPE_CHECKING

from peg_rag.core.lazy import lazy_exports

if TYPE_CHECKING:
    from .bm25 import BM25Index, ChineseTokenizer
    from .chunker import Chunker
    from .evaluate import evaluate_folder, evaluate_sets, load_sets, markdown_table
    from .filters import validate_filter
    from .hybrid import AddReport, HybridRetriever
    from .index_files import InconsistentIndexError, is_index
    from .results import RetrievalResult
    from .settings import HybridSettings
    from .store import ChromaStore, VectorStore

__all__ = [
    "AddReport",
    "BM25Index",
    "ChineseTokenizer",
    "ChromaStore",
    "Chunker",
    "HybridRetriever",
    "HybridSettings",
    "InconsistentIndexError",
    "RetrievalResult",
    "VectorStore",
    "evaluate_folder",
    "evaluate_sets",
    "is_index",
    "load_sets",
    "markdown_table",
    "validate_filter",
]
__getattr__, __dir__ = lazy_exports(
    globals(),
    {
        "AddReport": ".hybrid",
        "BM25Index": ".bm25",
        "ChineseTokenizer": ".bm25",
        "ChromaStore": ".store",
        "Chunker": ".chunker",
        "HybridRetriever": ".hybrid",
        "HybridSettings": ".settings",
        "InconsistentIndexError": ".index_files",
        "RetrievalResult": ".results",
        "VectorStore": ".store",
        "evaluate_folder": ".evaluate",
        "evaluate_sets": ".evaluate",
        "is_index": ".index_files",
        "load_sets": ".evaluate",
        "markdown_table": ".evaluate",
        "validate_filter": ".filters",
    },
)
