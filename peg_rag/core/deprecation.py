"""Renamed arguments keep their old names for one release, with a warning."""

from __future__ import annotations

import warnings
from typing import Any

REMOVED_IN = "0.3"


def renamed(old: str, new: str, old_value: Any, new_value: Any, *, stacklevel: int = 3) -> Any:
    """The value of an argument renamed from ``old`` to ``new``: the new one, else the old
    one with a DeprecationWarning; giving both is an error."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(f"give {new!r} only; {old!r} is its deprecated old name")
    warn_renamed(old, new, stacklevel=stacklevel + 1)
    return old_value


def warn_renamed(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` is a deprecated name of ``new``."""
    warnings.warn(
        f"{old!r} is deprecated and will be removed in peg-rag {REMOVED_IN}; use {new!r}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
