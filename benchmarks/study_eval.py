"""What the training studies (noise_study.py, forgetting_study.py, reproduce_reranker.py)
share: per-query evaluation, paired-bootstrap intervals, the base model, the --smoke sizes
and the command line.

A model's evaluation is one JSON file: ``{set: {query id: nDCG@10}}`` for each BEIR folder
(dense exact search) and ``{"cosine": [...], "gold": [...]}`` for the stsb-zh pairs, so that
any two models can be compared query by query afterwards.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from reproduce_peg import BASE

SEED = 42
BOOTSTRAP_DRAWS = 2000
STSB = "stsb-zh"
# --smoke: 4 steps of a tiny model, evaluation on a few queries.
SMOKE_TRAIN = ["--max-steps", "4", "--batch-size", "8", "--mini-batch-size", "4"]
SMOKE_TRAIN += ["--max-length", "64", "--eval-steps", "2", "--save-steps", "2"]
SMOKE_TRAIN += ["--logging-steps", "1"]
SMOKE_EVAL = (8, 200, 40)  # queries per set, other documents, stsb-zh pairs


def base_model(work: Path, smoke: bool) -> Path:
    """me5-small-zh, or with --smoke a 1-layer, 64-wide BERT with its tokenizer."""
    if not smoke:
        return BASE
    from train_common import small_bert

    return small_bert(work / "tiny-model", layers=1, hidden=64, max_length=128)


def folder_name(run: str) -> str:
    """A run's folder: "C + anchor 1" -> "C-anchor-1"."""
    return run.replace(" + ", "-").replace(" ", "-")


def retrieval_set(folder: Path, queries: int | None = None, docs: int | None = None):
    """A BEIR folder's judged queries, or a seeded sample of ``queries`` of them; with
    ``docs``, the corpus cut to their relevant documents and ``docs`` others."""
    from peg_rag.core.beir import load_beir
    from peg_rag.retrieval.evaluate import sample_set

    return sample_set(load_beir(folder), queries, docs, SEED)


def evaluate(
    model: Path,
    folders: dict[str, Path],
    pairs: Path,
    target: Path,
    *,
    max_length: int,
    smoke: tuple[int, int, int] | None = None,
) -> None:
    """Write ``target``: per query nDCG@10 of ``model`` on each BEIR folder and its cosine of
    each stsb-zh pair in ``pairs``. ``smoke``: (queries, other documents, pairs) kept."""
    from peg_rag.core.beir import load_pairs
    from peg_rag.core.encoder import PEGEncoder
    from peg_rag.core.files import write_json
    from peg_rag.core.metrics import ndcg_at_k
    from peg_rag.retrieval.evaluate import dense_run

    encoder = PEGEncoder.from_pretrained(
        model, max_length=max_length, batch_size=64, show_progress_bar=smoke is None
    )
    record: dict[str, dict] = {}
    for name, folder in folders.items():
        data = retrieval_set(folder, *(smoke[:2] if smoke else (None, None)))
        run = dense_run(encoder, data)
        record[name] = {q: ndcg_at_k(ranked, data.qrels[q], 10) for q, ranked in run.items()}
        print(f"{model.name} {name}: nDCG@10 {100 * np.mean(list(record[name].values())):.2f}")
    left, right, gold = load_pairs(pairs)
    if smoke:
        left, right, gold = left[: smoke[2]], right[: smoke[2]], gold[: smoke[2]]
    a, b = encoder.encode(left, "query"), encoder.encode(right, "query")
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    record[STSB] = {"cosine": cosine.tolist(), "gold": list(gold)}
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, record)


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def ndcg(record: dict, name: str) -> float:
    """The set's nDCG@10 x 100."""
    return 100 * float(per_query(record, name).mean())


def per_query(record: dict, name: str) -> np.ndarray:
    return np.array([record[name][q] for q in sorted(record[name])])


def spearman(record: dict, index: np.ndarray | None = None) -> float:
    """stsb-zh Spearman x 100 (over the pairs at ``index``, when given)."""
    from peg_rag.core.metrics import spearman as correlation

    cosine, gold = np.array(record[STSB]["cosine"]), np.array(record[STSB]["gold"])
    if index is not None:
        cosine, gold = cosine[index], gold[index]
    return 100 * correlation(cosine, gold)


Interval = tuple[float, float, float]  # (difference, low, high)


def paired_difference(x: dict, y: dict, sets: tuple[str, ...]) -> Interval:
    """x - y in nDCG@10 x 100, averaged over ``sets`` (each set's mean over its queries),
    with the 95% interval of a paired bootstrap that resamples each set's queries."""
    rng = np.random.default_rng(SEED)
    diffs = [per_query(x, s) - per_query(y, s) for s in sets]
    draws = np.zeros(BOOTSTRAP_DRAWS)
    for d in diffs:
        draws += d[rng.integers(0, len(d), size=(BOOTSTRAP_DRAWS, len(d)))].mean(axis=1)
    draws *= 100 / len(diffs)
    low, high = np.percentile(draws, [2.5, 97.5])
    return 100 * float(np.mean([d.mean() for d in diffs])), float(low), float(high)


def spearman_difference(x: dict, y: dict) -> Interval:
    """x - y in stsb-zh Spearman x 100, with a paired-bootstrap 95% interval over the pairs
    (a quarter of BOOTSTRAP_DRAWS: each draw ranks all pairs twice)."""
    rng = np.random.default_rng(SEED)
    n = len(x[STSB]["gold"])
    draws = [
        spearman(x, index) - spearman(y, index)
        for index in rng.integers(0, n, size=(BOOTSTRAP_DRAWS // 4, n))
    ]
    low, high = np.percentile(draws, [2.5, 97.5])
    return spearman(x) - spearman(y), float(low), float(high)


def difference(x: dict, y: dict, name: str) -> Interval:
    """x - y on one set: Spearman for stsb-zh, nDCG@10 otherwise."""
    return spearman_difference(x, y) if name == STSB else paired_difference(x, y, (name,))


def headline(record: dict, name: str) -> float:
    """The set's main metric x 100: Spearman for stsb-zh, nDCG@10 otherwise."""
    return spearman(record) if name == STSB else ndcg(record, name)


def interval(found: Interval) -> str:
    return f"{found[0]:+.2f} [{found[1]:+.2f}, {found[2]:+.2f}]"


def study_arguments(
    doc: str, stages: tuple[str, ...], name: str, runs: tuple[str, ...] = ()
) -> tuple[argparse.Namespace, Path]:
    """A study script's command line: --work (default: bench/NAME, or NAME-smoke, in
    peg-rag's cache), --lock, --stages, --smoke and the internal --evaluate MODEL; with
    ``runs``, also --runs (which of them, in order; default: all)."""
    from peg_rag.core.cache import cache_dir

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help=f"scratch folder (default: bench/{name})")
    parser.add_argument(
        "--lock",
        default=str(Path(tempfile.gettempdir()) / "peg-rag-cpu.lock"),
        help="flock file held by the heavy steps ('' for none; default: %(default)s)",
    )
    parser.add_argument("--stages", nargs="+", choices=stages, default=list(stages))
    parser.add_argument("--smoke", action="store_true", help="tiny end-to-end run")
    parser.add_argument("--evaluate", help="internal: evaluate one model (base or a run)")
    if runs:
        parser.add_argument("--runs", nargs="+", choices=runs, default=list(runs), metavar="RUN")
    args = parser.parse_args()
    args.lock = args.lock or None
    work = args.work or cache_dir() / "bench" / (f"{name}-smoke" if args.smoke else name)
    return args, work
