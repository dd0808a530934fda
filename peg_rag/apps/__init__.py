"""Apps layer: ``peg-rag demo``, the RAG chat helpers of the examples, and the demo's
offline fallback model (trained with :mod:`peg_rag.trainer`). May use every layer below."""

from typing import TYPE_CHECKING

from peg_rag.core.lazy import lazy_exports

if TYPE_CHECKING:
    from .demo import run_demo

__all__ = ["run_demo"]
__getattr__, __dir__ = lazy_exports(globals(), {"run_demo": ".demo"})
