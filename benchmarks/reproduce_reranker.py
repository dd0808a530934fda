"""Train our own reranker on a 2-core CPU and measure what it adds to hybrid retrieval
(issue 11), in one command.

    python benchmarks/reproduce_reranker.py [--work DIR] [--lock FILE] [--stages ...]
    python benchmarks/reproduce_reranker.py --smoke     # the whole pipeline, tiny, < 2 minutes

``--work`` defaults to ``bench/reranker`` in peg-rag's cache directory (``$PEG_RAG_CACHE``,
else ``$XDG_CACHE_HOME/peg-rag``, else ``~/.cache/peg-rag``); ``--lock`` to
``peg-rag-cpu.lock`` in the temporary directory (``--lock ''`` runs without one). Helpers are
reproduce_peg.py's (data merging, locked and timed jobs).

Stages, each skipped when its output exists (a killed training run resumes from its last
checkpoint), about 1.5 hours in all:

1. ``prepare``: a subsample of ``../shared/data/train`` (kuake-qtr: medical query -> page
   title; paraphrase-medical: question -> paraphrase; cmrc2018-trial: question -> passage),
   lines with the same query merged; per source some queries held out for choosing the
   checkpoint (never trained on); and a mining pool of every distinct positive per source.
2. ``mine``: ``peg-rag mine`` with the base model: 7 negatives per training line from ranks
   [3, 50) with the score-ratio guard 0.98 (trainer/configs/reranker.yaml says why), and
   the held-out lines' candidate lists: the positive and 29 candidates of ranks [0, 30),
   without the guard, as a first stage would rank them.
3. ``train``: ``peg-rag train-reranker --config trainer/configs/reranker.yaml`` from the base
   model (me5-small-zh with a new head), evaluating the held-out lines every 140 steps and
   keeping the best model by held-out kuake-qtr nDCG@10.
4. ``eval``: dense, hybrid, and hybrid + the trained reranker (the hybrid top 30 reranked)
   on kuake-qtr-dev and cmedir-dev (all queries) and a seeded sample of 500 cmrc2018-dev
   queries, with the base model as the encoder (max length 512), through
   ``peg_rag.retrieval.evaluate`` (``dense_run``, ``index_corpus``, ``run_queries``).
5. ``report``: the "Reranker training (issue 11)" section of ``benchmarks/RESULTS.md``
   (with ``--smoke``: ``RESULTS.md`` in the work folder), including the share of training
   lines whose groups are full of mined negatives rather than random fillers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import results_file
from reproduce_peg import EVAL, PEG_RAG, SEED, Job, merged_lines, run_all, write_jsonl
from results_file import header, update_section
from study_eval import base_model, retrieval_set

from peg_rag.core.cache import cache_dir

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "trainer" / "configs" / "reranker.yaml"
STAGES = ("prepare", "mine", "train", "eval", "report")
EVAL_SETS = ("kuake-qtr-dev", "cmedir-dev", "cmrc2018-dev")
CMRC_SAMPLE = 500  # cmrc2018-dev queries reranked: its 256-token passages are the costly pairs
RERANK_TOP_N = 30
EVAL_LENGTH = 512  # the encoder's max length in evaluation; the reranker keeps its 256
MINE_LENGTH = 128  # the base model's max length when mining (as reproduce_peg.py)
GROUP_SIZE = 8  # trainer/configs/reranker.yaml
# Mining of training lines: window [3, 50) and guard (see trainer/configs/reranker.yaml).
MINE_WINDOW = (3, 50)
MINE_SCORE_RATIO = 0.98
# Held-out candidate lists: a first stage's top 30, without any guard.
HELD_WINDOW = (0, RERANK_TOP_N)
HELD_SCORE_RATIO = 100.0  # cosines are <= 1, so nothing is above 100 x the positive's score
# Training lines per source: 280 steps x 16 queries = 4,480 groups (the recipe), one pass.
# cmrc2018-trial's passage pairs (256 tokens) make a step ~17x slower than a short one here
# (90 s vs 5.4 s): 5% of the groups, ~45% of the time; they keep the reranker from
# regressing on question -> passage. 450 of them ran past the 60-minute budget.
PLAN = {"kuake-qtr": 2785, "paraphrase-medical": 1470, "cmrc2018-trial": 225}
# Held-out queries for choosing the checkpoint: each evaluation reranks 30 candidates of each,
# 4,500 short and 900 passage pairs (~4 minutes of forward passes).
HELD_OUT = {"kuake-qtr": 150, "cmrc2018-trial": 30}
BEST = "val-kuake-qtr/ndcg@10"
INT8 = "hybrid+rerank onnx-int8"  # the trained reranker, backend="onnx", quantize="int8"
# --smoke: the same stages on a tiny model, a few lines, a few evaluation queries.
SMOKE_PLAN = {"kuake-qtr": 24, "cmrc2018-trial": 8}
SMOKE_HELD = {"kuake-qtr": 6, "cmrc2018-trial": 4}
SMOKE_POOL = 400
SMOKE_QUERIES = 8
SMOKE_DOCS = 200


def log(message: str) -> None:
    print(f"[reproduce_reranker {time.strftime('%H:%M:%S')}] {message}", flush=True)


def plan(smoke: bool) -> tuple[dict[str, int], dict[str, int]]:
    return (SMOKE_PLAN, SMOKE_HELD) if smoke else (PLAN, HELD_OUT)


def prepare(work: Path, smoke: bool) -> None:
    """Training lines, held-out lines and mining pools under ``work/data``."""
    data = work / "data"
    if (data / "prepared.json").exists():
        return
    counts, held_out = plan(smoke)
    summary = {}
    for source, count in counts.items():
        lines = merged_lines(source)
        random.Random(f"{SEED}-{source}").shuffle(lines)
        held = held_out.get(source, 0)
        if held + count > len(lines):
            raise SystemExit(f"{source}: asked for {held} + {count} lines, it has {len(lines)}")
        if held:
            write_jsonl(data / "held" / f"{source}.jsonl", lines[:held])
        write_jsonl(data / "train" / f"{source}.jsonl", lines[held : held + count])
        pool = list(dict.fromkeys(p for line in lines for p in line["pos"]))
        if smoke:  # the sampled lines' positives and a few hundred more
            used = dict.fromkeys(p for line in lines[: held + count] for p in line["pos"])
            pool = list(dict.fromkeys([*used, *pool[:SMOKE_POOL]]))
        write_jsonl(data / "pool" / f"{source}.jsonl", [{"text": t} for t in pool])
        summary[source] = {"lines": count, "held_out": held, "pool": len(pool)}
        log(f"{source}: {summary[source]}")
    (data / "prepared.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def mine_command(
    work: Path, smoke: bool, source: Path, target: Path, pool: Path, negatives: int, window, ratio
) -> list[str]:
    command = [PEG_RAG, "mine", str(source), "--output", str(target), "--corpus", str(pool)]
    command += ["--negatives", str(negatives), "--range-min", str(window[0])]
    command += ["--range-max", str(window[1]), "--max-score-ratio", f"{ratio:g}"]
    command += ["--seed", str(SEED), "--model", str(base_model(work, smoke))]
    return command + ["--max-length", str(MINE_LENGTH)]


def mine_jobs(work: Path, smoke: bool) -> list[Job]:
    """Negatives for the training lines; candidate lists for the held-out lines."""
    data = work / "data"
    counts, held_out = plan(smoke)
    jobs = []
    for source in counts:
        pool = data / "pool" / f"{source}.jsonl"
        target = data / "mined" / f"{source}.jsonl"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            command = mine_command(
                work,
                smoke,
                data / "train" / f"{source}.jsonl",
                target,
                pool,
                GROUP_SIZE - 1,
                MINE_WINDOW,
                MINE_SCORE_RATIO,
            )
            jobs.append((f"mine/{source}", command))
        held = data / "val" / f"val-{source}.jsonl"
        if source in held_out and not held.exists():
            held.parent.mkdir(parents=True, exist_ok=True)
            command = mine_command(
                work,
                smoke,
                data / "held" / f"{source}.jsonl",
                held,
                pool,
                RERANK_TOP_N - 1,
                HELD_WINDOW,
                HELD_SCORE_RATIO,
            )
            jobs.append((f"mine/val-{source}", command))
    return jobs


def validation_files(work: Path, smoke: bool) -> list[str]:
    return [str(work / "data" / "val" / f"val-{s}.jsonl") for s in plan(smoke)[1]]


def train_jobs(work: Path, smoke: bool) -> list[Job]:
    """Train the reranker, resuming from its last checkpoint when one exists (the trainer
    writes ``model/`` only when the run is complete)."""
    output = work / "runs" / "reranker"
    if (output / "model").is_dir():
        return []
    command = [PEG_RAG, "train-reranker", "--config", str(RECIPE)]
    command += ["--model", str(base_model(work, smoke))]
    command += ["--train", str(work / "data" / "mined"), "--output-dir", str(output)]
    command += ["--eval-dirs", *validation_files(work, smoke), "--metric-for-best", BEST]
    command += ["--resume", "latest"]
    if smoke:
        command += ["--max-steps", "4", "--batch-size", "4", "--mini-batch-size", "2"]
        command += ["--max-length", "64", "--eval-steps", "2", "--save-steps", "2"]
        command += ["--logging-steps", "1", "--report-to", "none"]
    return [("train/reranker", command)]


def reranker_dir(work: Path) -> Path:
    """The model kept by metric_for_best (the final one if evaluation never ran)."""
    output = work / "runs" / "reranker"
    return output / "best-model" if (output / "best-model").is_dir() else output / "model"


def eval_jobs(work: Path, smoke: bool, encoder: str | None) -> list[Job]:
    """One job per evaluation set: this script with --evaluate-set (timed like the others)."""
    jobs = []
    for name in EVAL_SETS:
        if (work / "eval" / f"{name}.json").exists():
            continue
        command = [sys.executable, str(Path(__file__).resolve()), "--work", str(work)]
        command += ["--evaluate-set", name] + (["--smoke"] if smoke else [])
        command += ["--encoder", encoder] if encoder else []
        jobs.append((f"eval/{name}", command))
    return jobs


def evaluation_subset(name: str, smoke: bool):
    """The set as evaluated: all judged queries, cmrc2018-dev's seeded sample of 500; with
    --smoke a few queries over their relevant documents and a few hundred others."""
    if smoke:
        return retrieval_set(EVAL / name, SMOKE_QUERIES, SMOKE_DOCS)
    return retrieval_set(EVAL / name, CMRC_SAMPLE if name == "cmrc2018-dev" else None)


def evaluate_set(work: Path, name: str, smoke: bool, encoder_path: str | None) -> None:
    """dense, hybrid and hybrid+rerank metrics of one set into work/eval/NAME.json."""
    from peg_rag.core.encoder import PEGEncoder
    from peg_rag.core.metrics import retrieval_scores
    from peg_rag.core.reranker import Reranker
    from peg_rag.retrieval.evaluate import RERANKED, dense_run, index_corpus, run_queries

    data = evaluation_subset(name, smoke)
    encoder = PEGEncoder.from_pretrained(
        encoder_path or base_model(work, smoke),
        max_length=EVAL_LENGTH if not smoke else 128,
        batch_size=64,
        show_progress_bar=not smoke,
    )
    reranker = Reranker.from_pretrained(reranker_dir(work), batch_size=32)
    started = time.perf_counter()
    runs = {"dense": dense_run(encoder, data)}
    retriever = index_corpus(data.corpus, encoder, show_progress=not smoke)
    runs.update(
        run_queries(
            retriever,
            data.queries,
            k=100,
            methods=("hybrid",),
            reranker=reranker,
            rerank_top_n=RERANK_TOP_N,
        )
    )
    # The same stage with the reranker quantized (goal: nDCG@10 within 0.5 of fp32). ONNX
    # Runtime's int8 has per-channel weights; torch's per-tensor int8 lost 5-7 points in the
    # first run (RESULTS.md), and ONNX int8 is also the fast path (rerank_throughput.py).
    quantized = Reranker.from_pretrained(
        reranker_dir(work), batch_size=32, backend="onnx", quantize="int8"
    )
    runs[INT8] = run_queries(
        retriever,
        data.queries,
        k=100,
        methods=("hybrid",),
        reranker=quantized,
        rerank_top_n=RERANK_TOP_N,
    )[RERANKED]
    results = {method: retrieval_scores(run, data.qrels) for method, run in runs.items()}
    record = {
        "set": name,
        "queries": len(data.queries),
        "documents": len(data.corpus),
        "encoder": str(encoder_path or base_model(work, smoke)),
        "reranker": str(reranker_dir(work)),
        "rerank_top_n": RERANK_TOP_N,
        "seconds": round(time.perf_counter() - started, 1),
        "results": {m: results[m] for m in ("dense", "hybrid", RERANKED, INT8)},
    }
    target = work / "eval" / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(target, [record])
    log(f"{name}: {json.dumps(record['results'])}")


def mined_share(work: Path, smoke: bool) -> dict[str, tuple[int, int]]:
    """Per source (full groups, lines): lines that got all group_size - 1 mined negatives."""
    shares = {}
    for source in plan(smoke)[0]:
        path = work / "data" / "mined" / f"{source}.jsonl"
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        full = sum(len(line["neg"]) >= GROUP_SIZE - 1 for line in lines)
        shares[source] = (full, len(lines))
    return shares


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def report(work: Path, smoke: bool, lock: str | None) -> None:
    """The RESULTS.md section (work/RESULTS.md with --smoke)."""
    import yaml

    from peg_rag.retrieval.evaluate import RERANKED

    if smoke:
        results_file.RESULTS = work / "RESULTS.md"
    timings = json.loads((work / "timings.json").read_text(encoding="utf-8"))
    prepared = json.loads((work / "data" / "prepared.json").read_text(encoding="utf-8"))
    evaluated = {  # a set whose evaluation has not run yet is named as missing
        name: json.loads((work / "eval" / f"{name}.json").read_text(encoding="utf-8"))
        for name in EVAL_SETS
        if (work / "eval" / f"{name}.json").exists()
    }
    missing = [name for name in EVAL_SETS if name not in evaluated]
    output = work / "runs" / "reranker"
    logged = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    best_file = output / "best-model" / "best.json"
    best = json.loads(best_file.read_text()) if best_file.exists() else None
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    shares = mined_share(work, smoke)
    full, total = (sum(v[i] for v in shares.values()) for i in (0, 1))

    table = [
        "| set | queries | method | nDCG@10 | MRR@10 | Recall@10 |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, record in evaluated.items():
        res = record["results"]
        for method, scores in res.items():
            cells = [f"{100 * scores[m]:.2f}" for m in ("ndcg@10", "mrr@10", "recall@10")]
            # the fp32 stage against hybrid; the int8 stage against the fp32 stage
            versus = {RERANKED: "hybrid", INT8: RERANKED}.get(method)
            if versus in res:
                cells = [
                    f"{c} ({100 * (scores[m] - res[versus][m]):+.2f})"
                    for c, m in zip(cells, ("ndcg@10", "mrr@10", "recall@10"), strict=True)
                ]
            label = {
                RERANKED: f"hybrid + rerank top {RERANK_TOP_N}",
                INT8: f"hybrid + rerank top {RERANK_TOP_N}, reranker ONNX int8",
            }.get(method, method)
            table.append(f"| {name} | {record['queries']} | {label} | " + " | ".join(cells) + " |")
    data_rows = [
        "| source | training lines | held-out queries | mining pool | groups full of mined "
        "negatives |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for source, info in prepared.items():
        got, lines = shares[source]
        data_rows.append(
            f"| {source} | {info['lines']} | {info['held_out'] or '-'} | {info['pool']} | "
            f"{got}/{lines} ({100 * got / max(lines, 1):.1f}%) |"
        )
    curve_keys = sorted({k for r in logged for k in r if k.startswith("eval/")})
    curve = ["| step | " + " | ".join(k.removeprefix("eval/") for k in curve_keys) + " |"]
    curve.append("| ---: |" + " ---: |" * len(curve_keys))
    for record in logged:
        if any(k in record for k in curve_keys):
            cells = [f"{100 * record[k]:.2f}" if k in record else "" for k in curve_keys]
            curve.append(f"| {record['step']} | " + " | ".join(cells) + " |")
    losses = [r["train/loss"] for r in logged if "train/loss" in r]
    gains = {
        name: 100 * (r["results"][RERANKED]["ndcg@10"] - r["results"]["hybrid"]["ndcg@10"])
        for name, r in evaluated.items()
    }
    body = "\n".join(
        [
            header("Reranker training (issue 11): me5-small-zh + a new head, 2-core CPU"),
            "- Recipe: `python benchmarks/reproduce_reranker.py"
            + (" --smoke" if smoke else "")
            + "` (prepare, mine, train, eval, report; scratch files in "
            f"`{work}`, outside the repository; "
            + (f"heavy steps under `flock {lock}`). " if lock else "no CPU lock). ")
            + "Config: `trainer/configs/reranker.yaml` ("
            + ", ".join(f"`{k}: {v}`" for k, v in recipe.items())
            + ")"
            + (" with the smoke overrides of the commands below." if smoke else "."),
            "- Start: "
            + (
                "a 1-layer, 64-wide random BERT (smoke run: numbers mean nothing)"
                if smoke
                else "`../shared/models/me5-small-zh` (an embedding model) with a new, randomly "
                "initialized one-logit head"
            )
            + f". Loss: {recipe['loss']} over groups of 1 positive + "
            f"{recipe['group_size'] - 1} negatives.",
            f"- Mining (`peg-rag mine`, the base model, max length {MINE_LENGTH}): "
            f"{GROUP_SIZE - 1} negatives per training line from ranks "
            f"[{MINE_WINDOW[0]}, {MINE_WINDOW[1]}) of the source's pool (every distinct "
            f"positive), score-ratio guard {MINE_SCORE_RATIO}; lines short of mined negatives "
            "are filled with random lines' positives at training time. "
            f"**{full} of {total} training lines ({100 * full / max(total, 1):.1f}%) have "
            "groups full of mined negatives.** Held-out lines: the positive + "
            f"{RERANK_TOP_N - 1} candidates of ranks [{HELD_WINDOW[0]}, {HELD_WINDOW[1]}), "
            "no guard (a first stage's top 30); the checkpoint is chosen on them "
            f"(`{BEST}`), never on the dev sets below.",
            "- Evaluation: `peg_rag.retrieval.evaluate` with the base model as encoder (max "
            f"length {EVAL_LENGTH}): dense = exact search; hybrid = the HybridRetriever's "
            "default fusion of BM25 (its default tokenizer, rjieba) and the dense store; "
            "hybrid + rerank = its top "
            f"{RERANK_TOP_N} reranked by the trained model (`best-model/`"
            + (f", step {best['step']}" if best else "")
            + f"), the rest in hybrid order. cmrc2018-dev: a seeded sample of {CMRC_SAMPLE} "
            "queries"
            + (
                f"; smoke: {SMOKE_QUERIES} queries and {SMOKE_DOCS} extra documents"
                if smoke
                else ""
            )
            + ".",
            "",
            *data_rows,
            "",
            "Scores x 100 (in brackets: hybrid + rerank vs hybrid; ONNX int8 vs fp32 reranker):",
            "",
            *table,
            "",
            "nDCG@10 change from reranking: "
            + "; ".join(f"{name} {gain:+.2f}" for name, gain in gains.items())
            + (f". Not evaluated yet: {', '.join(missing)}." if missing else ""),
            "",
            f"Training: {max(r['step'] for r in logged)} steps, loss "
            + (f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "-")
            + (
                f"; best `{best['metric']}` = {100 * best['value']:.2f} at step {best['step']}"
                if best
                else ""
            )
            + ". Held-out metrics during training (x 100):",
            "",
            *curve,
            "",
            "Wall times: " + "; ".join(f"{k} {minutes(v['seconds'])}" for k, v in timings.items()),
            "",
            "Commands, in order:",
            "",
            "```bash",
            *[v["command"] for v in timings.values()],
            "```",
        ]
    )
    update_section("reproduce_reranker" + ("_smoke" if smoke else ""), body)
    log(f"wrote the report to {results_file.RESULTS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work",
        type=Path,
        help="scratch folder for data, runs and evaluations (default: bench/reranker in "
        f"{cache_dir()}, bench/reranker-smoke with --smoke)",
    )
    parser.add_argument(
        "--lock",
        default=str(Path(tempfile.gettempdir()) / "peg-rag-cpu.lock"),
        help="flock file held by the heavy steps ('' for none; default: %(default)s)",
    )
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every stage on a tiny random model, a few lines and a few evaluation queries "
        "(checks the pipeline in under 2 minutes; the report goes to the work folder)",
    )
    parser.add_argument(
        "--encoder", help="first-stage embedding model for the evaluation (default: the base)"
    )
    parser.add_argument("--evaluate-set", choices=EVAL_SETS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work or cache_dir() / "bench" / ("reranker-smoke" if args.smoke else "reranker")
    work.mkdir(parents=True, exist_ok=True)
    if args.evaluate_set:  # one job of the eval stage
        evaluate_set(work, args.evaluate_set, args.smoke, args.encoder)
        return
    lock = args.lock or None
    if "prepare" in args.stages:
        prepare(work, args.smoke)
    if "mine" in args.stages:
        run_all(work, mine_jobs(work, args.smoke), lock)
    if "train" in args.stages:
        run_all(work, train_jobs(work, args.smoke), lock)
    if "eval" in args.stages:
        for job in eval_jobs(work, args.smoke, args.encoder):  # one lock hold per set
            run_all(work, [job], lock)
    if "report" in args.stages:
        report(work, args.smoke, lock)


if __name__ == "__main__":
    main()
