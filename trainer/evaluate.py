"""Evaluate an encoder on BEIR-layout retrieval folders and sentence-pair files.

All scores are fractions in [0, 1], as trainer.metrics computes them; only the Markdown
table of ``peg-rag eval`` multiplies by 100, the way C-MTEB reports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .beir import RetrievalSet, load_beir, load_pairs
from .metrics import retrieval_scores, spearman
from .topk import top_k

RANK_DEPTH = 100  # Recall@100 needs the top 100


def pairs_file(path: str | Path) -> Path | None:
    """The pairs TSV that ``path`` names (a .tsv file or a folder holding pairs.tsv), if any."""
    path = Path(path)
    if path.is_file() and path.suffix == ".tsv":
        return path
    if (path / "pairs.tsv").is_file():
        return path / "pairs.tsv"
    return None


def judged_queries(data: RetrievalSet) -> dict[str, str]:
    """The queries that have at least one relevant document, by id."""
    judged = [q for q, rel in data.qrels.items() if any(g > 0 for g in rel.values())]
    missing = [q for q in judged if q not in data.queries]
    if missing:
        raise ValueError(
            f"{data.name}: qrels/test.tsv judges {len(missing)} queries that queries.jsonl "
            f"lacks, e.g. {missing[:3]}"
        )
    return {q: data.queries[q] for q in judged}


def dense_run(encoder, data: RetrievalSet, depth: int = RANK_DEPTH) -> dict[str, list[str]]:
    """Rank the corpus for each judged query by embedding similarity: query id -> doc ids."""
    queries = judged_queries(data)
    doc_ids = list(data.corpus)
    query_vectors = encoder.encode(list(queries.values()), "query")
    doc_vectors = encoder.encode([data.corpus[d] for d in doc_ids], "passage")
    _, ranked = top_k(query_vectors, doc_vectors, depth)
    return {q: [doc_ids[i] for i in row] for q, row in zip(queries, ranked, strict=True)}


def pair_spearman(encoder, path: str | Path) -> float:
    """Spearman correlation between gold scores and the cosine of each pair's embeddings.

    Both sides are encoded as queries: a symmetric task, as E5-style models expect.
    """
    left, right, gold = load_pairs(path)
    a = encoder.encode(left, "query")
    b = encoder.encode(right, "query")
    cosine = (a * b).sum(axis=1) / np.maximum(
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12
    )
    return spearman(cosine, gold)


def evaluate_folder(encoder, folder: str | Path) -> dict[str, float]:
    """Dense metrics of ``encoder`` on one evaluation set, as fractions in [0, 1].

    A BEIR folder gives ``ndcg@10``, ``mrr@10``, ``recall@10`` and ``recall@100``; a folder
    holding ``pairs.tsv`` (or the .tsv file itself) gives ``spearman``.
    """
    pairs = pairs_file(folder)
    if pairs is not None:
        return {"spearman": pair_spearman(encoder, pairs)}
    data = load_beir(folder)
    return retrieval_scores(dense_run(encoder, data), data.qrels)
