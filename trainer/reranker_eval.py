"""Checkpoint choice for rerankers: rerank held-out queries' candidate lists, score the ranking.

A reranker is judged on what it does at inference: reorder a first stage's top candidates of
each query. ``eval_dirs`` of ``peg-rag train-reranker`` take two kinds of held-out sets:

- **a JSONL file of held-out training lines** (the training format): a line's candidates are
  its ``pos`` and ``neg`` texts, and its ``pos`` are the relevant ones. Build the ``neg`` of
  such lines as a first stage would: ``peg-rag mine held.jsonl --negatives 29 --range-min 0
  --range-max 30 --max-score-ratio 100`` (the embedder's top 30 without the guard, which a
  first stage does not have) gives the positive plus 29 top candidates per query.
- **a BEIR folder**: each judged query's candidates are the BM25 (jieba) top ``eval_top_n``
  of the corpus; relevance comes from its qrels (a relevant document BM25 misses stays
  missed, for every checkpoint alike).

Candidate lists are built once, on first use. Each evaluation scores all pairs of a set in
one length-sorted pass and reports nDCG@10, MRR@10 and Recall@10 of the reranked lists
(:func:`peg_rag.core.metrics.retrieval_scores`), as fractions in [0, 1]. Hold out queries of
the training data for this: choosing the checkpoint on the dev sets one reports would tune
the model to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peg_rag.core.beir import load_beir
from peg_rag.core.metrics import retrieval_scores
from peg_rag.core.records import DataError, FileLine, read_jsonl
from peg_rag.core.reranker import Reranker
from peg_rag.retrieval.evaluate import judged_queries, set_name

from .data import Example, parse_example

METRICS = ("ndcg@10", "mrr@10", "recall@10")


@dataclass
class CandidateSet:
    """Held-out queries, each with its candidate documents and their relevance."""

    name: str
    queries: dict[str, str]  # query id -> text
    corpus: dict[str, str]  # document id -> text
    candidates: dict[str, list[str]]  # query id -> document ids to rerank
    qrels: dict[str, dict[str, int]]  # query id -> document id -> grade (> 0: relevant)


def _held_out_line(record: dict[str, Any], where: FileLine) -> Example:
    example = parse_example(record, where)
    if not [text for text in example.neg if text not in example.pos]:
        raise DataError(where, "a held-out line needs candidates besides its positives", "neg")
    return example


def held_out_lines(path: str | Path) -> CandidateSet:
    """A JSONL file of held-out lines: candidates ``pos`` + ``neg``, relevant ``pos``.

    Each query's candidates are put in a fixed random order, so that a model scoring them
    all alike (a fresh head, a collapsed one) ranks its positive at random, not first.
    """
    queries: dict[str, str] = {}
    corpus: dict[str, str] = {}
    candidates: dict[str, list[str]] = {}
    qrels: dict[str, dict[str, int]] = {}
    shuffle = np.random.default_rng(0)
    for n, example in enumerate(read_jsonl(path, _held_out_line)):
        query = f"q{n}"
        texts = list(dict.fromkeys([*example.pos, *example.neg]))
        ids = [f"{query}-{i}" for i in range(len(texts))]
        queries[query] = example.query
        corpus.update(zip(ids, texts, strict=True))
        candidates[query] = [ids[i] for i in shuffle.permutation(len(ids)).tolist()]
        qrels[query] = {ids[i]: 1 for i in range(len(set(example.pos)))}
    if not queries:
        raise ValueError(f"{path}: no held-out lines")
    return CandidateSet(set_name(path), queries, corpus, candidates, qrels)


def bm25_candidates(folder: str | Path, top_n: int) -> CandidateSet:
    """A BEIR folder's judged queries with the BM25 top ``top_n`` of its corpus each."""
    from peg_rag.retrieval.bm25 import BM25Index  # jieba and bm25s: only when a folder is used

    data = load_beir(folder)
    queries = judged_queries(data)
    index = BM25Index()
    index.add(list(data.corpus), list(data.corpus.values()))
    candidates = {q: [doc for doc, _ in index.search(text, top_n)] for q, text in queries.items()}
    qrels = {q: dict(data.qrels[q]) for q in queries}
    return CandidateSet(set_name(folder), queries, data.corpus, candidates, qrels)


def rerank(reranker: Reranker, data: CandidateSet) -> dict[str, list[str]]:
    """Each query's candidates ordered by the reranker's score, best first."""
    order = [(q, doc) for q, docs in data.candidates.items() for doc in docs]
    scores = reranker.score_pairs([(data.queries[q], data.corpus[doc]) for q, doc in order])
    ranked: dict[str, list[tuple[float, int, str]]] = {q: [] for q in data.candidates}
    for n, ((query, doc), score) in enumerate(zip(order, scores.tolist(), strict=True)):
        ranked[query].append((-score, n, doc))  # ties keep the first stage's order
    return {q: [doc for *_, doc in sorted(found)] for q, found in ranked.items()}


def rerank_scores(reranker: Reranker, data: CandidateSet) -> dict[str, float]:
    """nDCG@10, MRR@10 and Recall@10 of the reranked candidate lists, as fractions."""
    found = retrieval_scores(rerank(reranker, data), data.qrels)
    return {name: found[name] for name in METRICS}


class RerankEvaluation:
    """The default ``evaluate(reranker, path)`` of ``train_reranker``: each set is read (and
    its BM25 candidates found) once, then reranked at every evaluation."""

    def __init__(self, top_n: int = 30) -> None:
        self.top_n = top_n
        self.sets: dict[str, CandidateSet] = {}

    def load(self, path: str | Path) -> CandidateSet:
        key = str(path)
        if key not in self.sets:
            self.sets[key] = (
                bm25_candidates(path, self.top_n) if Path(path).is_dir() else held_out_lines(path)
            )
        return self.sets[key]

    def __call__(self, reranker: Reranker, path: str) -> dict[str, float]:
        return rerank_scores(reranker, self.load(path))
