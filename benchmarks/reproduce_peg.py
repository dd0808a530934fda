"""The PEG reproduction run and its ablation (issue 4), sized for a 2-core CPU, in one command.

    python benchmarks/reproduce_peg.py [--work DIR] [--lock FILE]

``--work`` defaults to ``bench/repro`` in peg-rag's cache directory (``$PEG_RAG_CACHE``, else
``$XDG_CACHE_HOME/peg-rag``, else ``~/.cache/peg-rag``); ``--lock`` to ``peg-rag-cpu.lock`` in
the temporary directory (``--lock ''`` runs without one).

Stages, each skipped when its output exists (so an interrupted run continues where it
stopped; a killed training run resumes from its last checkpoint):

1. ``prepare``: a subsample of ``../shared/data/train/*`` sized to what the steps consume
   (lines with the same query merged into one line with all its positives), held-out
   validation sets cut from the training data (queries never trained on), and per source a
   candidate pool of every distinct positive for mining. Everything goes under ``--work``,
   outside the repository.
2. ``mine``: ``peg-rag mine`` with the base model, 5 negatives per line from each source's pool.
3. ``train``: ``peg-rag train`` with ``trainer/configs/ablation-{a,b,c}.yaml`` from the base
   model on the mined files, evaluating the validation sets and stsb-zh during training.
4. ``eval``: ``peg-rag eval`` of the base model (dense and BM25) and of A, B, C (dense) on
   kuake-qtr-dev, cmedir-dev, cmrc2018-dev and stsb-zh, at max length 512 for every model.
5. ``report``: ``benchmarks/peg_ablation.png`` and the "PEG reproduction (issue 4)" section of
   ``benchmarks/RESULTS.md``.

Mining, each training run and evaluation each hold ``--lock`` (flock) once, so that other jobs
on the machine can run between them; wall times are measured while the lock is held.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from results_file import header, update_section

from peg_rag.core.cache import cache_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BASE = SHARED / "models" / "me5-small-zh"
TRAIN = SHARED / "data" / "train"
EVAL = SHARED / "data" / "eval"
EVAL_SETS = ("kuake-qtr-dev", "cmedir-dev", "cmrc2018-dev", "stsb-zh")
RETRIEVAL_SETS = EVAL_SETS[:3]
RUNS = {
    "A": "plain InfoNCE, in-batch negatives only",
    "B": "A + 5 mined hard negatives + duplicate and false-negative masking",
    "C": "B + progressive weighting (full PEG)",
}
PEG_RAG = str(Path(sys.executable).with_name("peg-rag"))
STAGES = ("prepare", "mine", "train", "eval", "report")
SEED = 42
MAX_LENGTH = 128  # mining uses the training length; evaluation uses 512 for every model
EVAL_LENGTH = 512
# me5's cosines crowd into 0.85-0.95 (E5 trained at temperature 0.01), so the default guard
# (0.95 x the positive's score) rejects almost every candidate of ranks 10-100: it left
# 3,586 of 4,000 paraphrase-medical lines short. 0.98 skips what scores within about 0.02
# of the positive.
MINE_SCORE_RATIO = 0.98
EVAL_STEPS = 54  # validation during training (54, 108, and the end at 162)

# Training lines per source (after merging lines by query) and its sampling weight: a
# weight of 2 shows each line about twice, 0.5 about half of them once. Sized so that steps x
# batch (trainer/configs/ablation-*.yaml) is about the sum of lines x weights. The passage
# sources (drcd, cmrc2018-trial: 128-token passages, ~5x the cost of a short-text step) are
# kept small so that a run fits ~25 minutes on 2 cores; they guard cmrc2018-dev from drifting.
PLAN = {
    "kuake-qtr": (2873, 2.0),  # every query but the held-out ones, twice: query -> title
    "paraphrase-medical": (4000, 0.75),  # medical question paraphrases
    "paraphrase-finance": (1200, 0.67),  # general paraphrases, for STS
    "drcd": (1200, 0.34),  # question -> passage (Traditional Chinese)
    "cmrc2018-trial": (1000, 0.4),  # question -> passage
}
# Held-out validation queries per source (cut before sampling, never trained on).
VALIDATION = {"kuake-qtr": 300, "paraphrase-medical": 500}
VALIDATION_DOCS = 6000


def log(message: str) -> None:
    print(f"[reproduce_peg {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextmanager
def cpu_lock(path: str | None) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (shared with ``flock(1)`` users) while inside."""
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


Job = tuple[str, list[str]]  # (name in work/timings.json, command)


