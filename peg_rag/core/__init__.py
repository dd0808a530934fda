"""Core layer: models and how they load, texts and documents, file I/O, metrics.

Imports nothing from the other layers. Heavy modules (torch, transformers) load on first
use of the names below.
"""

from typing import TYPE_CHECKING

from .lazy import lazy_exports

if TYPE_CHECKING:
    from .documents import Document
    from .encoder import PEGEncoder
    from .encoding import Encoder, vector_settings
    from .model_export import export_model
    from .model_files import ModelNotFoundError
    from .reranker import NotACrossEncoderError, Reranker

__all__ = [
    "Document",
    "Encoder",
    "ModelNotFoundError",
    "NotACrossEncoderError",
    "PEGEncoder",
    "Reranker",
    "export_model",
    "vector_settings",
]
__getattr__, __dir__ = lazy_exports(
    globals(),
    {
        "Document": ".documents",
        "Encoder": ".encoding",
        "ModelNotFoundError": ".model_files",
        "NotACrossEncoderError": ".reranker",
        "PEGEncoder": ".encoder",
        "Reranker": ".reranker",
        "export_model": ".model_export",
        "vector_settings": ".encoding",
    },
)
