"""Turn a batch of texts into what a training step needs: unique token sequences and indices.

Identical texts are embedded once. With ``mask_duplicates`` the candidate columns are the
distinct passage texts, so a text equal to a query's positive is that positive and never its
negative; positives of other queries with the same query text are masked as well (they are
known positives). Without it every positive and negative slot is its own column, as in plain
InfoNCE.

A batch with teacher scores also gives, per query, the columns of its positive and its hard
negatives (its slots) and the teacher's score of each, for the distillation term.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from peg_rag.core.encoding import Kind
from peg_rag.core.records import FileLine

from .data import Batch

# (kind, text): kind is "query", "passage", or None for a query carrying its own prompt.
Key = tuple[str | None, str]
Tokenize = Callable[[Sequence[str], Kind | None], tuple[list[list[int]], int]]


@dataclass
class StepInputs:
    """A global batch in index form; every process holds the same one."""

    keys: list[Key]  # the distinct texts
    ids: list[list[int]]  # their token ids
    query_rows: torch.Tensor  # (N,) row of each query in ``keys``
    column_rows: torch.Tensor  # (M,) row of each candidate column
    positive_columns: torch.Tensor  # (N,) column of each query's positive
    masked_queries: torch.Tensor  # (P,) query of each extra masked (query, column) pair
    masked_columns: torch.Tensor  # (P,) column of each extra masked pair
    n_texts: int  # texts in the batch before de-duplication
    truncated: int  # texts cut to max_length
    guide_ids: list[list[int]] | None = None  # the texts tokenized for a guide encoder
    origins: list[FileLine] = field(default_factory=list)  # each query's training line
    # (N, K): the column of each query's positive, then of each of its hard negatives, and
    # the teacher's score of each (NaN where none); None when no line of the batch has scores.
    teacher_columns: torch.Tensor | None = None
    teacher_scores: torch.Tensor | None = None

    def owned(self, rank: int, world: int) -> np.ndarray:
        """Rows embedded by process ``rank``: every ``world``-th text by length, shortest first.

        Sorted, consecutive texts make mini-batches of similar lengths (little padding) and
        the processes an even share. Longest last: the gradient cache keeps the graph of the
        last mini-batch instead of embedding it twice, so that saves the most expensive one.
        """
        lengths = np.fromiter((len(row) for row in self.ids), dtype=np.int64, count=len(self.ids))
        return np.argsort(lengths, kind="stable")[rank::world]


def build_inputs(
    batch: Batch,
    tokenize: Tokenize,
    *,
    mask_duplicates: bool = True,
    guide_tokenize: Tokenize | None = None,
) -> StepInputs:
    """Index a batch: de-duplicate its texts, tokenize each once, and lay out the columns."""
    rows: dict[Key, int] = {}

    def row(key: Key) -> int:
        return rows.setdefault(key, len(rows))

    query_rows = [
        row(("query", q) if p is None else (None, p + q))
        for q, p in zip(batch.queries, batch.prompts, strict=True)
    ]
    positive_rows = [row(("passage", text)) for text in batch.positives]
    negative_rows = [row(("passage", text)) for group in batch.negatives for text in group]
    keys = list(rows)
    ids, truncated = _tokenize(keys, tokenize)

    masked: list[tuple[int, int]] = []
    if mask_duplicates:
        columns: dict[int, int] = {}
        for r in positive_rows + negative_rows:
            columns.setdefault(r, len(columns))
        column_rows = list(columns)
        positive_columns = [columns[r] for r in positive_rows]
        negative_columns = [columns[r] for r in negative_rows]
        # Queries with the same text share their positives: none is another's negative.
        known: dict[int, set[int]] = {}
        for q, c in zip(query_rows, positive_columns, strict=True):
            known.setdefault(q, set()).add(c)
        for i, (q, c) in enumerate(zip(query_rows, positive_columns, strict=True)):
            masked.extend((i, other) for other in sorted(known[q]) if other != c)
    else:
        column_rows = positive_rows + negative_rows
        positive_columns = list(range(len(positive_rows)))
        negative_columns = list(range(len(positive_rows), len(column_rows)))

    pairs = torch.tensor(masked, dtype=torch.long).reshape(-1, 2)
    teacher_columns, teacher_scores = _teacher(batch, positive_columns, negative_columns)
    return StepInputs(
        keys=keys,
        ids=ids,
        query_rows=torch.tensor(query_rows, dtype=torch.long),
        column_rows=torch.tensor(column_rows, dtype=torch.long),
        positive_columns=torch.tensor(positive_columns, dtype=torch.long),
        masked_queries=pairs[:, 0].contiguous(),
        masked_columns=pairs[:, 1].contiguous(),
        n_texts=len(query_rows) + len(positive_rows) + len(negative_rows),
        truncated=truncated,
        guide_ids=_tokenize(keys, guide_tokenize)[0] if guide_tokenize else None,
        origins=list(batch.origins),
        teacher_columns=teacher_columns,
        teacher_scores=teacher_scores,
    )


def _teacher(
    batch: Batch, positive_columns: list[int], negative_columns: list[int]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(N, K) slot columns and teacher scores, or (None, None) when no slot has a score."""
    if not batch.teacher_scores:
        return None, None
    scores = torch.tensor(batch.teacher_scores, dtype=torch.float32)
    if not torch.isfinite(scores).any():
        return None, None
    slots = iter(negative_columns)
    columns = [
        [positive, *(next(slots) for _ in group)]
        for positive, group in zip(positive_columns, batch.negatives, strict=True)
    ]
    slot_columns = torch.tensor(columns, dtype=torch.long)
    if slot_columns.shape != scores.shape:
        raise ValueError(
            f"teacher scores of shape {tuple(scores.shape)} for slots {tuple(slot_columns.shape)}"
        )
    return slot_columns, scores


def _tokenize(keys: list[Key], tokenize: Tokenize) -> tuple[list[list[int]], int]:
    """Token ids of each key, tokenizing each kind in one call."""
    ids: list[list[int]] = [[] for _ in keys]
    truncated = 0
    for kind in ("query", "passage", None):
        where = [i for i, (k, _) in enumerate(keys) if k == kind]
        if where:
            rows, cut = tokenize([keys[i][1] for i in where], kind)
            truncated += cut
            for i, tokens in zip(where, rows, strict=True):
                ids[i] = tokens
    return ids, truncated