def run_all(work: Path, jobs: list[Job], lock: str | None) -> None:
    """Run the commands one after the other in one hold of the lock, recording each one and
    its wall time in work/timings.json (added to earlier segments of a resumed run)."""
    if not jobs:
        return
    with cpu_lock(lock):
        for key, command in jobs:
            log("$ " + shlex.join(command))
            start = time.perf_counter()
            subprocess.run(command, check=True)
            seconds = time.perf_counter() - start
            path = work / "timings.json"
            record = json.loads(path.read_text()) if path.exists() else {}
            earlier = record.get(key, {}).get("seconds", 0.0)
            record[key] = {"seconds": round(earlier + seconds, 1), "command": shlex.join(command)}
            path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", "utf-8")


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


def merged_lines(source: str) -> list[dict]:
    """The source's lines with one line per query text, holding all of its positives."""
    merged: dict[str, dict] = {}
    with (TRAIN / source / "train.jsonl").open(encoding="utf-8") as handle:
        for raw in handle:
            line = json.loads(raw)
            kept = merged.setdefault(line["query"], {**line, "pos": [], "neg": []})
            kept["pos"].extend(p for p in line["pos"] if p not in kept["pos"])
    return list(merged.values())


def squeeze(text: str) -> str:
    return "".join(text.split())


def write_validation(folder: Path, held: list[dict], corpus: dict[str, str]) -> int:
    """A BEIR folder of held-out queries against ``corpus`` ({id: text}), each relevant to
    the documents equal to its positives (ignoring whitespace); returns the queries kept."""
    ids = {squeeze(text): i for i, text in corpus.items()}
    qrels = {
        f"q{n}": sorted({ids[squeeze(p)] for p in line["pos"] if squeeze(p) in ids})
        for n, line in enumerate(held)
    }
    queries = [{"_id": f"q{n}", "text": line["query"]} for n, line in enumerate(held)]
    queries = [q for q in queries if qrels[q["_id"]]]
    write_jsonl(
        folder / "corpus.jsonl", [{"_id": i, "title": "", "text": t} for i, t in corpus.items()]
    )
    write_jsonl(folder / "queries.jsonl", queries)
    rows = ["query-id\tcorpus-id\tscore"]
    rows += [f"{q['_id']}\t{d}\t1" for q in queries for d in qrels[q["_id"]]]
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return len(queries)


def validation_corpus(source: str, held: list[dict], others: list[dict]) -> dict[str, str]:
    """kuake-qtr: the kuake-qtr-dev corpus (train and dev titles, so the held-out queries meet
    the titles judged irrelevant to them too; only their texts are reused, no dev query).
    Others: the held-out positives plus other lines' positives, VALIDATION_DOCS in all."""
    if source == "kuake-qtr":
        with (EVAL / "kuake-qtr-dev" / "corpus.jsonl").open(encoding="utf-8") as handle:
            return {(r := json.loads(line))["_id"]: r["text"] for line in handle}
    docs = list(dict.fromkeys(p for line in held for p in line["pos"]))
    rest = [p for p in dict.fromkeys(p for line in others for p in line["pos"]) if p not in docs]
    rest = random.Random(SEED).sample(rest, min(max(VALIDATION_DOCS - len(docs), 0), len(rest)))
    return {f"d{i}": text for i, text in enumerate(docs + rest)}


