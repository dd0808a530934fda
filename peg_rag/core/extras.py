"""Optional dependencies: a missing extra fails with the command that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the pip command."""


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import ``module``, or raise MissingExtraError naming ``pip install "peg-rag[extra]"``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{needed_for} needs {module.split('.')[0]}, which is not installed: "
            f'pip install "peg-rag[{extra}]"'
        ) from exc
