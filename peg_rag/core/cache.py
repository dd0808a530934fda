"""Where peg-rag keeps what it can rebuild: fallback models, the demo index, benchmark work."""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "PEG_RAG_CACHE"


def cache_dir() -> Path:
    """``$PEG_RAG_CACHE``, else ``$XDG_CACHE_HOME/peg-rag``, else ``~/.cache/peg-rag``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peg-rag"
