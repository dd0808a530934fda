"""Training data: FlagEmbedding-style JSONL read lazily, batched per source, resumable exactly.

Each line is ``{"query": str, "pos": [str, ...], "neg": [str, ...]}`` plus optional ``task``,
``source`` and ``prompt`` strings. ``prompt``, when present, replaces the model's query
instruction for that line. Lines without ``source`` form one source per file (named by path).
``pos_scores`` and ``neg_scores`` (FlagEmbedding's names), given together, are a teacher's raw
scores of each ``pos`` and ``neg`` text, in order, for distillation (distill_loss.py).

How it scales. Building the index streams every file once, validates every line and keeps only
a 16-byte entry per line ((file, byte offset) and the line number), spilled to a temporary
file and memory-mapped, so resident memory does not grow with the data: 100M lines make a
1.6 GB index on disk that the OS pages in as needed. Texts are read with a seek when a batch
needs them. Each source's order in an epoch is a keyed pseudo-random permutation computed on
the fly (a Feistel network), not a stored array, so the data position is a few integers per
source: (epoch, cursor). The batch of step t is a pure function of the seed, t and that
position, which makes resume exact.

Batches. Every batch comes from one source, drawn with probability proportional to
``size * source_weights.get(source, 1)``. With ``mix_general`` > 0, a batch drawn from any
other source than ``general_sources`` gives that share of its lines to one general source
(drawn the same way among them), so that the in-domain training keeps seeing general data.
Each query gets one positive, drawn from ``pos``, and exactly ``hard_negatives`` negatives:
drawn from ``neg`` without replacement, and, when ``neg`` is short, filled with positives of
other random lines of the line's own source (never a text equal to the query or one of its
positives, nor from a line with the same query text, whose positives are this query's too).
The teacher's scores follow the texts drawn; a filled-in negative has none (NaN).
"""

from __future__ import annotations

import logging
import math
import tempfile
from array import array
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

from peg_rag.core.records import (
    DataError,
    FileLine,
    Skipped,
    decode_line,
    text_field,
    text_list_field,
)

logger = logging.getLogger("peg_rag")
T = TypeVar("T")
_OFFSET_BITS = 40  # files up to 1 TiB; the file number goes in the bits above
_FILL_TRIES = 50


@dataclass(frozen=True)
class Example:
    """One validated training line."""

    query: str
    pos: list[str]
    neg: list[str]
    source: str | None = None
    task: str | None = None
    prompt: str | None = None
    pos_scores: list[float] | None = None  # a teacher's score of each pos text
    neg_scores: list[float] | None = None  # and of each neg text; both or neither


def _optional_string(record: dict[str, Any], name: str, where: FileLine) -> str | None:
    value = record.get(name)
    if value is not None and not isinstance(value, str):
        raise DataError(where, f"expected a string, got {type(value).__name__}", name)
    return value


def _scores(
    record: dict[str, Any], name: str, texts: list[str], of: str, where: FileLine
) -> list[float] | None:
    """An optional list of finite numbers, one per text of field ``of``."""
    value = record.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise DataError(where, f"expected a list of numbers, got {type(value).__name__}", name)
    numbers = []
    for i, item in enumerate(value):
        number = float("nan")
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            try:
                number = float(item)
            except OverflowError:  # an integer beyond float range
                pass
        if not math.isfinite(number):
            raise DataError(where, f"item {i} is not a finite number: {item!r}", name)
        numbers.append(number)
    if len(numbers) != len(texts):
        raise DataError(
            where, f"has {len(numbers)} scores for the {len(texts)} texts of {of!r}", name
        )
    return numbers


def parse_example(record: dict[str, Any], where: FileLine) -> Example:
    """Validate a training record; raise DataError naming the field otherwise."""
    source = _optional_string(record, "source", where)
    if source is not None and not source.strip():
        raise DataError(where, "empty source name", "source")
    query = text_field(record, "query", where)
    pos = text_list_field(record, "pos", where, min_items=1)
    neg = text_list_field(record, "neg", where)
    pos_scores = _scores(record, "pos_scores", pos, "pos", where)
    neg_scores = _scores(record, "neg_scores", neg, "neg", where)
    if (pos_scores is None) != (neg_scores is None):
        missing = "neg_scores" if neg_scores is None else "pos_scores"
        raise DataError(where, "teacher scores need both pos_scores and neg_scores", missing)
    return Example(
        query=query,
        pos=pos,
        neg=neg,
        source=source,
        task=_optional_string(record, "task", where),
        prompt=_optional_string(record, "prompt", where),
        pos_scores=pos_scores,
        neg_scores=neg_scores,
    )


