"""Documents: what users index, and how they are read from .txt, .md and .jsonl files.

A :class:`Document` has the user's id, its text and scalar metadata. Files are read as
``peg-rag index`` reads them: a .txt or .md file is one document whose id is the file's
name; a .jsonl file holds one document per line, ``{"id", "text", "title"?, "metadata"?}``
or BEIR's ``corpus.jsonl`` (``_id``, title joined to the text as BEIR does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .beir import corpus_text
from .records import DataError, FileLine, read_jsonl

SUFFIXES = (".txt", ".md", ".jsonl")
METADATA_TYPES = (str, int, float, bool)
RESERVED_KEY = "doc_id"  # results carry the document id under this metadata key


@dataclass
class Document:
    """A source document: ``id`` as given by the user, its text and scalar metadata."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def metadata_error(metadata: Any) -> str | None:
    """What is wrong with a metadata dict (None if nothing): values must be str, int, float
    or bool, keys strings, and ``doc_id`` is reserved."""
    if not isinstance(metadata, Mapping):
        return f"metadata must be an object, got {type(metadata).__name__}"
    for key, value in metadata.items():
        if key == RESERVED_KEY:
            return f"metadata key {RESERVED_KEY!r} is reserved"
        if not isinstance(key, str) or not isinstance(value, METADATA_TYPES):
            return f"metadata {key!r} must map a string to a str, int, float or bool, got {value!r}"
    return None


def as_document(item: Document | Mapping[str, Any], position: int) -> Document:
    """A checked Document from a Document or a ``{"id", "text", "metadata"}`` dict;
    errors name ``documents[position]``."""
    if isinstance(item, Document):
        doc = item
    elif isinstance(item, Mapping):
        unknown = set(item) - {"id", "text", "metadata"}
        if unknown:
            raise ValueError(f"documents[{position}]: unknown keys {sorted(unknown)}")
        doc = Document(item.get("id"), item.get("text"), dict(item.get("metadata") or {}))  # type: ignore[arg-type]
    else:
        raise TypeError(
            f"documents[{position}] is {type(item).__name__}, expected Document or dict"
        )
    if not isinstance(doc.id, str) or not doc.id:
        raise ValueError(f"documents[{position}]: id must be a non-empty string, got {doc.id!r}")
    if not isinstance(doc.text, str) or not doc.text.strip():
        raise ValueError(f"documents[{position}] (id {doc.id!r}): text must be a non-empty string")
    problem = metadata_error(doc.metadata)
    if problem:
        raise ValueError(f"documents[{position}] (id {doc.id!r}): {problem}")
    return doc


def find_files(paths: list[Path]) -> list[Path]:
    """The input files: given files as they are, directories searched for SUFFIXES."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise ValueError(f"{path}: unsupported file type; use {', '.join(SUFFIXES)}")
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return list(dict.fromkeys(found))


def source_name(path: Path) -> str:
    """A stable name for a file: relative to the working directory when inside it."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def _jsonl_document(record: dict[str, Any], where: FileLine, source: str) -> Document:
    doc_id = record.get("id", record.get("_id"))
    if doc_id is None or str(doc_id) == "":
        raise DataError(where, "missing (give 'id', or '_id' as in BEIR)", "id")
    metadata = record.get("metadata") or {}
    problem = metadata_error(metadata)
    if problem:
        raise DataError(where, problem, "metadata")
    title = record.get("title") or ""
    extra = {"source": source, **({"title": title} if title else {})}
    return Document(str(doc_id), corpus_text(record, where), {**extra, **metadata})


def read_documents(path: Path, source: str) -> list[Document]:
    """The documents of one input file; ``source`` goes into each one's metadata."""
    if path.suffix == ".jsonl":
        return list(read_jsonl(path, lambda record, where: _jsonl_document(record, where, source)))
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    return [Document(source, text, {"source": source})]


def read_inputs(paths: list[Path]) -> list[Document]:
    """The documents of every file found in ``paths``, each named by :func:`source_name`."""
    return [doc for f in find_files(paths) for doc in read_documents(f, source_name(f))]
