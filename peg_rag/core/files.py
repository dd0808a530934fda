"""Files that are replaced whole: written under a temporary name, synced, then renamed.

A crash (or kill -9) at any point leaves the old content or the new, never half of it.
Everything peg-rag writes for later use goes through here: settings and manifests (JSON),
outputs of the CLI (JSONL, .npy, reports), and whole directories (models, index states).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_OLD = ".old"  # suffix of a directory being swapped out


def temp_sibling(target: Path) -> Path:
    """A hidden name next to ``target`` (same file system, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_writer(target: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``target`` for writing; on success it is synced and
    renamed onto ``target``, on error it is removed and ``target`` is untouched."""
    tmp = temp_sibling(Path(target))
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` atomically."""
    with atomic_writer(path) as handle:
        handle.write(text)


def write_json(path: Path, value: Any, *, indent: int = 1) -> None:
    """Replace ``path`` with ``value`` as UTF-8 JSON, atomically."""
    write_text(path, json.dumps(value, ensure_ascii=False, indent=indent))


def read_json(path: Path) -> Any:
    """The parsed file; a missing or corrupt one raises ``ValueError`` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def swap_dir(new: Path, target: Path) -> None:
    """Put the complete directory ``new`` in place of ``target``.

    Two renames: ``target`` aside to ``.<name>.old``, then ``new`` onto ``target``. A crash
    between them leaves only the ``.old`` copy, which :func:`recover_swaps` puts back.
    """
    old = target.with_name(f".{target.name}{_OLD}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_swaps(directory: Path) -> None:
    """Finish or undo swaps that a crash interrupted in ``directory``."""
    for old in directory.glob(f".*{_OLD}"):
        target = old.with_name(old.name[1 : -len(_OLD)])
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, target)
