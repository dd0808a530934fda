"""Serve layer: ``peg-rag serve``, an OpenAI-compatible embedding, rerank, retrieval and RAG
chat server with dynamic batching, and its web page. Needs the ``serve`` extra
(FastAPI, uvicorn); may use the apps layer and everything below it."""

from typing import TYPE_CHECKING

from peg_rag.core.lazy import lazy_exports

if TYPE_CHECKING:
    from .app import create_app
    from .server import run_server
    from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "run_server"]
__getattr__, __dir__ = lazy_exports(
    globals(),
    {"ServeSettings": ".settings", "create_app": ".app", "run_server": ".server"},
)
