"""peg-rag: robust Chinese text embeddings, trained the PEG way, for RAG stacks."""

from .encoder import PEGEncoder
from .hybrid import Document, HybridRetriever, RetrievalResult
from .model_files import ModelNotFoundError

__all__ = ["PEGEncoder", "ModelNotFoundError", "HybridRetriever", "RetrievalResult", "Document"]
__version__ = "0.1.0"
