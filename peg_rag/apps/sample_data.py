"""The bundled sample knowledge base: short Chinese passages and realistic user questions.

300 passages written for this project (100 each on medical insurance 医保, tourism 旅游
and government services 政务), and 90 questions phrased the way users ask, each with
the ids of the passages that answer it. The examples, ``peg-rag demo`` and the tests use
them. The questions are for evaluation only: never train on them. The content is an
illustration of common rules, not authoritative policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from peg_rag.core.documents import Document, read_documents
from peg_rag.core.records import DataError, FileLine, read_jsonl, text_field, text_list_field

DATA_PACKAGE = "peg_rag.data"
KB_FILE = "sample_kb.jsonl"
QUESTIONS_FILE = "sample_questions.jsonl"


@dataclass(frozen=True)
class Passage:
    """One knowledge-base entry; ``metadata`` holds at least ``domain``."""

    id: str
    title: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Question:
    """A user question and the ids of the passages that answer it."""

    id: str
    text: str
    gold_ids: list[str]
    domain: str


def data_path(name: str) -> Path:
    """Filesystem path of a file shipped in ``peg_rag/data``."""
    return Path(str(resources.files(DATA_PACKAGE).joinpath(name)))


def _passage(record: dict[str, Any], where: FileLine) -> Passage:
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise DataError(where, f"expected an object, got {type(metadata).__name__}", "metadata")
    return Passage(
        id=text_field(record, "id", where),
        title=text_field(record, "title", where),
        text=text_field(record, "text", where),
        metadata=metadata,
    )


def _question(record: dict[str, Any], where: FileLine) -> Question:
    return Question(
        id=text_field(record, "id", where),
        text=text_field(record, "text", where),
        gold_ids=text_list_field(record, "gold_ids", where, min_items=1),
        domain=text_field(record, "domain", where),
    )


def load_sample_kb(path: str | Path | None = None) -> list[Passage]:
    """The bundled passages (or those of a JSONL file in the same format)."""
    return list(read_jsonl(path or data_path(KB_FILE), _passage))


def kb_documents() -> list[Document]:
    """The bundled passages as HybridRetriever documents, read exactly as ``peg-rag index``
    reads JSONL: the title joined to the text, ``title`` and ``domain`` in the metadata."""
    return read_documents(data_path(KB_FILE), KB_FILE)


def load_sample_questions(path: str | Path | None = None) -> list[Question]:
    """The bundled evaluation questions (or those of a JSONL file in the same format)."""
    return list(read_jsonl(path or data_path(QUESTIONS_FILE), _question))
