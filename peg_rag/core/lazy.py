"""Lazy package attributes: a package names what it exports, and the module defining each
name is imported on first use.

``import peg_rag`` and ``peg-rag --help`` must not pay for torch, transformers or chromadb
(seconds on a small machine), yet ``from peg_rag import PEGEncoder`` must keep working. Each
package ``__init__`` therefore declares its exports here (and again under
``typing.TYPE_CHECKING`` for type checkers) instead of importing them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    namespace: dict[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the package whose ``globals()`` is ``namespace``;
    ``exports`` maps a name to the module, relative to the package (``".encoder"``), that
    defines it."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
