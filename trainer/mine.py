"""Hard-negative mining: fill each training line's ``neg`` with texts the model ranks high.

For every query the candidate pool is searched exactly (trainer.topk) and ``negatives`` texts
are sampled from ranks ``[range_min, range_max)``, counted from 0 as FlagEmbedding's
``hn_mine`` does, so the default 10..100 leaves out the ten best candidates, where
unlabelled positives crowd. Within that window a candidate is skipped when its text equals
the query or one of the line's positives, or when it scores above ``max_score_ratio`` times
the line's lowest positive score: a candidate the model likes nearly as much as a true
positive is more likely an unlabelled positive than a negative (the "TopK-PercPos" guard
of NV-Retriever).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from peg_rag.core.beir import corpus_text
from peg_rag.core.encoding import Encoder
from peg_rag.core.files import atomic_writer
from peg_rag.core.records import FileLine, read_jsonl
from peg_rag.retrieval.topk import top_k

from .data import Example, parse_example
from .mine_options import MiningOptions

DEFAULT_OPTIONS = MiningOptions()

__all__ = ["MiningOptions", "MiningStats", "check_output", "mine_file", "mine_negatives"]


@dataclass
class MiningStats:
    """What mining did, for the summary line."""

    lines: int = 0
    pool: int = 0
    negatives: int = 0
    short_lines: int = 0  # lines that got fewer than ``negatives``
    skipped_equal: int = 0  # window candidates equal to the query or a positive
    skipped_score: int = 0  # window candidates above the score-ratio guard

    def summary(self) -> str:
        return (
            f"{self.negatives} negatives for {self.lines} lines from a pool of {self.pool} "
            f"texts; {self.short_lines} lines got fewer than asked; skipped "
            f"{self.skipped_equal} candidates equal to a positive or the query and "
            f"{self.skipped_score} above the score-ratio guard"
        )


def unique(texts) -> list[str]:
    """Texts without repeats, in first-seen order."""
    return list(dict.fromkeys(texts))


def own_pool(examples: Sequence[Example]) -> list[str]:
    """The candidate pool made of the file's own positive and negative texts."""
    return unique(text for e in examples for text in [*e.pos, *e.neg])


def read_corpus(paths: Sequence[str | Path]) -> list[str]:
    """Unique texts of JSONL corpora (``text``, optional ``title``) or BEIR folders."""
    texts: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            path = path / "corpus.jsonl"
        texts.extend(read_jsonl(path, corpus_text))
    return unique(texts)


