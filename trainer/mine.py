"""Hard-negative mining: fill each training line's ``neg`` with texts the model ranks high.

For every query the candidate pool is searched exactly (trainer.topk) and ``negatives`` texts
are sampled from ranks ``[range_min, range_max)``, counted from 0 as FlagEmbedding's
``hn_mine`` does, so the default 10..100 leaves out the ten best candidates, where
unlabelled positives crowd. Within that window a candidate is skipped when its text equals
the query or a known positive of it (the line's own positives and those of every other line
with the same query text: data with one line per (query, positive) pair would otherwise
teach a query's second relevant passage as a negative of its first), or when it scores
above ``max_score_ratio`` times the line's lowest positive score: a candidate the model
likes nearly as much as a true positive is more likely an unlabelled positive than a
negative (the "TopK-PercPos" guard of NV-Retriever).

With a reranker (a cross-encoder, a better judge than the embedder) a second guard checks
the candidates actually sampled, never the whole window: each line draws its candidates,
the reranker scores them (many lines per call), candidates it judges relevant are dropped
(the rule is in ``MiningOptions``: a sigmoid threshold, or a margin below the line's weakest
positive) and replaced by further draws from the line's remaining candidates, until the
line has ``negatives`` of them or none are left. The reranker reads the line's query
without its ``prompt``, as reranker training does. A reranker that drops nothing gives the
same negatives as no reranker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from peg_rag.core.beir import corpus_text
from peg_rag.core.encoding import Encoder
from peg_rag.core.files import atomic_writer
from peg_rag.core.records import FileLine, read_jsonl
from peg_rag.retrieval.topk import top_k

from .data import Example, parse_example
from .mine_options import MiningOptions

if TYPE_CHECKING:
    from peg_rag.core.reranker import Reranker

DEFAULT_OPTIONS = MiningOptions()
RERANK_LINES = 256  # lines whose sampled candidates share one reranker call
SCORE_FIELDS = ("pos_scores", "neg_scores")  # teacher scores (trainer.teacher), one per text

__all__ = ["MiningOptions", "MiningStats", "check_output", "mine_file", "mine_negatives"]


@dataclass
class MiningStats:
    """What mining did, for the summary line."""

    lines: int = 0
    pool: int = 0
    negatives: int = 0
    short_lines: int = 0  # lines that got fewer than ``negatives``
    skipped_equal: int = 0  # window candidates equal to the query or a known positive of it
    skipped_score: int = 0  # window candidates above the score-ratio guard
    reranker_scored: int = 0  # sampled candidates the reranker scored
    skipped_reranker: int = 0  # of those, dropped as relevant

    def summary(self) -> str:
        text = (
            f"{self.negatives} negatives for {self.lines} lines from a pool of {self.pool} "
            f"texts; {self.short_lines} lines got fewer than asked; skipped "
            f"{self.skipped_equal} candidates equal to the query or a known positive and "
            f"{self.skipped_score} above the score-ratio guard"
        )
        if self.reranker_scored:
            text += (
                f"; the reranker scored {self.reranker_scored} sampled candidates and dropped "
                f"{self.skipped_reranker} as relevant"
            )
        return text


@dataclass
class Draw:
    """One line's sampling: its eligible candidates and those drawn and kept so far."""

    query: str
    positives: list[str]
    eligible: list[int]  # pool rows, in rank order
    rng: np.random.Generator
    left: list[int]  # positions in ``eligible`` not drawn yet
    kept: list[int] = field(default_factory=list)  # positions drawn and kept
    lowest: float = 0.0  # sigmoid of the reranker's score of the weakest positive

    def draw(self, size: int) -> list[int]:
        """Draw ``size`` positions (fewer if fewer are left) without replacement."""
        taken = self.rng.choice(len(self.left), size=min(size, len(self.left)), replace=False)
        drawn = {int(i) for i in taken}
        picked = [self.left[i] for i in sorted(drawn)]
        self.left = [p for i, p in enumerate(self.left) if i not in drawn]
        return picked


