"""Evaluate retrieval on BEIR-layout folders and an encoder on sentence-pair files.

Dense retrieval is an exact search over the encoder's vectors; BM25 and hybrid runs come from
a HybridRetriever over the whole documents (``chunk_size=0``, as BEIR scores whole
documents, so chunk ids and document ids coincide). All scores are fractions in [0, 1], as
:mod:`peg_rag.core.metrics` computes them; only the Markdown table of ``peg-rag eval``
multiplies by 100, the way C-MTEB reports.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from peg_rag.core.beir import RetrievalSet, load_beir, load_pairs
from peg_rag.core.documents import Document
from peg_rag.core.encoding import Encoder
from peg_rag.core.metrics import retrieval_scores, spearman
from peg_rag.core.reranker import Reranker

from .hybrid import HybridRetriever
from .settings import METHODS, Method
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


def check_sample_limits(max_queries: int | None, max_distractors: int | None) -> None:
    """Fail on limits ``sample_set`` cannot meet, before any folder is read."""
    if max_queries is not None and max_queries < 1:
        raise ValueError(f"max_queries must be >= 1 (or None: all), got {max_queries}")
    if max_distractors is not None and max_distractors < 0:
        raise ValueError(f"max_distractors must be >= 0 (or None: all), got {max_distractors}")


def sample_set(
    data: RetrievalSet,
    max_queries: int | None = None,
    max_distractors: int | None = None,
    seed: int = 0,
) -> RetrievalSet:
    """``data`` cut to its judged queries, at most ``max_queries`` of them, and to the passages
    relevant to those plus at most ``max_distractors`` others (None: all). Both are seeded
    samples, so a seed gives the same set every time; a smaller set scores faster, and with
    fewer distractors every query scores higher."""
    check_sample_limits(max_queries, max_distractors)
    judged = judged_queries(data)
    kept = sorted(judged)  # sorted: the sample ignores the file's order
    if max_queries is not None and len(kept) > max_queries:
        kept = random.Random(seed).sample(kept, max_queries)
    qrels = {q: data.qrels[q] for q in kept}
    corpus = data.corpus
    if max_distractors is not None:
        relevant = {d for rel in qrels.values() for d, grade in rel.items() if grade > 0}
        others = sorted(set(corpus) - relevant)
        if len(others) > max_distractors:
            keep = relevant | set(random.Random(seed).sample(others, max_distractors))
            corpus = {d: text for d, text in corpus.items() if d in keep}
    return RetrievalSet(data.name, corpus, {q: judged[q] for q in kept}, qrels)


def dense_run(
    encoder: Encoder, data: RetrievalSet, depth: int = RANK_DEPTH
) -> dict[str, list[str]]:
    """Rank the corpus for each judged query by embedding similarity: query id -> doc ids."""
    queries = judged_queries(data)
    doc_ids = list(data.corpus)
    query_vectors = encoder.encode(list(queries.values()), "query")
    doc_vectors = encoder.encode([data.corpus[d] for d in doc_ids], "passage")
    _, ranked = top_k(query_vectors, doc_vectors, depth)
    return {q: [doc_ids[i] for i in row] for q, row in zip(queries, ranked, strict=True)}


Pairs = tuple[list[str], list[str], list[float]]  # as load_pairs returns them
EvalSet = RetrievalSet | Pairs
Results = dict[str, dict[str, dict[str, float]]]  # set name -> method -> metric -> score
RERANKED = "hybrid+rerank"  # the run name of hybrid retrieval followed by a reranker


def index_corpus(
    corpus: Mapping[str, str],
    encoder: Encoder,
    *,
    index_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = False,
    **settings: Any,
) -> HybridRetriever:
    """A hybrid index of ``{doc_id: text}``, in memory unless ``index_dir`` is given.

    ``settings`` go to :meth:`HybridRetriever.create`: HybridSettings fields (fusion,
    weights, candidates...), ``bm25_tokenizer`` or ``tokenizer``; chunking is off.
    """
    retriever = HybridRetriever.create(index_dir, encoder, **{**settings, "chunk_size": 0})
    retriever.add(
        [Document(doc_id, text) for doc_id, text in corpus.items()], show_progress=show_progress
    )
    return retriever


def run_queries(
    retriever: HybridRetriever,
    queries: Mapping[str, str],
    *,
    k: int = 100,
    methods: Sequence[Method] = ("bm25", "dense", "hybrid"),
    reranker: Reranker | None = None,
    rerank_top_n: int | None = None,
    **options: Any,
) -> dict[str, dict[str, list[str]]]:
    """``{method: {query_id: [doc_id, ...]}}`` ranked best first, at most k per query.

    With a ``reranker``, a ``"hybrid+rerank"`` run is added: the hybrid top
    ``rerank_top_n`` reranked, then the rest of the hybrid top k. ``options`` go to
    :meth:`HybridRetriever.retrieve_many` (fusion, weights, candidates). A document with
    several chunks appears once, at its best chunk's rank.
    """
    ids, texts = list(queries), list(queries.values())
    stages: dict[str, dict[str, Any]] = {m: {"method": m, "reranker": False} for m in methods}
    if reranker is not None:
        stages[RERANKED] = {"reranker": reranker, "rerank_top_n": rerank_top_n}
    runs: dict[str, dict[str, list[str]]] = {}
    for name, stage in stages.items():
        results = retriever.retrieve_many(texts, k, **stage, **options)
        runs[name] = {
            query_id: list(dict.fromkeys(r.doc_id for r in found))
            for query_id, found in zip(ids, results, strict=True)
        }
    return runs


def hybrid_runs(
    encoder: Encoder,
    data: RetrievalSet,
    methods: Sequence[Method],
    depth: int = RANK_DEPTH,
    **rerank: Any,
) -> dict[str, dict[str, list[str]]]:
    """Runs of "bm25" and/or "hybrid" from a HybridRetriever over the whole documents, and
    "hybrid+rerank" when ``rerank`` holds a ``reranker`` (and ``rerank_top_n``).

    Its defaults apply (BM25 tokenizer, relative-score fusion of BM25 with the dense store);
    the dense half searches the store's HNSW index, while ``dense_run`` is exact.
    """
    retriever = index_corpus(data.corpus, encoder)
    return run_queries(retriever, judged_queries(data), k=depth, methods=methods, **rerank)


def pair_spearman(encoder: Encoder, pairs: Pairs) -> float:
    """Spearman correlation between gold scores and the cosine of each pair's embeddings.

    Both sides are encoded as queries: a symmetric task, as E5-style models expect.
    """
    left, right, gold = pairs
    a = encoder.encode(left, "query")
    b = encoder.encode(right, "query")
    cosine = (a * b).sum(axis=1) / np.maximum(
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12
    )
    return spearman(cosine, gold)


def load_set(path: str | Path) -> EvalSet:
    """Read a BEIR folder, or a sentence-pair set (folder holding pairs.tsv, or the file)."""
    pairs = pairs_file(path)
    if pairs is not None:
        return load_pairs(pairs)
    data = load_beir(path)
    judged_queries(data)  # a judged query missing from queries.jsonl fails here, early
    return data


def score_set(
    encoder: Encoder,
    data: EvalSet,
    methods: Sequence[str] = ("dense",),
    reranker: Reranker | None = None,
    rerank_top_n: int | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of each method on one evaluation set: method -> metric -> fraction.

    A retrieval set gives ``ndcg@10``, ``mrr@10``, ``recall@10`` and ``recall@100`` per
    method, plus ``hybrid+rerank`` with a ``reranker``; a sentence-pair set gives the dense
    ``spearman`` only, since lexical methods and rerankers do not score pairs.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if not isinstance(data, RetrievalSet):
        return {"dense": {"spearman": pair_spearman(encoder, data)}} if "dense" in methods else {}
    runs = {"dense": dense_run(encoder, data)} if "dense" in methods else {}
    indexed = cast(list[Method], [m for m in methods if m != "dense"])  # checked above
    if indexed or reranker is not None:
        runs.update(
            hybrid_runs(encoder, data, indexed, reranker=reranker, rerank_top_n=rerank_top_n)
        )
    names = [*methods, *([RERANKED] if reranker is not None else [])]
    return {m: retrieval_scores(runs[m], data.qrels) for m in names}


def evaluate_folder(encoder: Encoder, folder: str | Path) -> dict[str, float]:
    """Dense metrics of ``encoder`` on one evaluation set, as fractions in [0, 1].

    A BEIR folder gives ``ndcg@10``, ``mrr@10``, ``recall@10`` and ``recall@100``; a folder
    holding ``pairs.tsv`` (or the .tsv file itself) gives ``spearman``.
    """
    return score_set(encoder, load_set(folder))["dense"]


def set_name(path: str | Path) -> str:
    """How a set is named in reports and logged metrics: a folder's name; a file's stem, or
    its folder's name for a ``pairs.tsv``."""
    path = Path(path).resolve()
    if path.is_dir():
        return path.name
    return path.parent.name if path.name == "pairs.tsv" else path.stem