def prepare(
    work: Path,
    plan: dict[str, tuple[int, float]] = PLAN,
    validation: dict[str, int] = VALIDATION,
) -> None:
    """Training subsample, validation folders and mining pools under ``work/data``: per
    source of ``plan`` its lines, and ``validation`` held-out queries cut first."""
    data = work / "data"
    if (data / "prepared.json").exists():
        return
    summary = {}
    for source, (count, weight) in plan.items():
        lines = merged_lines(source)
        random.Random(f"{SEED}-{source}").shuffle(lines)
        held_count = validation.get(source, 0)
        held, lines = lines[:held_count], lines[held_count:]
        if held:
            corpus = validation_corpus(source, held, lines)
            kept = write_validation(data / f"val-{source}", held, corpus)
            log(f"val-{source}: {kept} queries, {len(corpus)} documents")
        if count > len(lines):
            raise SystemExit(f"{source}: asked for {count} lines, it has {len(lines)}")
        write_jsonl(data / "train" / f"{source}.jsonl", lines[:count])
        pool = dict.fromkeys(p for line in lines for p in line["pos"])
        write_jsonl(data / "pool" / f"{source}.jsonl", [{"text": t} for t in pool])
        summary[source] = {
            "lines": count,
            "weight": weight,
            "held_out": len(held),
            "pool": len(pool),
            "available": len(lines),
        }
        log(f"{source}: {summary[source]}")
    (data / "prepared.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def mine_jobs(work: Path) -> list[Job]:
    """Fill every training line's ``neg`` with 5 negatives mined by the base model."""
    data = work / "data"
    jobs = []
    for source in PLAN:
        target = data / "mined" / f"{source}.jsonl"
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        command = mine_command(
            data / "train" / f"{source}.jsonl", target, data / "pool" / f"{source}.jsonl"
        )
        jobs.append((f"mine/{source}", command))
    return jobs


def mine_command(lines: Path, target: Path, pool: Path, model: Path = BASE) -> list[str]:
    """peg-rag mine as this recipe runs it: 5 negatives per line from ``pool``."""
    command = [PEG_RAG, "mine", str(lines), "--output", str(target), "--corpus", str(pool)]
    command += ["--negatives", "5", "--max-score-ratio", str(MINE_SCORE_RATIO)]
    return command + ["--seed", str(SEED), "--model", str(model), "--max-length", str(MAX_LENGTH)]


def validation_sets(work: Path, validation: dict[str, int] = VALIDATION) -> list[str]:
    """What training evaluates every EVAL_STEPS steps: the held-out sets and stsb-zh."""
    held = [str(work / "data" / f"val-{source}") for source in validation]
    return held + [str(EVAL / "stsb-zh")]


def train_jobs(work: Path, name: str) -> list[Job]:
    """Train run ``name``, resuming from its last checkpoint when one exists (the trainer
    writes ``model/`` only when the run is complete)."""
    output = work / "runs" / name
    if (output / "model").is_dir():
        return []
    command = train_command(config_path(name), work / "data" / "mined", output)
    return [(f"train/{name}", command + ["--eval-dirs", *validation_sets(work)])]


def train_command(
    config: Path,
    train: Path,
    output: Path,
    plan: dict[str, tuple[int, float]] = PLAN,
    model: Path = BASE,
) -> list[str]:
    """peg-rag train as this recipe runs it, resuming from the last checkpoint, with the
    sources' sampling weights from ``plan``."""
    weights = [f"{source}={weight:g}" for source, (_, weight) in plan.items() if weight != 1]
    command = [PEG_RAG, "train", "--config", str(config), "--model", str(model)]
    command += ["--train", str(train), "--output-dir", str(output)]
    command += ["--source-weights", *weights] if weights else []
    return command + ["--eval-steps", str(EVAL_STEPS), "--resume", "latest"]


def config_path(name: str) -> Path:
    return REPO / "trainer" / "configs" / f"ablation-{name.lower()}.yaml"


def eval_jobs(work: Path) -> list[Job]:
    """peg-rag eval of the base model (dense + BM25) and of every run's final model (dense);
    also the base model on the validation sets, the step-0 point of the training curves."""
    out = work / "eval"
    jobs = [("base-validation", BASE, validation_sets(work), ["dense"], MAX_LENGTH)]
    jobs.append(("base", BASE, [str(EVAL / s) for s in EVAL_SETS], ["dense", "bm25"], EVAL_LENGTH))
    for name in RUNS:
        model = work / "runs" / name / "model"
        jobs.append((name, model, [str(EVAL / s) for s in EVAL_SETS], ["dense"], EVAL_LENGTH))
    pending = []
    for name, model, sets, methods, length in jobs:
        target = out / f"{name}.json"
        if target.exists():
            continue
        command = [PEG_RAG, "eval", *sets, "--methods", *methods, "--model", str(model)]
        command += ["--max-length", str(length), "--batch-size", "64"]
        command += ["--output", str(target), "--markdown", str(out / f"{name}.md")]
        pending.append((f"eval/{name}", command))
    return pending


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def scores(work: Path, name: str) -> dict:
    """set -> method -> metric -> fraction, from work/eval/NAME.json."""
    return json.loads((work / "eval" / f"{name}.json").read_text(encoding="utf-8"))["results"]


CURVES = (  # (panel title, log key); eval keys are plotted at step 0 from the base model
    ("training loss (moving average of 5 logged steps)", "train/loss"),
    ("held-out kuake-qtr queries: nDCG@10", "eval/val-kuake-qtr/ndcg@10"),
    ("held-out paraphrase-medical queries: nDCG@10", "eval/val-paraphrase-medical/ndcg@10"),
    ("stsb-zh: Spearman", "eval/stsb-zh/spearman"),
)


def plot(work: Path, target: Path) -> None:
    """Training loss and the validation metrics over steps of A, B and C."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = scores(work, "base-validation")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for axis, (title, key) in zip(axes.flat, CURVES, strict=True):
        for name in RUNS:
            points = [
                (r["step"], r[key])
                for r in read_log(work / "runs" / name / "log.jsonl")
                if key in r
            ]
            steps, values = zip(*points, strict=True)
            if key.startswith("train/"):
                values = [
                    sum(values[max(i - 4, 0) : i + 1]) / len(values[max(i - 4, 0) : i + 1])
                    for i in range(len(values))
                ]
            else:
                _, set_name, metric = key.split("/")
                steps, values = (0, *steps), (base[set_name]["dense"][metric], *values)
                values = [100 * v for v in values]
            axis.plot(
                steps,
                values,
                marker="" if key.startswith("train/") else "o",
                label=f"{name}: {RUNS[name]}",
            )
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("PEG ablation on me5-small-zh, 2-core CPU (step 0 = base model)", fontsize=11)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def settings() -> tuple[dict, dict[str, dict]]:
    """(settings shared by the three configs, each run's own settings)."""
    import yaml

    configs = {n: yaml.safe_load(config_path(n).read_text(encoding="utf-8")) for n in RUNS}
    keys = set().union(*configs.values())
    shared = {
        k: configs["A"][k]
        for k in sorted(keys)
        if len({str(c.get(k)) for c in configs.values()}) == 1
    }
    own = {n: {k: v for k, v in c.items() if k not in shared} for n, c in configs.items()}
    return shared, own


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def report(work: Path, lock: str | None) -> None:
    """benchmarks/peg_ablation.png and the RESULTS.md section."""
    plot(work, Path(__file__).with_name("peg_ablation.png"))
    timings = json.loads((work / "timings.json").read_text(encoding="utf-8"))
    prepared = json.loads((work / "data" / "prepared.json").read_text(encoding="utf-8"))
    rows = {"BM25 (jieba)": scores(work, "base"), "base (me5-small-zh)": scores(work, "base")}
    rows.update({f"{n}: {RUNS[n]}": scores(work, n) for n in RUNS})
    methods = {label: "bm25" if label.startswith("BM25") else "dense" for label in rows}

    def ndcg(label: str, name: str) -> float:
        return 100 * rows[label][name][methods[label]]["ndcg@10"]

    def mean2(label: str) -> float:
        return (ndcg(label, "kuake-qtr-dev") + ndcg(label, "cmedir-dev")) / 2

    def spearman(label: str) -> str:
        found = rows[label]["stsb-zh"].get(methods[label])
        return f"{100 * found['spearman']:.2f}" if found else "-"

    base_label = "base (me5-small-zh)"
    lines = [
        "| model | kuake-qtr-dev | cmedir-dev | cmrc2018-dev | mean kuake+cmedir "
        "| stsb-zh Spearman | training wall time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label in rows:
        run_name = label.split(":")[0]
        wall = timings.get(f"train/{run_name}")
        cells = [f"{ndcg(label, s):.2f}" for s in RETRIEVAL_SETS]
        if label != base_label and methods[label] == "dense":
            cells = [
                f"{c} ({ndcg(label, s) - ndcg(base_label, s):+.2f})"
                for c, s in zip(cells, RETRIEVAL_SETS, strict=True)
            ]
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {mean2(label):.2f} | {spearman(label)} | "
            + (minutes(wall["seconds"]) if wall else "-")
            + " |"
        )
    detail = [
        "| model | set | MRR@10 | Recall@10 | Recall@100 |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for label in rows:
        for name in RETRIEVAL_SETS:
            m = rows[label][name][methods[label]]
            detail.append(
                f"| {label.split(':')[0]} | {name} | {100 * m['mrr@10']:.2f} | "
                f"{100 * m['recall@10']:.2f} | {100 * m['recall@100']:.2f} |"
            )

    c_label, a_label = (f"{n}: {RUNS[n]}" for n in ("C", "A"))
    gain = ndcg(c_label, "kuake-qtr-dev") - ndcg(base_label, "kuake-qtr-dev")

    def headline(label: str, name: str) -> float:
        """The set's main metric x 100: Spearman for stsb-zh, nDCG@10 otherwise."""
        if name == "stsb-zh":
            return 100 * rows[label][name]["dense"]["spearman"]
        return ndcg(label, name)

    drops = {
        f"{label.split(':')[0]} {name}": headline(label, name) - headline(base_label, name)
        for label in (a_label, f"B: {RUNS['B']}", c_label)
        for name in EVAL_SETS
    }
    worst = min(drops, key=drops.get)
    goals = [
        f"- C >= base + 3.0 nDCG@10 on kuake-qtr-dev: C - base = {gain:+.2f}: "
        + ("**met**" if gain >= 3.0 else "**missed**"),
        f"- C >= A on mean nDCG@10 over kuake-qtr-dev and cmedir-dev: C {mean2(c_label):.2f}, "
        f"A {mean2(a_label):.2f}: "
        + ("**met**" if mean2(c_label) >= mean2(a_label) else "**missed**"),
        f"- no eval set more than 1.0 point below base (runs A, B, C; nDCG@10, Spearman): "
        f"largest drop {drops[worst]:+.2f} ({worst}): "
        + ("**met**" if drops[worst] >= -1.0 else "**missed**"),
    ]
    shared, own = settings()
    data_rows = [
        "| source | lines (queries) | sampling weight | held-out queries | mining pool |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for source, info in prepared.items():
        data_rows.append(
            f"| {source} | {info['lines']} | {PLAN[source][1]:g} | "
            f"{info['held_out'] or '-'} | {info['pool']} |"
        )
    mining = sum(v["seconds"] for k, v in timings.items() if k.startswith("mine/"))
    commands = [v["command"] for v in timings.values()]
    body = "\n".join(
        [
            header("PEG reproduction (issue 4): ablation on a 2-core CPU"),
            f"- Recipe: `python benchmarks/reproduce_peg.py` (prepare, mine, train A/B/C, eval, "
            f"report; scratch files in `{work}`, outside the repository; "
            + (
                f"heavy steps under `flock {lock}`, wall times measured while holding it). "
                if lock
                else "no CPU lock). "
            )
            + "Configs: `trainer/configs/ablation-{a,b,c}.yaml`.",
            f"- Base model: `../shared/models/me5-small-zh` (multilingual-e5-small, mean pooling, "
            f"`query: `/`passage: `). Training at max length {MAX_LENGTH}; every model is "
            f"evaluated at max length {EVAL_LENGTH} with `peg-rag eval` (dense: exact search; "
            "BM25: the HybridRetriever's jieba BM25).",
            "- Shared settings: " + ", ".join(f"`{k}: {v}`" for k, v in shared.items()),
            *[f"- {n}: " + ", ".join(f"`{k}: {v}`" for k, v in own[n].items()) for n in RUNS],
            "",
            "Training data: a subsample of `../shared/data/train/*`, lines with the same query "
            "merged (all positives kept), as many lines as steps x batch consume "
            "(sum of lines x weight); validation queries held out before sampling. Mining: "
            "`peg-rag mine` with the base model, 5 negatives per line from ranks 10-100 of the "
            "source's pool (all its distinct positives), score-ratio guard "
            f"{MINE_SCORE_RATIO}. "
            f"Mining wall time {minutes(mining)} in all.",
            "",
            *data_rows,
            "",
            "nDCG@10 x 100 (change vs base), Spearman x 100:",
            "",
            *lines,
            "",
            "Goals:",
            "",
            *goals,
            "",
            "Other metrics (x 100):",
            "",
            *detail,
            "",
            "Wall times: " + "; ".join(f"{k} {minutes(v['seconds'])}" for k, v in timings.items()),
            "",
            f"Training curves and validation metrics every {EVAL_STEPS} steps "
            "(held-out training queries and stsb-zh; step 0 is the base model):",
            "",
            "![PEG ablation curves](peg_ablation.png)",
            "",
            "Commands, in order:",
            "",
            "```bash",
            *commands,
            "```",
        ]
    )
    update_section("reproduce_peg", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work",
        type=Path,
        default=cache_dir() / "bench" / "repro",
        help="scratch folder for data, runs and evaluations (default: %(default)s)",
    )
    parser.add_argument(
        "--lock",
        default=str(Path(tempfile.gettempdir()) / "peg-rag-cpu.lock"),
        help="flock file held by the heavy steps ('' for none; default: %(default)s)",
    )
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    args = parser.parse_args()
    if "prepare" in args.stages:
        prepare(args.work)
    lock = args.lock or None
    if "mine" in args.stages:
        run_all(args.work, mine_jobs(args.work), lock)
    if "train" in args.stages:
        for name in RUNS:  # one lock hold per run, so other jobs can go in between
            run_all(args.work, train_jobs(args.work, name), lock)
    if "eval" in args.stages:
        run_all(args.work, eval_jobs(args.work), lock)
    if "report" in args.stages:
        report(args.work, lock)


if __name__ == "__main__":
    main()
