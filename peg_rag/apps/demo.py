"""``peg-rag demo``: hybrid retrieval over the bundled knowledge base, working offline.

The model is found in this order: an explicit ``--model`` or ``$PEG_RAG_MODEL``; then
``TownsWu/PEG`` from the Hugging Face Hub or its local cache; then a fallback: a small
PEG model trained on the knowledge base itself (:mod:`peg_rag.apps.kb_model`), announced
loudly and cached, so a machine with no hub access still runs the whole demo.

The knowledge base is indexed into embedded Chroma + jieba BM25 (a HybridRetriever in
the cache directory, updated incrementally on reruns), then the sample questions are
answered with their sources and the retrieval hit@k is reported, or, with ``chat``, the
user asks the questions.
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
from peg_rag.retrieval.evaluate import run_queries
from peg_rag.retrieval.hybrid import HybridRetriever
from peg_rag.retrieval.index_files import is_index

from .kb_model import QUICK, Recipe
from .model_choice import FALLBACK_SOURCE, Print, resolve_model
from .rag_chat import Source, citation_lines, extractive_answer, typed_questions
from .sample_data import Question, kb_documents, load_sample_questions

QUICK_QUESTIONS_PER_DOMAIN = 3
# The fallback model knows only the knowledge base's own wording, so BM25 leads the fusion
# (the mirror image of HybridSettings' default dense 0.7 / BM25 0.3 for pretrained models).
FALLBACK_WEIGHTS = {"dense": 0.3, "bm25": 0.7}


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


@dataclass
class DemoReport:
    """What a demo run did; ``hit_at_k`` maps method (hybrid, dense, bm25) to a fraction."""

    model: str
    model_source: str
    k: int
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


def answer_questions(retriever, questions: list[Question], k: int, out: Print) -> dict[str, float]:
    """Print each question's top k sources (gold ones marked) and return hit@k per method:
    the hybrid retriever, and its dense and BM25 halves alone for comparison."""
    queries = {q.id: q.text for q in questions}
    runs = run_queries(retriever, queries, k=k, methods=("dense", "bm25"))
    hybrid = retriever.retrieve_many(list(queries.values()), k)
    for question, results in zip(questions, hybrid, strict=True):
        mark = "✓" if _hit([r.doc_id for r in results], question, k) else "✗"
        out(f"\n{mark} {question.id} [{question.domain}] {question.text}")
        for n, r in enumerate(results, start=1):
            gold = "*" if r.doc_id in question.gold_ids else " "
            ranks = ", ".join(f"{m} #{r.ranks[m]}" for m in ("dense", "bm25") if r.ranks[m])
            title = r.metadata.get("title", "")
            out(f"   {gold}{n}. {r.doc_id} {title}  (score {r.score:.3f}; {ranks or 'no rank'})")
    runs["hybrid"] = {
        q.id: [r.doc_id for r in found] for q, found in zip(questions, hybrid, strict=True)
    }
    hits = {
        method: sum(_hit(run[q.id], q, k) for q in questions) / len(questions)
        for method, run in runs.items()
    }
    out(f"\n* = a gold passage. hit@{k} over {len(questions)} questions:")
    for method in ("hybrid", "dense", "bm25"):
        out(f"  {method:<7} {hits[method]:6.1%}")
    return hits


def chat(retriever, k: int, out: Print) -> None:
    """Answer typed questions extractively with cited passages."""
    out("Answers are extractive: the top passages, cited (examples/*_chat.py add an LLM).")
    for question in typed_questions(None):
        results = retriever.retrieve(question, k)
        sources = [Source(r.doc_id, r.text, r.score, r.metadata.get("title", "")) for r in results]
        out(extractive_answer(sources))
        out("Sources:\n" + "\n".join(citation_lines(sources)))


def run_demo(
    model: str | None = None,
    *,
    load_encoder: Callable[[str], Encoder],
    quick: bool = False,
    interactive: bool = False,
    k: int = 5,
    cache: Path | None = None,
    index_dir: Path | None = None,
    out: Print = print,
) -> DemoReport:
    """Run the demo; ``load_encoder(name)`` builds the PEGEncoder (CLI options applied)."""
    transformers_logging.disable_progress_bar()  # no weight-loading bars between answers
    started = time.perf_counter()
    cache = cache or cache_dir()
    recipe = QUICK if quick else Recipe()
    name, source = resolve_model(model, cache=cache, recipe=recipe, out=out)
    out(f"Model: {name} ({source})")
    encoder = load_encoder(name)
    report = DemoReport(model=name, model_source=source, k=k)
    report.seconds["model"] = time.perf_counter() - started
    mark = time.perf_counter()
    index_dir = index_dir or cache / "demo-index" / _slug(name)
    fallback = source == FALLBACK_SOURCE
    retriever = open_index(
        encoder, index_dir, out, **({"weights": FALLBACK_WEIGHTS} if fallback else {})
    )
    report.seconds["index"] = time.perf_counter() - mark
    if interactive:
        chat(retriever, k, out)
    else:
        questions = load_sample_questions()
        if quick:
            questions = first_per_domain(questions, QUICK_QUESTIONS_PER_DOMAIN)
        mark = time.perf_counter()
        report.hit_at_k = answer_questions(retriever, questions, k, out)
        report.questions = len(questions)
        report.seconds["questions"] = time.perf_counter() - mark
    report.seconds["total"] = time.perf_counter() - started
    out(
        f"\nDone in {report.seconds['total']:.1f} s (model {report.seconds['model']:.1f} s, "
        f"index {report.seconds['index']:.1f} s)."
    )
    return report