def find_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (searched recursively for ``*.jsonl``) into a file list."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
            if not found:
                raise ValueError(f"{path}: folder holds no .jsonl files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    return files


def permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """Position ``index`` of a keyed pseudo-random permutation of ``range(n)``, in O(1) memory.

    A 4-round Feistel network is a bijection on [0, 2**bits); applying it again to values that
    land outside [0, n) ("cycle walking") restricts it to a bijection on [0, n).
    """
    if n <= 1:
        return np.zeros(len(index), dtype=np.int64)
    bits = max((n - 1).bit_length(), 2)
    bits += bits % 2
    half = np.uint64(bits // 2)
    low = np.uint64((1 << (bits // 2)) - 1)
    keys = np.random.SeedSequence(key).generate_state(4, dtype=np.uint64)
    values = np.asarray(index, dtype=np.uint64).copy()
    todo = np.arange(len(values))
    while len(todo):
        x = values[todo]
        for round_key in keys:
            left, right = x >> half, x & low
            x = (right << half) | (left ^ (_mix(right ^ round_key) & low))
        values[todo] = x
        todo = todo[x >= n]
    return values.astype(np.int64)


def _mix(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: a cheap, well-mixing hash of uint64 values."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class LineIndex:
    """Where every valid line is, grouped by source; the lines themselves stay on disk.

    Entry ``j`` of a source is ``(file << 40 | byte offset, line number)`` of its j-th line.
    """

    def __init__(self, files: Sequence[Path], *, skip_bad_lines: bool = False) -> None:
        self.files = list(files)
        self.skipped = Skipped()
        self._dir = tempfile.TemporaryDirectory(prefix="peg-rag-index-")
        spill: dict[str, array] = {}  # per source, entries not yet written to its spill file
        counts: dict[str, int] = {}
        for number, path in enumerate(self.files):
            for source, offset, line in self._scan(path, skip_bad_lines):
                if source not in spill:
                    spill[source] = array("q")
                    counts[source] = 0
                spill[source].extend((number << _OFFSET_BITS | offset, line))
                counts[source] += 1
                if len(spill[source]) >= 1 << 16:
                    self._flush(list(spill).index(source), spill[source])
        for number, entries in enumerate(spill.values()):
            self._flush(number, entries)
        self.skipped.report()
        if not counts:
            raise ValueError(f"no valid training lines in {', '.join(map(str, self.files))}")
        first_seen = list(spill)
        self.sources = sorted(counts)
        self.sizes = [counts[s] for s in self.sources]
        self._entries = [
            np.memmap(
                self._spill_path(first_seen.index(s)),
                dtype=np.int64,
                mode="r",
                shape=(counts[s], 2),
            )
            for s in self.sources
        ]
        self._handles: dict[int, BinaryIO] = {}

    def _spill_path(self, number: int) -> Path:
        return Path(self._dir.name) / f"source-{number}.bin"

    def _flush(self, number: int, entries: array) -> None:
        with self._spill_path(number).open("ab") as handle:
            entries.tofile(handle)
        del entries[:]

    def _scan(self, path: Path, skip_bad_lines: bool) -> Iterator[tuple[str, int, int]]:
        """(source, byte offset, line number) of each valid line of ``path``."""
        if path.stat().st_size >= 1 << _OFFSET_BITS:
            raise ValueError(f"{path}: files over 1 TiB are not supported; split it")
        offset = 0
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                where = FileLine(path, number)
                try:
                    example = parse_example(decode_line(line, where), where)
                except DataError as error:
                    if not skip_bad_lines:
                        raise
                    self.skipped.add(error)
                    continue
                yield example.source or str(path), start, number

    def origin(self, source: int, line: int) -> FileLine:
        """The file and 1-based line number of line ``line`` of source ``source``: a stable
        identifier of a training line."""
        packed, number = (int(value) for value in self._entries[source][line])
        return FileLine(self.files[packed >> _OFFSET_BITS], number)

    def example(self, source: int, line: int) -> Example:
        """Read line ``line`` (0-based, counting the source's valid lines) of source ``source``."""
        packed = int(self._entries[source][line][0])
        number, offset = packed >> _OFFSET_BITS, packed & ((1 << _OFFSET_BITS) - 1)
        handle = self._handles.get(number)
        if handle is None:
            handle = self._handles[number] = self.files[number].open("rb")
        handle.seek(offset)
        where = self.origin(source, line)
        try:
            return parse_example(decode_line(handle.readline(), where), where)
        except DataError:
            raise ValueError(
                f"{where}: the line changed after the data was indexed; do not edit training "
                "files while training"
            ) from None

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._entries.clear()
        self._dir.cleanup()


@dataclass
class Batch:
    """One global batch of texts, all from one source (but the mixed-in general lines)."""

    source: str
    queries: list[str]
    prompts: list[str | None]
    positives: list[str]
    negatives: list[list[str]]
    lines: list[int]  # line numbers within each line's source, for tracing the data order
    origins: list[FileLine] = field(default_factory=list)  # each query's file and line
    # Per query: the teacher's score of its positive, then of each of its negatives; NaN
    # where there is none (a line without scores, a filled-in negative). Empty: no scores.
    teacher_scores: list[list[float]] = field(default_factory=list)


def _teacher_scores(example: Example, pick: int, taken: list[int], negatives: int) -> list[float]:
    """The teacher's scores of ``pos[pick]`` and of ``neg[taken]``, NaN-padded to
    1 + ``negatives`` (fills); all NaN for a line without scores."""
    if example.pos_scores is None or example.neg_scores is None:
        return [math.nan] * (1 + negatives)
    scores = [example.pos_scores[pick], *(example.neg_scores[i] for i in taken)]
    return scores + [math.nan] * (1 + negatives - len(scores))


class TrainData:
    """Per-source batches with sampled negatives; ``state`` is the exact data position."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        batch_size: int,
        hard_negatives: int,
        seed: int,
        source_weights: dict[str, float] | None = None,
        skip_bad_lines: bool = False,
        general_sources: Sequence[str] = (),
        mix_general: float = 0.0,
    ) -> None:
        self.index = LineIndex(find_files(paths), skip_bad_lines=skip_bad_lines)
        self.batch_size = batch_size
        self.hard_negatives = hard_negatives
        self.seed = seed
        weights = dict(source_weights or {})
        for name, given in (("source_weights", weights), ("general_sources", general_sources)):
            unknown = sorted(set(given) - set(self.index.sources))
            if unknown:
                raise ValueError(
                    f"{name} names unknown source(s) {', '.join(unknown)}; "
                    f"the data has {', '.join(self.index.sources)}"
                )
        named = zip(self.index.sources, self.index.sizes, strict=True)
        mass = np.array([size * weights.get(name, 1.0) for name, size in named])
        self.probabilities = mass / mass.sum()
        self.general = [self.index.sources.index(name) for name in general_sources]
        self.mixed = round(mix_general * batch_size) if self.general else 0
        general_mass = mass[self.general]
        self.general_probabilities = general_mass / general_mass.sum() if self.general else mass[:0]
        for source, size in zip(self.index.sources, self.index.sizes, strict=True):
            if size < batch_size:
                logger.warning(
                    "source %s has %d lines, fewer than batch_size=%d: its batches repeat lines",
                    source,
                    size,
                    batch_size,
                )

    @property
    def total_lines(self) -> int:
        return sum(self.index.sizes)

    def initial_state(self) -> dict[str, Any]:
        return {
            "step": 0,
            "epoch": [0] * len(self.index.sources),
            "cursor": [0] * len(self.index.sources),
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Reject a saved position that does not belong to this data."""
        count = len(self.index.sources)
        if len(state.get("epoch", [])) != count or len(state.get("cursor", [])) != count:
            raise ValueError(
                "the checkpoint's data position does not match the training data "
                f"({count} sources now); resume with the same --train paths"
            )

    def batch(self, state: dict[str, Any]) -> tuple[Batch, dict[str, Any]]:
        """The batch at ``state`` and the state after it; pure, so resume replays exactly."""
        rng = np.random.default_rng([self.seed, state["step"]])
        source = int(rng.choice(len(self.index.sources), p=self.probabilities))
        after = {
            "step": state["step"] + 1,
            "epoch": list(state["epoch"]),
            "cursor": list(state["cursor"]),
        }
        parts = [(source, self.batch_size)]
        if self.mixed and source not in self.general:
            general = self.general[int(rng.choice(len(self.general), p=self.general_probabilities))]
            parts = [(source, self.batch_size - self.mixed), (general, self.mixed)]
        batch = Batch(self.index.sources[source], [], [], [], [], [])
        for part, count in parts:
            for line in self._take(part, count, after):
                example = self.index.example(part, line)
                batch.lines.append(line)
                batch.queries.append(example.query)
                batch.prompts.append(example.prompt)
                pick = int(rng.integers(len(example.pos)))
                batch.positives.append(example.pos[pick])
                texts, taken = self._negatives(example, part, line, rng)
                batch.negatives.append(texts)
                batch.origins.append(self.index.origin(part, line))
                batch.teacher_scores.append(_teacher_scores(example, pick, taken, len(texts)))
        return batch, after

    def _take(self, source: int, count: int, after: dict[str, Any]) -> list[int]:
        """The next ``count`` lines of ``source`` in its epochs' permuted orders; advances the
        source's position in ``after``."""
        size = self.index.sizes[source]
        epoch, cursor = after["epoch"][source], after["cursor"][source]
        absolute = cursor + np.arange(count)
        epochs = epoch + absolute // size
        lines = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs):
            where = epochs == e
            lines[where] = permute(absolute[where] % size, size, self._key(source, int(e)))
        after["epoch"][source] = epoch + (cursor + count) // size
        after["cursor"][source] = (cursor + count) % size
        return lines.tolist()

    def _key(self, source: int, epoch: int) -> int:
        return int(np.random.SeedSequence([self.seed, source, epoch]).generate_state(1)[0])

    def _negatives(
        self, example: Example, source: int, line: int, rng: np.random.Generator
    ) -> tuple[list[str], list[int]]:
        """``hard_negatives`` texts, and the indices in ``neg`` of those drawn from it (the
        first ones; the rest are filled in from other lines)."""
        wanted = self.hard_negatives
        if len(example.neg) >= wanted:
            taken = rng.choice(len(example.neg), wanted, replace=False).tolist()
            return [example.neg[i] for i in taken], taken
        chosen = list(example.neg)
        taken = list(range(len(chosen)))
        banned = {example.query, *example.pos, *chosen}
        size = self.index.sizes[source]
        for _ in range(_FILL_TRIES * wanted):
            if len(chosen) == wanted:
                return chosen, taken
            other = int(rng.integers(size))
            if other == line:
                continue
            filler = self.index.example(source, other)
            if filler.query.strip() == example.query.strip():
                continue  # one line per (query, positive) pair: a positive of this query
            text = filler.pos[int(rng.integers(len(filler.pos)))]
            if text not in banned:
                chosen.append(text)
                banned.add(text)
        if len(chosen) == wanted:
            return chosen, taken
        raise ValueError(
            f"source {self.index.sources[source]} has too few distinct texts to fill "
            f"{wanted} hard negatives for query {example.query!r}; lower hard_negatives"
        )

    def batches(
        self, state: dict[str, Any], prepare: Callable[[Batch], T]
    ) -> Generator[tuple[T, Batch, dict[str, Any]], None, None]:
        """Endless ``(prepare(batch), batch, state_after)``, one batch built ahead in a thread."""

        def build(at: dict[str, Any]) -> tuple[T, Batch, dict[str, Any]]:
            batch, after = self.batch(at)
            return prepare(batch), batch, after

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="peg-rag-data") as pool:
            pending = pool.submit(build, state)
            while True:
                prepared, batch, after = pending.result()
                pending = pool.submit(build, after)
                yield prepared, batch, after

    def close(self) -> None:
        self.index.close()
