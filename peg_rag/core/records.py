"""JSONL records, read line by line, with errors that name the file, line and field."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger("peg_rag")
T = TypeVar("T")


@dataclass(frozen=True)
class FileLine:
    """A line of a file, for error messages."""

    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


class DataError(ValueError):
    """A bad input line: names the file, the line number and (when known) the field."""

    def __init__(self, where: FileLine, message: str, field_name: str | None = None) -> None:
        self.where = where
        self.field_name = field_name
        prefix = f"{where}: field {field_name!r}: " if field_name else f"{where}: "
        super().__init__(prefix + message)


@dataclass
class Skipped:
    """Counts lines dropped in skip mode and keeps the first few messages."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, error: DataError) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))

    def report(self) -> None:
        if self.count:
            logger.warning("skipped %d bad lines, e.g. %s", self.count, "; ".join(self.examples))


def text_field(record: dict[str, Any], name: str, where: FileLine) -> str:
    """A required non-empty string field."""
    value = record.get(name)
    if value is None:
        raise DataError(where, "missing", name)
    if not isinstance(value, str):
        raise DataError(where, f"expected a string, got {type(value).__name__}", name)
    if not value.strip():
        raise DataError(where, "empty or whitespace-only text", name)
    return value


def text_list_field(
    record: dict[str, Any], name: str, where: FileLine, *, min_items: int = 0
) -> list[str]:
    """A list of non-empty strings; a missing field counts as an empty list."""
    value = record.get(name, [])
    if not isinstance(value, list):
        raise DataError(where, f"expected a list of strings, got {type(value).__name__}", name)
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise DataError(where, f"item {i} is not a non-empty string: {item!r}", name)
    if len(value) < min_items:
        raise DataError(where, f"needs at least {min_items} item(s), got {len(value)}", name)
    return value


def decode_line(line: str | bytes, where: FileLine) -> dict[str, Any]:
    """Parse one JSONL line into a dict, or raise DataError naming where it is."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(where, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    except UnicodeDecodeError:
        raise DataError(where, "not valid UTF-8") from None
    if not isinstance(record, dict):
        raise DataError(where, f"expected a JSON object, got {type(record).__name__}")
    return record


def read_jsonl(
    path: str | Path,
    parse: Callable[[dict[str, Any], FileLine], T],
    *,
    skipped: Skipped | None = None,
) -> Iterator[T]:
    """Yield ``parse(record, where)`` for each non-blank line of a JSONL file.

    Malformed JSON, non-object lines and anything ``parse`` rejects raise DataError;
    with ``skipped`` given they are counted there instead. The file is read lazily.
    """
    path = Path(path)
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = FileLine(path, number)
            try:
                yield parse(decode_line(line, where), where)
            except DataError as error:
                if skipped is None:
                    raise
                skipped.add(error)
