"""Load BEIR-layout retrieval sets and sentence-pair files, with line-precise errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .records import DataError, FileLine, read_jsonl, text_field


@dataclass
class RetrievalSet:
    """A BEIR folder: corpus and queries by id, and graded qrels (query -> doc -> grade)."""

    name: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def _id(record: dict, where: FileLine) -> str:
    value = record.get("_id", record.get("id"))
    if value is None or str(value) == "":
        raise DataError(where, "missing", "_id")
    return str(value)


def corpus_text(record: dict, where: FileLine) -> str:
    """BEIR joins a document's title and text with a space; either may be empty, not both."""
    title = record.get("title") or ""
    text = record.get("text") or ""
    if not isinstance(title, str) or not isinstance(text, str):
        raise DataError(where, "title and text must be strings", "text")
    joined = f"{title} {text}".strip()
    if not joined:
        raise DataError(where, "empty document (no title, no text)", "text")
    return joined


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """Read a qrels TSV (query-id, corpus-id, score), skipping its header line."""
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.rstrip("\n").split("\t")
            if number == 1 and fields[0] == "query-id" or not line.strip():
                continue
            where = FileLine(path, number)
            if len(fields) != 3:
                raise DataError(where, f"expected 3 tab-separated fields, got {len(fields)}")
            try:
                grade = int(fields[2])
            except ValueError:
                raise DataError(where, f"not an integer: {fields[2]!r}", "score") from None
            qrels.setdefault(fields[0], {})[fields[1]] = grade
    return qrels


def load_beir(folder: str | Path) -> RetrievalSet:
    """Read ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/test.tsv`` from a folder."""
    folder = Path(folder)
    for part in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        if not (folder / part).is_file():
            raise FileNotFoundError(f"{folder} is not a BEIR folder: {part} is missing")
    corpus = dict(read_jsonl(folder / "corpus.jsonl", lambda r, w: (_id(r, w), corpus_text(r, w))))
    queries = dict(
        read_jsonl(folder / "queries.jsonl", lambda r, w: (_id(r, w), text_field(r, "text", w)))
    )
    qrels = read_qrels(folder / "qrels" / "test.tsv")
    return RetrievalSet(folder.name, corpus, queries, qrels)


def load_pairs(path: str | Path) -> tuple[list[str], list[str], list[float]]:
    """Read a sentence-pair TSV (s1, s2, score) with a header line."""
    path = Path(path)
    left: list[str] = []
    right: list[str] = []
    scores: list[float] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if number == 1 or not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            where = FileLine(path, number)
            if len(fields) != 3:
                raise DataError(where, f"expected 3 tab-separated fields, got {len(fields)}")
            if not fields[0].strip() or not fields[1].strip():
                raise DataError(where, "empty sentence", "s1" if not fields[0].strip() else "s2")
            try:
                scores.append(float(fields[2]))
            except ValueError:
                raise DataError(where, f"not a number: {fields[2]!r}", "score") from None
            left.append(fields[0])
            right.append(fields[1])
    return left, right, scores
