"""``peg-rag demo``: hybrid retrieval over the bundled knowledge base, working offline.

The model is found in this order: an explicit ``--model`` or ``$PEG_RAG_MODEL``; then
``TownsWu/PEG`` from the Hugging Face Hub or its local cache; then a fallback: a small
PEG model trained on the knowledge base itself (:mod:`peg_rag.kb_model`), announced
loudly and cached, so a machine with no hub access still runs the whole demo.

The knowledge base is indexed into embedded Chroma + jieba BM25 (a HybridRetriever in
the cache directory, updated incrementally on reruns), then the sample questions are
answered with their sources and the retrieval hit@k is reported, or, with ``chat``, the
user asks the questions.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .kb_model import QUICK, Recipe, train_kb_model
from .model_files import ModelNotFoundError, resolve_model_dir
from .rag_chat import Source, citation_lines, extractive_answer, typed_questions
from .sample_data import Question, kb_documents, load_sample_questions

HUB_MODEL = "TownsWu/PEG"
ENV_MODEL = "PEG_RAG_MODEL"
ENV_CACHE = "PEG_RAG_CACHE"
QUICK_QUESTIONS_PER_DOMAIN = 3
# The fallback model knows only the knowledge base's own wording, so BM25 leads the fusion
# (the mirror image of HybridSettings' default dense 0.7 / BM25 0.3 for pretrained models).
FALLBACK_WEIGHTS = {"dense": 0.3, "bm25": 0.7}
BANNER_WIDTH = 78
FALLBACK_SOURCE = "fallback trained on the knowledge base"

Print = Callable[[str], None]


def cache_dir() -> Path:
    """``$PEG_RAG_CACHE``, else ``$XDG_CACHE_HOME/peg-rag``, else ``~/.cache/peg-rag``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peg-rag"


def find_pretrained(name: str = HUB_MODEL) -> Path | None:
    """The hub model's local directory (downloaded or already cached), None if unreachable."""
    try:
        return resolve_model_dir(name)
    except ModelNotFoundError:
        return None


def announce(lines: list[str], out: Print) -> None:
    """A banner that is hard to miss."""
    rule = "!" * BANNER_WIDTH
    out("\n".join([rule, *(f"!! {line}" for line in lines), rule]))


def fallback_model(cache: Path, recipe: Recipe, out: Print) -> Path:
    """The knowledge-base-trained model: from the cache, or trained now (and cached)."""
    documents = kb_documents()
    texts = [d.text for d in documents]
    target = cache / "fallback-models" / recipe.key(texts)
    if (target / "config.json").is_file():
        out(
            f"FALLBACK: no pretrained model reachable; using the small model trained on the "
            f"knowledge base earlier ({target})."
        )
        return target
    announce(
        [
            f"No pretrained model: {HUB_MODEL} is neither reachable on the Hugging Face Hub",
            "nor in the local cache, and no --model / $PEG_RAG_MODEL was given.",
            "FALLBACK: training a small PEG model from the sample knowledge base itself",
            f"({recipe.layers}-layer BERT, {recipe.hidden_size} wide, tokenizer built from the "
            f"passages, {recipe.steps} steps",
            "on pairs derived from passage titles and sentences; never the sample questions).",
            f"It is cached in {target.parent}, so this happens once. It is much weaker than",
            f"{HUB_MODEL}: give --model or $PEG_RAG_MODEL to use a pretrained model.",
        ],
        out,
    )
    started = time.perf_counter()
    pairs = [(d.metadata.get("title", ""), d.text) for d in documents]
    train_kb_model(pairs, target, recipe)
    out(f"Fallback model trained in {time.perf_counter() - started:.0f} s: {target}")
    return target


def resolve_model(model: str | None, *, cache: Path, recipe: Recipe, out: Print) -> tuple[str, str]:
    """(model name or directory, how it was found): explicit, hub, or fallback."""
    if model:
        return model, "given with --model"
    if os.environ.get(ENV_MODEL):
        return os.environ[ENV_MODEL], f"from ${ENV_MODEL}"
    found = find_pretrained()
    if found is not None:
        return str(found), f"{HUB_MODEL} (Hugging Face Hub or local cache)"
    return str(fallback_model(cache, recipe, out)), FALLBACK_SOURCE


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[-80:] or "model"


def open_index(encoder, index_dir: Path, out: Print, **settings):
    """The demo's hybrid index, reused when it was built with the same vectors.

    ``settings`` (fusion weights...) apply when the index is created."""
    from .hybrid import CONFIG_FILE, HybridRetriever

    retriever = None
    if (index_dir / CONFIG_FILE).is_file():
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
    from .hybrid_eval import run_queries

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
    load_encoder: Callable[[str], object],
    quick: bool = False,
    interactive: bool = False,
    k: int = 5,
    cache: Path | None = None,
    index_dir: Path | None = None,
    out: Print = print,
) -> DemoReport:
    """Run the demo; ``load_encoder(name)`` builds the PEGEncoder (CLI options applied)."""
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