def without_scores(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without its teacher scores."""
    return {k: v for k, v in record.items() if k not in SCORE_FIELDS}


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


def reranker_drops(
    probabilities: np.ndarray, lowest_positive: float, options: MiningOptions
) -> np.ndarray:
    """Which candidates (sigmoid reranker scores) the reranker guard drops."""
    if options.reranker_threshold is not None:
        return probabilities >= options.reranker_threshold
    return probabilities > lowest_positive - (options.reranker_margin or 0.0)


def sample(
    draws: Sequence[Draw],
    pool: Sequence[str],
    options: MiningOptions,
    stats: MiningStats,
    reranker: Reranker | None,
) -> None:
    """Fill each draw's ``kept`` up to ``options.negatives`` (see the module doc).

    Every round draws what each unfinished line still lacks; one reranker call scores the
    round's candidates of all lines. Without a reranker one round keeps everything drawn.
    """
    active = [d for d in draws if d.eligible]
    if reranker is not None and options.reranker_threshold is None:  # the margin rule
        pairs = [(d.query, p) for d in active for p in d.positives]
        positive = iter(
            reranker.score_pairs(pairs, normalize=True, show_progress_bar=False).tolist()
        )
        for d in active:
            d.lowest = min(next(positive) for _ in d.positives)
    while active:
        rounds = [(d, d.draw(options.negatives - len(d.kept))) for d in active]
        if reranker is None:
            for d, picked in rounds:
                d.kept.extend(picked)
        else:
            pairs = [(d.query, pool[d.eligible[i]]) for d, picked in rounds for i in picked]
            probabilities = reranker.score_pairs(pairs, normalize=True, show_progress_bar=False)
            stats.reranker_scored += len(pairs)
            start = 0
            for d, picked in rounds:
                drops = reranker_drops(
                    probabilities[start : start + len(picked)], d.lowest, options
                )
                start += len(picked)
                d.kept.extend(i for i, drop in zip(picked, drops, strict=True) if not drop)
                stats.skipped_reranker += int(drops.sum())
        active = [d for d in active if len(d.kept) < options.negatives and d.left]


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
    reranker: Reranker | None = None,
    show_progress_bar: bool = False,
) -> list[list[str]]:
    """Sample each line's negatives from its query's ranked window (see the module doc).

    ``scores``/``ranked`` are the top-k of each distinct query (rows of ``query_rows``).
    Each line draws from its own generator seeded by (seed, line index), so a line's
    negatives do not depend on the other lines.
    """
    chosen: list[list[str]] = []
    window = slice(options.range_min, options.range_max)
    block: list[Draw] = []

    def finish_block() -> None:
        sample(block, pool, options, stats, reranker)
        for d in block:
            chosen.append([pool[d.eligible[i]] for i in sorted(d.kept)])
            stats.negatives += len(d.kept)
            stats.short_lines += len(d.kept) < options.negatives
        block.clear()

    known: dict[str, set[str]] = {}  # query text -> the positives of all its lines
    for example in examples:
        known.setdefault(example.query.strip(), set()).update(p.strip() for p in example.pos)
    lines = tqdm(examples, desc="Sampling", unit="line", disable=not show_progress_bar)
    for number, (example, row) in enumerate(zip(lines, query_rows, strict=True)):
        excluded = {example.query.strip(), *known[example.query.strip()]}
        ceiling = options.max_score_ratio * positive[number]
        eligible = []
        for score, index in zip(scores[row, window], ranked[row, window], strict=True):
            if pool[index].strip() in excluded:
                stats.skipped_equal += 1
            elif score > ceiling:
                stats.skipped_score += 1
            else:
                eligible.append(int(index))
        rng = np.random.default_rng([options.seed, number])
        block.append(Draw(example.query, example.pos, eligible, rng, list(range(len(eligible)))))
        if len(block) == RERANK_LINES:
            finish_block()
    finish_block()
    return chosen


def mine_negatives(
    encoder: Encoder,
    examples: Sequence[Example],
    pool: Sequence[str],
    options: MiningOptions = DEFAULT_OPTIONS,
    *,
    reranker: Reranker | None = None,
    show_progress_bar: bool = False,
) -> tuple[list[list[str]], MiningStats]:
    """Mine hard negatives for each example from ``pool`` (distinct texts) with ``encoder``.

    Queries are encoded as queries (or with the line's prompt), the pool as passages.
    With ``reranker``, sampled candidates it judges relevant are replaced (module doc).
    Returns one list of negatives per example, in rank order, and the statistics.
    """
    if reranker is None and options.reranker_rule_set:
        raise ValueError("reranker_threshold and reranker_margin need a reranker")
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
        reranker=reranker,
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
    reranker: Reranker | None = None,
    overwrite: bool = False,
    show_progress_bar: bool = False,
) -> MiningStats:
    """Write a copy of the training JSONL ``source`` to ``target`` with mined ``neg`` lists.

    The pool is the texts of ``corpus`` files/folders, else the file's own texts. With
    ``reranker``, sampled candidates it judges relevant are replaced by others (see the
    module doc). Every other field of a line (``task``, ``source``, ``prompt``, ...) is kept
    as it was, except teacher scores (``pos_scores``, ``neg_scores``): they no longer match
    the new ``neg`` and are dropped (score the output again with ``peg-rag score``).
    ``target`` must differ from ``source`` and, unless ``overwrite``, must not exist; it
    appears only once complete.
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
        encoder, examples, pool, options, reranker=reranker, show_progress_bar=show_progress_bar
    )
    with atomic_writer(target) as handle:
        for (record, _), negatives in zip(lines, chosen, strict=True):
            line = {**without_scores(record), "neg": negatives}
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    return stats
