"""Chroma-style metadata filters, evaluated in Python so BM25 can apply the same ``where``.

Supported, as in Chroma: ``{"field": value}`` (equality), ``{"field": {"$eq" | "$ne" | "$gt"
| "$gte" | "$lt" | "$lte" | "$in" | "$nin": operand}}``, and ``{"$and": [...]}`` /
``{"$or": [...]}``. A dict with several fields means all of them. As in Chroma, ``$ne``
and ``$nin`` also match records that lack the field; every other operator needs it, and
``$gt``/``$gte``/``$lt``/``$lte`` compare numbers only. Booleans never equal numbers, and
an integer value is compared with a float operand truncated toward zero, as Chroma does.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Where = Mapping[str, Any]
Metadata = Mapping[str, Any]

_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": operator.gt,
    "$gte": operator.ge,
    "$lt": operator.lt,
    "$lte": operator.le,
}
OPERATORS = ("$eq", "$ne", "$in", "$nin", *_ORDER)


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool))


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps bools apart from numbers (True != 1), as Chroma does."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def validate_filter(where: Where) -> None:
    """Raise ValueError naming the first unsupported part of a filter."""
    if not isinstance(where, Mapping) or not where:
        raise ValueError(f"a filter must be a non-empty dict, got {where!r}")
    for key, value in where.items():
        if key in ("$and", "$or"):
            if not isinstance(value, Sequence) or isinstance(value, str) or len(value) < 2:
                raise ValueError(f"{key} takes a list of at least two filters, got {value!r}")
            for clause in value:
                validate_filter(clause)
        elif key.startswith("$"):
            raise ValueError(f"unsupported filter operator {key!r} at the top level")
        elif isinstance(value, Mapping):
            if len(value) != 1:
                raise ValueError(f"field {key!r}: give exactly one operator, got {dict(value)}")
            op, operand = next(iter(value.items()))
            if op not in OPERATORS:
                raise ValueError(
                    f"field {key!r}: unsupported operator {op!r}; use one of {OPERATORS}"
                )
            if op in ("$in", "$nin"):
                if not isinstance(operand, Sequence) or isinstance(operand, str) or not operand:
                    raise ValueError(f"field {key!r}: {op} takes a non-empty list")
                if not all(_scalar(v) for v in operand) or len({type(v) for v in operand}) > 1:
                    raise ValueError(
                        f"field {key!r}: {op} values must all be str, all int, all float "
                        "or all bool (as Chroma requires)"
                    )
            elif op in _ORDER:
                if isinstance(operand, bool) or not isinstance(operand, (int, float)):
                    raise ValueError(f"field {key!r}: {op} compares numbers, got {operand!r}")
            elif not _scalar(operand):
                raise ValueError(f"field {key!r}: {op} value must be str, int, float or bool")
        elif not _scalar(value):
            raise ValueError(f"field {key!r}: value must be str, int, float or bool, got {value!r}")


def _as_chroma_compares(value: Any, operand: Any) -> Any:
    """Chroma compares an integer value with a float operand truncated toward zero
    (``{"year": {"$gte": 2021.5}}`` matches 2021); do the same so both sides agree."""
    if isinstance(value, int) and not isinstance(value, bool) and isinstance(operand, float):
        return math.trunc(operand)
    return operand


def _field_matches(metadata: Metadata, key: str, condition: Any) -> bool:
    op, operand = (
        next(iter(condition.items())) if isinstance(condition, Mapping) else ("$eq", condition)
    )
    present = key in metadata
    value = metadata.get(key)
    if op in ("$in", "$nin"):
        hit = any(_same(value, _as_chroma_compares(value, v)) for v in operand)
    else:
        operand = _as_chroma_compares(value, operand)
        hit = _same(value, operand)
    if op in ("$ne", "$nin"):
        return not present or not hit
    if not present:
        return False
    if op in ("$eq", "$in"):
        return hit
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return _ORDER[op](value, operand)


def matches(where: Where, metadata: Metadata) -> bool:
    """Whether one record's metadata passes a (validated) filter."""
    for key, value in where.items():
        if key == "$and":
            ok = all(matches(clause, metadata) for clause in value)
        elif key == "$or":
            ok = any(matches(clause, metadata) for clause in value)
        else:
            ok = _field_matches(metadata, key, value)
        if not ok:
            return False
    return True


def mask(where: Where, metadatas: Sequence[Metadata]) -> np.ndarray:
    """A float32 0/1 vector: 1 where the metadata passes the filter."""
    validate_filter(where)
    return np.fromiter(
        (matches(where, m) for m in metadatas), dtype=np.float32, count=len(metadatas)
    )


def to_chroma(where: Where) -> dict[str, Any]:
    """The same filter in the form Chroma accepts: one key per dict, so several fields
    become an explicit ``$and``."""

    def convert(item: Where) -> dict[str, Any]:
        clauses = [
            {key: [convert(c) for c in value]} if key in ("$and", "$or") else {key: value}
            for key, value in item.items()
        ]
        return clauses[0] if len(clauses) == 1 else {"$and": clauses}

    validate_filter(where)
    return convert(where)
