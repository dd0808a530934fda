"""Teacher scores: a cross-encoder's judgement of every pair of a training JSONL, for
distillation.

Each line ``{"query", "pos", "neg", ...}`` gains ``pos_scores`` and ``neg_scores`` (the
field names FlagEmbedding's distillation reads): one score per text of ``pos`` and of
``neg``, in the same order, for the pair (``query``, text). The line's ``prompt`` is not
shown to the reranker, as in reranker training. The scores are the reranker's raw logits,
not sigmoids: a distilling student turns a line's teacher scores into a target distribution
with a temperature softmax, ``softmax(s / T)``, which needs the logits (sigmoids would
squash their differences, and softmax already discards their common level). Every other
field is kept as it was; existing score fields are replaced.

Resuming. The output is built in ``OUT.partial``: each chunk of lines is scored, appended
and fsynced, so a run killed at any point (kill -9 included) leaves complete lines there,
and at worst a torn last line, which the next run cuts off. The next run checks that the
partial lines are the input's first lines (every field but the scores), skips them, and
goes on; once every line is written, the partial file is renamed onto ``OUT``, so ``OUT``
is never incomplete. Resuming assumes the same reranker: to start over with another,
delete ``OUT.partial``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tqdm.auto import tqdm

from peg_rag.core.records import FileLine, decode_line, read_jsonl

from .data import Example, parse_example
from .mine import SCORE_FIELDS, check_output, without_scores

if TYPE_CHECKING:
    from peg_rag.core.reranker import Reranker

logger = logging.getLogger("peg_rag")

PARTIAL_SUFFIX = ".partial"
DEFAULT_CHUNK_LINES = 512  # lines per reranker call and per fsync: what a kill can cost
Line = tuple[dict[str, Any], FileLine, Example]  # a record, where it is, and its validation

__all__ = ["ScoreStats", "partial_path", "score_file", "score_lines"]


@dataclass
class ScoreStats:
    """What scoring did, for the summary line."""

    lines: int = 0  # lines in the output
    resumed: int = 0  # of those, scored by an earlier, interrupted run
    pairs: int = 0  # pairs this run scored

    def summary(self) -> str:
        text = f"{self.lines} lines; scored {self.pairs} (query, passage) pairs"
        return text + (
            f"; {self.resumed} lines kept from an interrupted run" if self.resumed else ""
        )


def score_lines(
    reranker: Reranker, examples: Sequence[Example], *, batch_size: int | None = None
) -> list[tuple[list[float], list[float]]]:
    """The raw logits of each example's positives and of its negatives, in their order.

    All pairs go to the reranker in one call, which sorts them by length into batches.
    """
    pairs = [(e.query, text) for e in examples for text in (*e.pos, *e.neg)]
    logits = reranker.score_pairs(pairs, batch_size=batch_size, show_progress_bar=False).tolist()
    scores = []
    start = 0
    for e in examples:
        middle, end = start + len(e.pos), start + len(e.pos) + len(e.neg)
        scores.append((logits[start:middle], logits[middle:end]))
        start = end
    return scores


def partial_path(target: Path) -> Path:
    """Where ``score_file`` builds ``target``: ``OUT.partial`` next to it."""
    return target.with_name(target.name + PARTIAL_SUFFIX)


def complete_lines(partial: Path) -> int:
    """The number of complete lines of ``partial`` (0 when absent), after cutting off a torn
    last line that a killed run left."""
    if not partial.exists():
        return 0
    count = end = 0
    with partial.open("rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break
            count += 1
            end += len(line)
    if end < partial.stat().st_size:
        os.truncate(partial, end)
        logger.info("cut a torn last line off %s", partial)
    return count


def check_resumed(done: bytes, line: FileLine, record: dict[str, Any], source: FileLine) -> None:
    """Refuse to resume from a partial line that is not ``record`` with its scores."""
    scored = decode_line(done, line)
    if without_scores(scored) != without_scores(record) or any(
        not isinstance(scored.get(name), list) or len(scored[name]) != len(record.get(field, []))
        for name, field in zip(SCORE_FIELDS, ("pos", "neg"), strict=True)
    ):
        raise ValueError(
            f"{line} is not {source} with its scores: the partial output comes from other "
            f"input; delete {line.path} to start over"
        )


def count_lines(path: Path) -> int:
    """Non-blank lines of ``path`` (the progress bar's total)."""
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def score_file(
    reranker: Reranker,
    source: str | Path,
    target: str | Path,
    *,
    overwrite: bool = False,
    batch_size: int | None = None,
    chunk_lines: int = DEFAULT_CHUNK_LINES,
    show_progress_bar: bool = False,
) -> ScoreStats:
    """Write a copy of the training JSONL ``source`` to ``target`` with teacher scores.

    See the module doc for the fields and for resuming: an interrupted call leaves
    ``target.partial``, which the next call with the same input continues. ``target`` must
    differ from ``source`` and, unless ``overwrite``, must not exist; it appears only once
    complete. Lines are validated as the trainer does; a bad one raises ``DataError`` naming
    its file, line and field.
    """
    source, target = Path(source), Path(target)
    partial = partial_path(target)
    check_output(source, target, overwrite=overwrite)
    check_output(source, partial, overwrite=True)
    if chunk_lines < 1:
        raise ValueError(f"chunk_lines must be >= 1, got {chunk_lines}")
    total = count_lines(source)
    if not total:
        raise ValueError(f"{source} holds no training lines")
    stats = ScoreStats(resumed=complete_lines(partial))
    if stats.resumed:
        logger.info("resuming %s: %d of %d lines already scored", partial, stats.resumed, total)

    def parse(record: dict[str, Any], where: FileLine) -> Line:
        return record, where, parse_example(record, where)

    lines = read_jsonl(source, parse)
    if stats.resumed:
        with partial.open("rb") as done:
            for number, (record, where, _) in enumerate(islice(lines, stats.resumed), start=1):
                check_resumed(next(done), FileLine(partial, number), record, where)
                stats.lines += 1
    if stats.lines < stats.resumed:
        raise ValueError(
            f"{partial} has {stats.resumed} lines but {source} only {stats.lines}: the partial "
            f"output comes from other input; delete it to start over"
        )
    bar = tqdm(
        total=total,
        initial=stats.resumed,
        desc="Scoring",
        unit="line",
        disable=not show_progress_bar,
    )
    with partial.open("a", encoding="utf-8") as handle, bar:
        for chunk in chunks(lines, chunk_lines):
            stats.pairs += append_scored(reranker, chunk, handle, batch_size)
            stats.lines += len(chunk)
            bar.update(len(chunk))
    os.replace(partial, target)
    return stats


def chunks(lines: Iterator[Line], size: int) -> Iterator[list[Line]]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    while chunk := list(islice(lines, size)):
        yield chunk


def append_scored(
    reranker: Reranker,
    chunk: Sequence[Line],
    handle: IO[str],
    batch_size: int | None,
) -> int:
    """Score a chunk of lines, append them to ``handle`` and fsync; the pairs scored."""
    examples = [example for _, _, example in chunk]
    scores = score_lines(reranker, examples, batch_size=batch_size)
    handle.write(
        "".join(
            json.dumps({**record, "pos_scores": pos, "neg_scores": neg}, ensure_ascii=False) + "\n"
            for (record, _, _), (pos, neg) in zip(chunk, scores, strict=True)
        )
    )
    handle.flush()
    os.fsync(handle.fileno())
    return sum(len(e.pos) + len(e.neg) for e in examples)
