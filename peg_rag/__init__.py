"""peg-rag: robust Chinese text embeddings, trained the PEG way, for RAG stacks.

The names below load on first use, so ``import peg_rag`` (and ``peg-rag --help``) stays
fast; see ARCHITECTURE.md for the layers behind them.
"""

from typing import TYPE_CHECKING

from peg_rag.core.lazy import lazy_exports

if TYPE_CHECKING:
    from peg_rag.core.documents import Document
    from peg_rag.core.encoder import PEGEncoder
    from peg_rag.core.encoding import Encoder
    from peg_rag.core.model_files import ModelNotFoundError
    from peg_rag.core.reranker import Reranker
    from peg_rag.retrieval.bm25 import ChineseTokenizer
    from peg_rag.retrieval.hybrid import HybridRetriever
    from peg_rag.retrieval.index_files import InconsistentIndexError
    from peg_rag.retrieval.results import RetrievalResult
    from peg_rag.retrieval.store import ChromaStore, VectorStore

__version__ = "0.1.0"
__all__ = [
    "ChineseTokenizer",
    "ChromaStore",
    "Document",
    "Encoder",
    "HybridRetriever",
    "InconsistentIndexError",
    "ModelNotFoundError",
    "PEGEncoder",
    "Reranker",
    "RetrievalResult",
    "VectorStore",
]
__getattr__, __dir__ = lazy_exports(
    globals(),
    {
        "ChineseTokenizer": ".retrieval.bm25",
        "ChromaStore": ".retrieval.store",
        "Document": ".core.documents",
        "Encoder": ".core.encoding",
        "HybridRetriever": ".retrieval.hybrid",
        "InconsistentIndexError": ".retrieval.index_files",
        "ModelNotFoundError": ".core.model_files",
        "PEGEncoder": ".core.encoder",
        "Reranker": ".core.reranker",
        "RetrievalResult": ".retrieval.results",
        "VectorStore": ".retrieval.store",
    },
)
