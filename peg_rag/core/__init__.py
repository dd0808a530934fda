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
    from .model_files import ModelNotFoundError

__all__ = ["Document", "Encoder", "ModelNotFoundError", "PEGEncoder", "vector_settings"]
__getattr__, __dir__ = lazy_exports(
    globals(),
    {
        "Document": ".documents",
        "Encoder": ".encoding",
        "ModelNotFoundError": ".model_files",
        "PEGEncoder": ".encoder",
        "vector_settings": ".encoding",
    },
)