def encode_queries(encoder: Encoder, examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of the distinct queries and each example's row among them.

    A line's ``prompt`` replaces the model's query prompt, as the trainer does.
    """
    keys = list(dict.fromkeys((e.prompt, e.query) for e in examples))
    row = {key: i for i, key in enumerate(keys)}
    vectors = np.empty((len(keys), encoder.dim), dtype=np.float32)
    plain = [i for i, (prompt, _) in enumerate(keys) if prompt is None]
    prompted = [i for i, (prompt, _) in enumerate(keys) if prompt is not None]
    if plain:
        vectors[plain] = encoder.encode([keys[i][1] for i in plain], "query")
    if prompted:
        vectors[prompted] = encoder.encode([f"{keys[i][0]}{keys[i][1]}" for i in prompted], None)
    return vectors, np.array([row[(e.prompt, e.query)] for e in examples], dtype=np.int64)


def positive_scores(
    encoder: Encoder,
    examples: Sequence[Example],
    query_vectors: np.ndarray,
    query_rows: np.ndarray,
    pool: Sequence[str],
    pool_vectors: np.ndarray,
) -> np.ndarray:
    """Each line's lowest query-positive score; positives outside the pool are encoded."""
    row = {text: i for i, text in enumerate(pool)}
    missing = unique(p for e in examples for p in e.pos if p not in row)
    extra = dict(zip(missing, encoder.encode(missing, "passage"), strict=True)) if missing else {}

    def vector(text: str) -> np.ndarray:
        return pool_vectors[row[text]] if text in row else extra[text]

    return np.array(
        [
            min(float(vector(p) @ query_vectors[r]) for p in e.pos)
            for e, r in zip(examples, query_rows, strict=True)
        ],
        dtype=np.float32,
    )


def choose_negatives(
    examples: Sequence[Example],
    query_rows: np.ndarray,
    scores: np.ndarray,
    ranked: np.ndarray,
    positive: np.ndarray,
    pool: Sequence[str],
    options: MiningOptions,
    stats: MiningStats,
    *,
    show_progress_bar: bool = False,
) -> list[list[str]]:
    """Sample each line's negatives from its query's ranked window (see the module doc).

    ``scores``/``ranked`` are the top-k of each distinct query (rows of ``query_rows``).
    Each line draws from its own generator seeded by (seed, line index), so a line's
    negatives do not depend on the other lines.
    """
    chosen: list[list[str]] = []
    window = slice(options.range_min, options.range_max)
    lines = tqdm(examples, desc="Sampling", unit="line", disable=not show_progress_bar)
    for number, (example, row) in enumerate(zip(lines, query_rows, strict=True)):
        excluded = {example.query.strip(), *(p.strip() for p in example.pos)}
        ceiling = options.max_score_ratio * positive[number]
        eligible = []
        for score, index in zip(scores[row, window], ranked[row, window], strict=True):
            if pool[index].strip() in excluded:
                stats.skipped_equal += 1
            elif score > ceiling:
                stats.skipped_score += 1
            else:
                eligible.append(int(index))
        take = min(options.negatives, len(eligible))
        rng = np.random.default_rng([options.seed, number])
        picks = np.sort(rng.choice(len(eligible), size=take, replace=False))
        chosen.append([pool[eligible[i]] for i in picks])
        stats.negatives += take
        stats.short_lines += take < options.negatives
    return chosen


def mine_negatives(
    encoder: Encoder,
    examples: Sequence[Example],
    pool: Sequence[str],
    options: MiningOptions = DEFAULT_OPTIONS,
    *,
    show_progress_bar: bool = False,
) -> tuple[list[list[str]], MiningStats]:
    """Mine hard negatives for each example from ``pool`` (distinct texts) with ``encoder``.

    Queries are encoded as queries (or with the line's prompt), the pool as passages.
    Returns one list of negatives per example, in rank order, and the statistics.
    """
    stats = MiningStats(lines=len(examples), pool=len(pool))
    query_vectors, query_rows = encode_queries(encoder, examples)
    pool_vectors = encoder.encode(list(pool), "passage")
    positive = positive_scores(encoder, examples, query_vectors, query_rows, pool, pool_vectors)
    scores, ranked = top_k(
        query_vectors, pool_vectors, options.range_max, show_progress_bar=show_progress_bar
    )
    chosen = choose_negatives(
        examples,
        query_rows,
        scores,
        ranked,
        positive,
        pool,
        options,
        stats,
        show_progress_bar=show_progress_bar,
    )
    return chosen, stats


def check_output(source: Path, target: Path, *, overwrite: bool) -> None:
    """Refuse to write onto the input (even with ``overwrite``) or onto an existing file."""
    if target.resolve() == source.resolve() or (
        target.exists() and source.exists() and os.path.samefile(source, target)
    ):
        raise ValueError(f"refusing to overwrite the input {source}; name another output")
    if target.exists() and not overwrite:
        raise ValueError(f"{target} exists; pass --overwrite to replace it")


def mine_file(
    encoder: Encoder,
    source: str | Path,
    target: str | Path,
    *,
    corpus: Sequence[str | Path] = (),
    options: MiningOptions = DEFAULT_OPTIONS,
    overwrite: bool = False,
    show_progress_bar: bool = False,
) -> MiningStats:
    """Write a copy of the training JSONL ``source`` to ``target`` with mined ``neg`` lists.

    The pool is the texts of ``corpus`` files/folders, else the file's own texts. Every
    other field of a line (``task``, ``source``, ``prompt``, ...) is kept as it was; the
    existing ``neg`` is replaced. ``target`` must differ from ``source`` and, unless
    ``overwrite``, must not exist; it appears only once complete.
    """
    source, target = Path(source), Path(target)
    check_output(source, target, overwrite=overwrite)

    def parse(record: dict[str, Any], where: FileLine) -> tuple[dict[str, Any], Example]:
        return record, parse_example(record, where)

    lines = list(read_jsonl(source, parse))
    if not lines:
        raise ValueError(f"{source} holds no training lines")
    examples = [example for _, example in lines]
    pool = read_corpus(corpus) if corpus else own_pool(examples)
    chosen, stats = mine_negatives(
        encoder, examples, pool, options, show_progress_bar=show_progress_bar
    )
    with atomic_writer(target) as handle:
        for (record, _), negatives in zip(lines, chosen, strict=True):
            handle.write(json.dumps({**record, "neg": negatives}, ensure_ascii=False) + "\n")
    return stats
