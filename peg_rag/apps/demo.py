"""``peg-rag demo``: hybrid retrieval over the bundled knowledge base, working offline.

The model is found in this order: an explicit ``--model`` or ``$PEG_RAG_MODEL``; then
``TownsWu/PEG`` from the Hugging Face Hub or its local cache; then a fallback: a small
PEG model trained on the knowledge base itself (:mod:`peg_rag.apps.kb_model`), announced
loudly and cached, so a machine with no hub access still runs the whole demo.

The knowledge base is indexed into embedded Chroma + jieba BM25 (a HybridRetriever in
the cache directory, updated incrementally on reruns), then the sample questions are
answered with their sources and the retrieval hit@k is reported, or, with ``chat``, the
user asks the questions.

A cross-encoder reranks the hybrid results when there is one: ``--reranker``, else
``BAAI/bge-reranker-base`` from the hub or its local cache. hit@k is then reported with
and without it. Without one (always the case offline), the demo says so in one line.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging as transformers_logging

from peg_rag.core.cache import cache_dir
from peg_rag.core.encoding import Encoder
from peg_rag.core.reranker import DEFAULT_RERANKER, Reranker
from peg_rag.retrieval.evaluate import RERANKED, run_queries
from peg_rag.retrieval.hybrid import HybridRetriever
from peg_rag.retrieval.index_files import is_index
from peg_rag.retrieval.results import STAGES
from peg_rag.retrieval.settings import Method

from .kb_model import QUICK, Recipe
from .model_choice import FALLBACK_SOURCE, Print, find_pretrained, resolve_model
from .rag_chat import Source, citation_lines, extractive_answer, typed_questions
from .sample_data import Question, kb_documents, load_sample_questions

QUICK_QUESTIONS_PER_DOMAIN = 3
# The fallback model knows only the knowledge base's own wording, so BM25 leads the fusion
# (the mirror image of HybridSettings' default dense 0.7 / BM25 0.3 for pretrained models).
FALLBACK_WEIGHTS = {"dense": 0.3, "bm25": 0.7}
METHODS = (RERANKED, "hybrid", "dense", "bm25")  # the rows of the hit@k report


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[-80:] or "model"


def open_index(encoder: Encoder, index_dir: Path, out: Print, **settings) -> HybridRetriever:
    """The demo's hybrid index, reused when it was built with the same vectors.

    ``settings`` (fusion weights...) apply when the index is created."""
    retriever = None
    if is_index(index_dir):
        try:
            retriever = HybridRetriever.load(index_dir, encoder=encoder)
        except ValueError as exc:  # built with another model: start over
            out(f"Rebuilding {index_dir}: {exc}")
    if retriever is None:
        retriever = HybridRetriever.create(
            index_dir, encoder, chunk_size=0, overwrite=True, **settings
        )
    report = retriever.add(kb_documents(), show_progress=True)
    weights = retriever.settings.weights
    out(
        f"Index {index_dir}: {len(retriever)} passages in embedded Chroma + jieba BM25 "
        f"({report.added} added, {report.replaced} replaced, {report.unchanged} unchanged); "
        f"{retriever.settings.fusion} fusion, weights dense {weights['dense']} / "
        f"BM25 {weights['bm25']}."
    )
    return retriever


def _hit(found: list[str], question: Question, k: int) -> bool:
    return any(doc_id in question.gold_ids for doc_id in found[:k])


def resolve_reranker(reranker: str | bool | None, out: Print) -> str | None:
    """The cross-encoder to rerank with: the one given, else the hub's when reachable, else
    None (said in one line); False: none."""
    if reranker is False:
        out("Reranker: off (--no-rerank)")
        return None
    if isinstance(reranker, str) and reranker:
        out(f"Reranker: {reranker} (given with --reranker)")
        return reranker
    found = find_pretrained(DEFAULT_RERANKER)
    if found is None:
        out(
            f"No reranker: {DEFAULT_RERANKER} is neither reachable on the Hugging Face Hub nor in "
            "the local cache; give --reranker MODEL (a hub id or directory) to add one."
        )
        return None
    out(f"Reranker: {found} ({DEFAULT_RERANKER}, Hugging Face Hub or local cache)")
    return str(found)


@dataclass
class DemoReport:
    """What a demo run did; ``hit_at_k`` maps method (hybrid, dense, bm25, and hybrid+rerank
    with a reranker) to a fraction."""

    model: str
    model_source: str
    k: int
    reranker: str | None = None
    questions: int = 0
    hit_at_k: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def first_per_domain(questions: list[Question], n: int) -> list[Question]:
    """The first n questions of each domain, in file order."""
    counts: Counter[str] = Counter()
    chosen = []
    for question in questions:
        if counts[question.domain] < n:
            counts[question.domain] += 1
            chosen.append(question)
    return chosen


def answer_questions(
    retriever: HybridRetriever,
    questions: list[Question],
    k: int,
    out: Print,
    rerank_top_n: int | None = None,
) -> dict[str, float]:
    """Print each question's top k sources (gold ones marked) and return hit@k per method:
    the hybrid retriever followed by its reranker, if it has one ("hybrid+rerank"), and for
    comparison hybrid retrieval alone and its dense and BM25 halves alone."""
    queries = {q.id: q.text for q in questions}
    reranked = retriever.reranker is not None
    shown = RERANKED if reranked else "hybrid"
    # Hybrid retrieval alone runs apart only when the answers shown are reranked.
    methods: tuple[Method, ...] = ("hybrid", "dense", "bm25") if reranked else ("dense", "bm25")
    runs = run_queries(retriever, queries, k=k, methods=methods)
    answers = retriever.retrieve_many(list(queries.values()), k, rerank_top_n=rerank_top_n)
    for question, results in zip(questions, answers, strict=True):
        mark = "✓" if _hit([r.doc_id for r in results], question, k) else "✗"
        out(f"\n{mark} {question.id} [{question.domain}] {question.text}")
        for n, r in enumerate(results, start=1):
            gold = "*" if r.doc_id in question.gold_ids else " "
            ranks = ", ".join(f"{m} #{r.ranks[m]}" for m in STAGES if r.ranks[m])
            title = r.metadata.get("title", "")
            out(f"   {gold}{n}. {r.doc_id} {title}  (score {r.score:.3f}; {ranks or 'no rank'})")
    runs[shown] = {
        q.id: [r.doc_id for r in found] for q, found in zip(questions, answers, strict=True)
    }
    hits = {
        method: sum(_hit(runs[method][q.id], q, k) for q in questions) / len(questions)
        for method in METHODS
        if method in runs
    }
    out(f"\n* = a gold passage. hit@{k} over {len(questions)} questions:")
    width = max(map(len, hits))
    for method, hit in hits.items():
        out(f"  {method:<{width}} {hit:6.1%}")
    return hits


def chat(retriever: HybridRetriever, k: int, out: Print, rerank_top_n: int | None = None) -> None:
    """Answer typed questions extractively with cited passages."""
    out("Answers are extractive: the top passages, cited (examples/*_chat.py add an LLM).")
    for question in typed_questions(None):
        results = retriever.retrieve(question, k, rerank_top_n=rerank_top_n)
        sources = [Source(r.doc_id, r.text, r.score, r.metadata.get("title", "")) for r in results]
        out(extractive_answer(sources))
        out("Sources:\n" + "\n".join(citation_lines(sources)))


def run_demo(
    model: str | None = None,
    *,
    load_encoder: Callable[[str], Encoder],
    reranker: str | bool | None = None,
    load_reranker: Callable[[str], Reranker | None] = Reranker.from_pretrained,
    rerank_top_n: int | None = None,
    quick: bool = False,
    interactive: bool = False,
    k: int = 5,
    cache: Path | None = None,
    index_dir: Path | None = None,
    out: Print = print,
) -> DemoReport:
    """Run the demo; ``load_encoder(name)`` builds the PEGEncoder and ``load_reranker(name)``
    the Reranker (CLI options applied). ``reranker``: the cross-encoder's name or directory
    (default: the hub's, when reachable); ``rerank_top_n``: how many hybrid results it
    reorders (default: the index's)."""
    transformers_logging.disable_progress_bar()  # no weight-loading bars between answers
    started = time.perf_counter()
    cache = cache or cache_dir()
    recipe = QUICK if quick else Recipe()
    name, source = resolve_model(model, cache=cache, recipe=recipe, out=out)
    out(f"Model: {name} ({source})")
    encoder = load_encoder(name)
    reranker = resolve_reranker(reranker, out)
    second_stage = load_reranker(reranker) if reranker else None
    report = DemoReport(model=name, model_source=source, k=k, reranker=reranker)
    report.seconds["model"] = time.perf_counter() - started
    mark = time.perf_counter()
    index_dir = index_dir or cache / "demo-index" / _slug(name)
    fallback = source == FALLBACK_SOURCE
    retriever = open_index(
        encoder, index_dir, out, **({"weights": FALLBACK_WEIGHTS} if fallback else {})
    )
    retriever.reranker = second_stage
    report.seconds["index"] = time.perf_counter() - mark
    if interactive:
        chat(retriever, k, out, rerank_top_n)
    else:
        questions = load_sample_questions()
        if quick:
            questions = first_per_domain(questions, QUICK_QUESTIONS_PER_DOMAIN)
        mark = time.perf_counter()
        report.hit_at_k = answer_questions(retriever, questions, k, out, rerank_top_n)
        report.questions = len(questions)
        report.seconds["questions"] = time.perf_counter() - mark
    report.seconds["total"] = time.perf_counter() - started
    out(
        f"\nDone in {report.seconds['total']:.1f} s (model {report.seconds['model']:.1f} s, "
        f"index {report.seconds['index']:.1f} s)."
    )
    return report