def load_sets(paths: Sequence[str | Path]) -> dict[str, EvalSet]:
    """Read every set up front, so bad input fails before any encoding, keyed by name.

    A name shared by two paths falls back to the path as given.
    """
    sets: dict[str, EvalSet] = {}
    for path in paths:
        name = set_name(path)
        sets[str(path) if name in sets else name] = load_set(path)
    return sets


def evaluate_sets(
    encoder: Encoder, sets: dict[str, EvalSet], methods: Sequence[str], **rerank: Any
) -> Results:
    """score_set for each named set (``rerank``: its reranker and rerank_top_n)."""
    return {name: score_set(encoder, data, methods, **rerank) for name, data in sets.items()}


COLUMNS = {
    "ndcg@10": "nDCG@10",
    "mrr@10": "MRR@10",
    "recall@10": "Recall@10",
    "recall@100": "Recall@100",
    "spearman": "Spearman",
}


def markdown_table(results: Results) -> str:
    """One row per (set, method), scores x 100 with two decimals as C-MTEB reports them."""
    used = [c for c in COLUMNS if any(c in m for r in results.values() for m in r.values())]
    lines = [
        "| set | method | " + " | ".join(COLUMNS[c] for c in used) + " |",
        "|---|---|" + "---:|" * len(used),
    ]
    for name, by_method in results.items():
        for method, scores in by_method.items():
            cells = [f"{100 * scores[c]:.2f}" if c in scores else "" for c in used]
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
