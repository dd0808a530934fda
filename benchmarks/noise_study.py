"""The noisy-label study (issue 14): which reading of progressive learning resists label noise,
and what a reranker's guard and distillation add. One command, resumable, sized for 2 cores.

    python benchmarks/noise_study.py [--work DIR] [--lock FILE] [--stages ...] [--runs ...]
    python benchmarks/noise_study.py --smoke     # the whole pipeline, tiny, a few minutes

``--work`` (scratch files) defaults to ``bench/noise`` in peg-rag's cache directory; ``--lock``
as in reproduce_peg.py. About 8 hours on 2 cores, measured with nothing else running: 7 C runs
of ~34 minutes (each step embeds 448 texts), 2 A runs of ~13, 2 reranker runs of ~70, 10
evaluations of ~4.5, mining and scoring.

That is more than one session on a machine that keeps nothing between sessions, so finished
work goes into a ledger in git, ``benchmarks/noise_runs/`` (with ``--smoke``, in the work
folder), and whatever it holds is skipped: a model's evaluation, and each training folder as
text keys and teacher scores (the data itself stays out of git). ``--runs`` picks what to do
(in that order; default: everything), so that a session can choose what fits its time.

1. ``prepare``: reproduce_peg.py's training subsample and held-out validation sets, and a
   noisy copy of the lines: for NOISE (40%) of the queries, drawn with a seed per query text,
   the positives are replaced by those of a random other line of the same source. The draw
   depends only on the text, so the teacher's subsample of a source gets the same noise.
   ``data/noise.json`` lists the corrupted lines' queries.
2. ``runs``: for each of ``base`` and RUNS, its training data, its training and its
   evaluation, recorded in the ledger. The training data:
   - ``mined-clean`` and ``mined-noisy``: ``peg-rag mine`` with the base model as in
     reproduce_peg.py;
   - ``scored-guarded`` (and ``mined-guarded``, the same lines without scores): the noisy
     teacher, reproduce_reranker.py's recipe in ``teacher-noisy/`` with its training and
     held-out lines corrupted the same way (it never sees the truth), guards the mining of
     the noisy lines (its default rule: drop candidates it scores above the line's
     positive), then scores them (``peg-rag score``, ONNX Runtime int8);
   - ``scored-clean``: the clean teacher (``teacher-clean/``) scores ``mined-clean``.
   Runs train from trainer/configs/ablation-a.yaml (A) and ablation-c.yaml (C); each logs
   its lines' weights and p_positive (``log_line_weights``), from which the ledger keeps the
   AUC at flagging the corrupted lines. "C-best" is the C weighting whose noisy run ends with
   the higher mean nDCG@10 on the held-out validation queries (clean labels: a small leak of
   the truth, limited to this one choice). An evaluation is per query nDCG@10 (dense, max
   length 512) on kuake-qtr-dev, cmedir-dev and cmrc2018-dev, and per pair cosines on stsb-zh.
3. ``report``: from the ledger, the table, paired-bootstrap 95% intervals of the differences,
   the AUCs, wall times, ``benchmarks/noise_study.png`` and the "Noisy labels (issue 14)"
   section of RESULTS.md (with ``--smoke``: both in the work folder).
"""

from __future__ import annotations

import hashlib
import random
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import reproduce_peg as peg
import reproduce_reranker as teacher_recipe
import results_file
import study_eval as study
from results_file import header, update_section

from peg_rag.core.files import read_json, write_json
from peg_rag.core.records import read_jsonl
from peg_rag.trainer.mine import read_corpus

NOISE = 0.4
LEDGER = Path(__file__).with_name("noise_runs")
STAGES = ("prepare", "runs", "report")
RETRIEVAL_SETS = peg.RETRIEVAL_SETS
QUALITY = ("kuake-qtr-dev", "cmedir-dev")  # the robustness goal: their mean nDCG@10
DISTILL = ["--distill-weight", "1.0"]  # teacher_temperature: the trainer's default (1.0)
# Runs: name -> (training data folder under data/, config, extra flags). "C-best" runs take
# the winning weighting's flags, known once both noisy C runs are trained.
WEIGHTINGS = {"C-focal": ["--weighting", "focal"], "C-self": ["--weighting", "self_paced"]}
RUNS = {
    "clean A": ("mined-clean", "a", []),
    "clean C-focal": ("mined-clean", "c", WEIGHTINGS["C-focal"]),
    "clean C-self": ("mined-clean", "c", WEIGHTINGS["C-self"]),
    "noisy A": ("mined-noisy", "a", []),
    "noisy C-focal": ("mined-noisy", "c", WEIGHTINGS["C-focal"]),
    "noisy C-self": ("mined-noisy", "c", WEIGHTINGS["C-self"]),
    "noisy C-best + guard": ("mined-guarded", "c", ["best"]),
    "noisy C-best + guard + distill": ("scored-guarded", "c", ["best", *DISTILL]),
    "clean C-best + distill": ("scored-clean", "c", ["best", *DISTILL]),
}
# --smoke: two small sources, a 1-layer model, 4 steps, evaluation on a few queries.
SMOKE_PLAN = {"kuake-qtr": (40, 1.0), "paraphrase-medical": (40, 1.0)}
SMOKE_VALIDATION = {"paraphrase-medical": 10}


def log(message: str) -> None:
    peg.log(f"noise_study: {message}")


def plan(smoke: bool) -> tuple[dict[str, tuple[int, float]], dict[str, int]]:
    return (SMOKE_PLAN, SMOKE_VALIDATION) if smoke else (peg.PLAN, peg.VALIDATION)


# --- 1. prepare -----------------------------------------------------------------------


def noisy_positives(source: str, query: str, lines: list[dict]) -> list[str] | None:
    """The positives this query gets under noise (another line's, from the same source), or
    None when its seeded draw leaves it clean. Depends only on (source, query)."""
    rng = random.Random(f"{peg.SEED}-noise-{source}-{query}")
    if rng.random() >= NOISE:
        return None
    while True:
        donor = rng.choice(lines)
        if donor["query"] != query:
            return donor["pos"]


def corrupt_files(files: list[Path], sources: dict[str, list[dict]]) -> dict[str, list[str]]:
    """Rewrite each JSONL file of lines with its corrupted lines' positives replaced; returns
    {file name: the corrupted lines' queries}. Rewriting twice gives the same files."""
    corrupted = {}
    for path in files:
        lines = read_lines(path)
        hit = []
        for line in lines:
            swapped = noisy_positives(path.stem, line["query"], sources[path.stem])
            if swapped is not None:
                line["pos"] = swapped
                hit.append(line["query"])
        peg.write_jsonl(path, lines)
        corrupted[path.name] = hit
    return corrupted


def read_lines(path: Path) -> list[dict]:
    return list(read_jsonl(path, lambda record, _: record))


def source_lines(names: list[str]) -> dict[str, list[dict]]:
    return {name: peg.merged_lines(name) for name in names}


def prepare(work: Path, smoke: bool) -> None:
    """Clean subsample, validation sets and pools (reproduce_peg.py), then the noisy copy."""
    data = work / "data"
    if (data / "noise.json").exists():
        return
    train_plan, validation = plan(smoke)
    peg.prepare(work, train_plan, validation)
    noisy = data / "noisy"
    noisy.mkdir(parents=True, exist_ok=True)
    for source in train_plan:
        (noisy / f"{source}.jsonl").write_bytes((data / "train" / f"{source}.jsonl").read_bytes())
    files = sorted(noisy.glob("*.jsonl"))
    corrupted = corrupt_files(files, source_lines(list(train_plan)))
    write_json(data / "noise.json", {"noise": NOISE, "corrupted": corrupted}, indent=None)
    for name, hit in corrupted.items():
        lines = len((noisy / name).read_text(encoding="utf-8").splitlines())
        log(f"{name}: {len(hit)} of {lines} lines corrupted")


# --- 2. teacher -----------------------------------------------------------------------


def teacher_name(noisy: bool) -> str:
    return "teacher-noisy" if noisy else "teacher-clean"


def teacher_dir(work: Path, noisy: bool) -> Path:
    return work / teacher_name(noisy)


def train_teacher(work: Path, smoke: bool, noisy: bool, lock: str | None) -> None:
    """reproduce_reranker.py's prepare, mine and train in the teacher's folder; the noisy
    teacher's training and held-out lines are corrupted before mining."""
    folder = teacher_dir(work, noisy)
    teacher_recipe.prepare(folder, smoke)
    marker = folder / "data" / "noise.json"
    if noisy and not marker.exists():
        files = sorted((folder / "data" / "train").glob("*.jsonl"))
        files += sorted((folder / "data" / "held").glob("*.jsonl"))
        corrupted = corrupt_files(files, source_lines(sorted({f.stem for f in files})))
        write_json(marker, {"noise": NOISE, "corrupted": corrupted}, indent=None)
    peg.run_all(folder, teacher_recipe.mine_jobs(folder, smoke), lock)
    peg.run_all(folder, teacher_recipe.train_jobs(folder, smoke), lock)


def teacher_model(work: Path, noisy: bool) -> Path:
    return teacher_recipe.reranker_dir(teacher_dir(work, noisy))


# --- 3. training data ----------------------------------------------------------------

# Mined folders: (lines mined, guarded by the noisy teacher).
MINED = {"mined-clean": ("train", False), "mined-noisy": ("noisy", False)}
MINED["mined-guarded"] = ("noisy", True)
# Each training folder is made once and recorded in the ledger, which later sessions rebuild
# it from: the guarded lines come from the record of their scored copy.
RECORDS = ("mined-clean", "mined-noisy", "scored-guarded", "scored-clean")
# Scored folders: (the mined folder their teacher scores, noisy teacher).
SCORED = {"scored-guarded": ("mined-guarded", True), "scored-clean": ("mined-clean", False)}
TEACHER_RECORDS = tuple(SCORED)


def record_name(folder: str) -> str:
    return "scored-guarded" if folder == "mined-guarded" else folder


def lines_folder(folder: str) -> str:
    """The prepared lines ("train" or "noisy") that a training folder was mined from."""
    return MINED[SCORED[folder][0] if folder in SCORED else folder][0]


def mine_jobs(work: Path, smoke: bool, target: str) -> list[peg.Job]:
    """``peg-rag mine`` with the base model of each source into data/TARGET."""
    data, (lines, guarded) = work / "data", MINED[target]
    model = study.base_model(work, smoke)
    extra = ["--reranker", str(teacher_model(work, noisy=True))] if guarded else []
    jobs = []
    for source in plan(smoke)[0]:
        out = data / target / f"{source}.jsonl"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            pool = data / "pool" / f"{source}.jsonl"
            command = peg.mine_command(data / lines / f"{source}.jsonl", out, pool, model)
            jobs.append((f"mine/{target}/{source}", command + extra))
    return jobs


def score_jobs(work: Path, target: str) -> list[peg.Job]:
    """``peg-rag score`` (ONNX Runtime int8) of SCORED[target]'s mined lines by its teacher."""
    data, (mined, noisy) = work / "data", SCORED[target]
    jobs = []
    for path in sorted((data / mined).glob("*.jsonl")):
        out = data / target / path.name
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            command = [peg.PEG_RAG, "score", str(path), "--output", str(out)]
            command += ["--reranker", str(teacher_model(work, noisy))]
            command += ["--backend", "onnx", "--quantize", "int8"]
            jobs.append((f"score/{target}/{path.stem}", command))
    return jobs


def make_data(work: Path, smoke: bool, record: str, lock: str | None) -> None:
    """data/RECORD as the recipe makes it: mined, or mined and scored by a teacher."""
    if record in MINED:
        peg.run_all(work, mine_jobs(work, smoke, record), lock)
        return
    mined, noisy = SCORED[record]
    if not noisy:
        training_data(work, smoke, mined, lock)
    train_teacher(work, smoke, noisy, lock)
    peg.run_all(work, mine_jobs(work, smoke, mined), lock)
    peg.run_all(work, score_jobs(work, record), lock)


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def pack(path: Path) -> dict[str, list]:
    """A made file without its texts: each line's negatives as text keys, and its teacher
    scores when it has them."""
    lines = read_lines(path)
    packed = {"neg": [[text_key(t) for t in line["neg"]] for line in lines]}
    for field in ("pos_scores", "neg_scores"):
        if field in lines[0]:
            packed[field] = [line[field] for line in lines]
    return packed


def unpack(work: Path, folder: str, source: str, packed: dict[str, list]) -> list[dict]:
    """The lines of data/FOLDER that ``pack`` packed, from the lines they were mined from and
    the source's pool (``prepare`` makes both the same in every session); with their scores
    in a scored folder."""
    data = work / "data"
    lines = read_lines(data / lines_folder(folder) / f"{source}.jsonl")
    texts = read_corpus([data / "pool" / f"{source}.jsonl"])
    by_key = {text_key(t): t for t in [*texts, *(t for x in lines for t in x["pos"] + x["neg"])]}
    fields = [f for f in ("pos_scores", "neg_scores") if f in packed and folder in SCORED]
    return [
        {**line, "neg": [by_key[k] for k in packed["neg"][n]], **{f: packed[f][n] for f in fields}}
        for n, line in enumerate(lines)
    ]


def record_data(work: Path, smoke: bool, record: str, lock: str | None) -> None:
    """Make data/RECORD and write its ledger record (``pack``; no text, as the data stays
    out of git), after checking that it rebuilds the files exactly."""
    make_data(work, smoke, record, lock)
    made = work / "data" / record
    files = {p.stem: pack(p) for p in sorted(made.glob("*.jsonl"))}
    for source, packed in files.items():
        if unpack(work, record, source, packed) != read_lines(made / f"{source}.jsonl"):
            raise RuntimeError(f"{record}/{source}.jsonl: its packed lines rebuild differently")
    found: dict = {"files": files}
    if record in SCORED:  # the teacher's wall times and validation, for the report
        teacher = teacher_dir(work, SCORED[record][1])
        output = teacher / "runs" / "reranker"
        best = output / "best-model" / "best.json"
        found["teacher"] = {
            "seconds": timings(teacher),
            "validation": last_evaluation(output / "log.jsonl"),
            "best": read_json(best) if best.exists() else None,
        }
    write_json(ledger(work, smoke) / f"{record}.json", found, indent=None)


def training_data(work: Path, smoke: bool, folder: str, lock: str | None) -> None:
    """data/FOLDER, rebuilt from its ledger record; made and recorded first when no session
    has recorded it."""
    record = record_name(folder)
    path = ledger(work, smoke) / f"{record}.json"
    if not path.exists():
        record_data(work, smoke, record, lock)
    for source, packed in read_json(path)["files"].items():
        target = work / "data" / folder / f"{source}.jsonl"
        if not target.exists():
            peg.write_jsonl(target, unpack(work, folder, source, packed))


# --- 4. runs: train, evaluate, record -------------------------------------------------


def ledger(work: Path, smoke: bool) -> Path:
    """Where finished work is recorded: in git (benchmarks/noise_runs/), since the study
    spans sessions on machines that keep nothing; with --smoke, in the work folder."""
    return work / "noise_runs" if smoke else LEDGER


def last_evaluation(log_file: Path) -> dict[str, float]:
    """The metrics of a training log's last evaluation."""
    rows = [r for r in peg.read_log(log_file) if any(k.startswith("eval/") for k in r)]
    return {k: v for k, v in rows[-1].items() if k.startswith("eval/")}


def final_validation(work: Path, run: str) -> float:
    """Mean nDCG@10 over the validation sets at the run's last evaluation."""
    last = last_evaluation(work / "runs" / study.folder_name(run) / "log.jsonl")
    values = [v for k, v in last.items() if k.startswith("eval/val-") and k.endswith("ndcg@10")]
    return sum(values) / len(values)


def read_records(records: Path, names: list[str], needed_by: str) -> dict[str, dict]:
    """The ledger records of NAMES, or an error naming those not recorded yet."""
    paths = {name: records / f"{study.folder_name(name)}.json" for name in names}
    missing = [name for name, path in paths.items() if not path.exists()]
    if missing:
        raise RuntimeError(f"{needed_by} needs {', '.join(missing)} first (not in {records})")
    return {name: read_json(path) for name, path in paths.items()}


def best_weighting(found: dict[str, dict]) -> str:
    """The C weighting (a key of WEIGHTINGS) whose noisy run (its record in FOUND) scores
    higher on the held-out validation queries."""
    return max(WEIGHTINGS, key=lambda name: found[f"noisy {name}"]["validation"])


def train_job(work: Path, smoke: bool, run: str) -> list[peg.Job]:
    output = work / "runs" / study.folder_name(run)
    if (output / "model").is_dir():
        return []
    folder, config, extra = RUNS[run]
    if "best" in extra:
        noisy_c = [f"noisy {name}" for name in WEIGHTINGS]
        best = best_weighting(read_records(ledger(work, smoke), noisy_c, run))
        extra = [*WEIGHTINGS[best], *[e for e in extra if e != "best"]]
    command = peg.train_command(
        peg.config_path(config),
        work / "data" / folder,
        output,
        plan(smoke)[0],
        study.base_model(work, smoke),
    )
    command += ["--eval-dirs", *peg.validation_sets(work, plan(smoke)[1])]
    command += ["--log-line-weights", str(output / "line_weights.jsonl"), *extra]
    return [(f"train/{run}", command + (study.SMOKE_TRAIN if smoke else []))]


def model_path(work: Path, smoke: bool, name: str) -> Path:
    if name == "base":
        return study.base_model(work, smoke)
    return work / "runs" / study.folder_name(name) / "model"


def evaluate(work: Path, smoke: bool, name: str) -> None:
    """work/eval/NAME.json (study_eval.evaluate) of the base model or a run."""
    study.evaluate(
        model_path(work, smoke, name),
        {set_name: peg.EVAL / set_name for set_name in RETRIEVAL_SETS},
        peg.EVAL / "stsb-zh" / "pairs.tsv",
        work / "eval" / f"{study.folder_name(name)}.json",
        max_length=128 if smoke else peg.EVAL_LENGTH,
        smoke=study.SMOKE_EVAL if smoke else None,
    )


def rounded(value):
    """``value`` with its floats to 6 places: the ledger stays small, the intervals equal."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def run_model(work: Path, smoke: bool, name: str, lock: str | None) -> None:
    """Train a run (its data first), evaluate it (or the base model), and record both in
    the ledger; skipped when the ledger has it. An evaluation newer than the model's weights
    (a session that ended before recording it) is recorded as it is."""
    target = ledger(work, smoke) / f"{study.folder_name(name)}.json"
    if target.exists():
        return
    if name != "base":
        training_data(work, smoke, RUNS[name][0], lock)
        peg.run_all(work, train_job(work, smoke, name), lock)
    evaluation = work / "eval" / f"{study.folder_name(name)}.json"
    weights = model_path(work, smoke, name) / "model.safetensors"
    if not evaluation.exists() or evaluation.stat().st_mtime < weights.stat().st_mtime:
        command = [sys.executable, str(Path(__file__).resolve()), "--work", str(work)]
        command += ["--evaluate", name, *(["--smoke"] if smoke else [])]
        peg.run_all(work, [(f"eval/{name}", command)], lock)
    record = {"eval": study.load(evaluation)}
    jobs = (f"train/{name}", f"eval/{name}")
    record["seconds"] = {k: v for k, v in timings(work).items() if k in jobs}
    if name != "base":
        record["validation"] = final_validation(work, name)
    if name.startswith("noisy"):
        record["auc"] = noise_auc(work, name)
    write_json(target, rounded(record), indent=None)


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half: every pair compared."""
    high, low = scores[positive][:, None], scores[~positive][None, :]
    return float((high > low).mean() + 0.5 * (high == low).mean())


def noise_auc(work: Path, run: str) -> dict[str, float]:
    """How well a run's second-half weights (and its p_positive) flag the corrupted lines:
    AUC of "lower means corrupted", per line averaged over its rows with gamma past half of
    its final value (all rows for runs without weighting)."""
    corrupted = read_json(work / "data" / "noise.json")
    bad = set()  # (file name, line number) of the corrupted lines in the run's training files
    for path in sorted((work / "data" / RUNS[run][0]).glob("*.jsonl")):
        hits = set(corrupted["corrupted"][path.name])
        lines = enumerate(read_lines(path), 1)
        bad |= {(path.name, n) for n, line in lines if line["query"] in hits}
    rows = peg.read_log(work / "runs" / study.folder_name(run) / "line_weights.jsonl")
    last = {}  # a resumed run repeats steps: keep the last rows of each (step, line)
    for r in rows:
        last[(r["step"], r["file"], r["line"])] = r
    top = max(r["gamma"] for r in last.values())
    kept: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for r in last.values():
        if r["gamma"] >= top / 2:
            kept[(Path(r["file"]).name, r["line"])].append((r["weight"], r["p_positive"]))
    keys = sorted(kept)
    weight = np.array([np.mean([w for w, _ in kept[k]]) for k in keys])
    p = np.array([np.mean([q for _, q in kept[k]]) for k in keys])
    label = np.array([k in bad for k in keys])
    return {"weight": auc(-weight, label), "p_positive": auc(-p, label), "lines": len(keys)}


def timings(folder: Path) -> dict[str, float]:
    """Seconds per job of a folder's timings.json (peg.run_all)."""
    path = folder / "timings.json"
    found = read_json(path) if path.exists() else {}
    return {k: v["seconds"] for k, v in found.items()}


# --- 5. report ------------------------------------------------------------------------


def clean_counterpart(run: str, best: str) -> str:
    """The clean-data run that a noisy run is measured against: the same recipe less the
    guard, which only exists for noisy data ("noisy C-best + guard" -> the clean C-best)."""
    twin = run.replace("noisy", "clean", 1).replace(" + guard", "")
    return f"clean {best}" if twin == "clean C-best" else twin


# Differences the report gives with intervals: the readings against each other and against
# plain InfoNCE, the cost of the noise to each, then what the teacher's guard and
# distillation add. "C-best" is resolved to the winning weighting's run.
COMPARISONS = [
    ("noisy A", "clean A"),
    ("noisy C-focal", "clean C-focal"),
    ("noisy C-self", "clean C-self"),
    ("noisy C-focal", "noisy A"),
    ("noisy C-self", "noisy A"),
    ("noisy C-self", "noisy C-focal"),
    ("clean C-focal", "clean A"),
    ("clean C-self", "clean A"),
    ("noisy C-best + guard", "noisy C-best"),
    ("noisy C-best + guard + distill", "noisy C-best + guard"),
    ("noisy C-best + guard + distill", "noisy A"),
    ("noisy C-best + guard + distill", "clean C-best + distill"),
    ("clean C-best + distill", "clean C-best"),
]


def report(work: Path, smoke: bool) -> None:
    """The RESULTS.md section from the ledger alone (and data/noise.json, from prepare)."""
    records = ledger(work, smoke)
    found = read_records(records, ["base", *RUNS], "the report")
    teachers = read_records(records, list(TEACHER_RECORDS), "the report")
    evals = {name: record["eval"] for name, record in found.items()}
    walls = {k: v for record in found.values() for k, v in record["seconds"].items()}
    for name in TEACHER_RECORDS:
        noisy = SCORED[name][1]
        teacher = teachers[name]["teacher"]["seconds"]
        walls.update({f"{teacher_name(noisy)}/{k}": v for k, v in teacher.items()})
    best = best_weighting(found)
    resolve = {"noisy C-best": f"noisy {best}", "clean C-best": f"clean {best}"}

    def mean2(name: str) -> float:
        return sum(study.ndcg(evals[name], s) for s in QUALITY) / len(QUALITY)

    def compare(x: str, y: str, sets: tuple[str, ...] = QUALITY) -> study.Interval:
        x, y = resolve.get(x, x), resolve.get(y, y)
        if len(sets) == 1:  # one set: its own metric (Spearman for stsb-zh)
            return study.difference(evals[x], evals[y], sets[0])
        return study.paired_difference(evals[x], evals[y], sets)

    diffs = [
        "| difference | mean kuake+cmedir | " + " | ".join(RETRIEVAL_SETS) + " | stsb-zh |",
        "| --- | ---: | " + " | ".join("---:" for _ in RETRIEVAL_SETS) + " | ---: |",
    ]
    for x, y in COMPARISONS:
        sets = (QUALITY, *((s,) for s in (*RETRIEVAL_SETS, study.STSB)))
        cells = " | ".join(study.interval(compare(x, y, each)) for each in sets)
        diffs.append(f"| {x} - {resolve.get(y, y)} | {cells} |")
    prepared = read_json(work / "data" / "noise.json")
    noise_counts = ", ".join(
        f"{name.removesuffix('.jsonl')} {len(hit)}" for name, hit in prepared["corrupted"].items()
    )
    plot_file = work / "noise_study.png" if smoke else Path(__file__).with_name("noise_study.png")
    plot(evals, {n: r["auc"] for n, r in found.items() if "auc" in r}, mean2, plot_file)
    body = "\n".join(
        [
            header("Noisy labels (issue 14): progressive weighting, guard and distillation"),
            f"- Recipe: `python benchmarks/noise_study.py` (scratch files in `{work}`); "
            "data, base model and budget as in the PEG ablation (reproduce_peg.py, 162 steps "
            "of 64 queries; ablation-a.yaml is A, plain InfoNCE, and ablation-c.yaml is C, "
            "full PEG); teachers: reproduce_reranker.py's recipe, the noisy one trained on "
            "the same corrupted lines.",
            f"- Noise: {100 * NOISE:.0f}% of the queries (seeded per query text) get the "
            f"positives of another line of the same source, before mining; corrupted lines "
            f"per source: {noise_counts}.",
            f"- C-best: {best} ({' '.join(WEIGHTINGS[best])}), the better noisy C run on the "
            "held-out validation queries. Guard: the noisy teacher's default rule in "
            "`peg-rag mine --reranker` (drop candidates it scores above the line's "
            f"positive). Distillation: `{' '.join(DISTILL)}` with the teacher's raw logits "
            "(teacher_temperature 1.0).",
            "- Columns: nDCG@10 x 100 (dense, max length 512) and stsb-zh Spearman x 100; "
            "gain: the mean of kuake and cmedir over the base model's; kept: a noisy run's "
            "gain as a share of its clean counterpart's; validation: the trainer's last mean "
            "nDCG@10 on the held-out training queries (clean labels); AUC: how well a run's "
            "per-line weights, and its softmax probability of the labelled positive "
            "(`p_positive`), averaged over the second half of training, flag the corrupted "
            "lines as the lower ones (0.5 is chance; A's weights are all equal).",
            f"- Intervals: paired bootstrap, {study.BOOTSTRAP_DRAWS} draws of the queries "
            f"({study.BOOTSTRAP_DRAWS // 4} of the stsb-zh pairs), 95%.",
            "",
            *run_table(found, mean2, best),
            "",
            "Differences, x 100, with 95% intervals:",
            "",
            *diffs,
            "",
            "Goals:",
            "",
            *goal_lines(found, mean2, compare, best),
            "",
            "Wall times: " + "; ".join(f"{k} {v / 60:.1f} min" for k, v in walls.items()),
            "",
            "![noise study](noise_study.png)",
        ]
    )
    if smoke:
        results_file.RESULTS = work / "RESULTS.md"
    update_section("noise_study", body)


def kept_share(name: str, best: str, mean2: Callable[[str], float]) -> float | None:
    """A noisy run's gain over the base model as a share of its clean counterpart's; None
    for clean runs, or when the clean run gained nothing."""
    if not name.startswith("noisy"):
        return None
    clean_gain = mean2(clean_counterpart(name, best)) - mean2("base")
    return (mean2(name) - mean2("base")) / clean_gain if clean_gain > 0 else None


def run_table(found: dict[str, dict], mean2: Callable[[str], float], best: str) -> list[str]:
    """One row per run: scores, gain over the base model, share of the clean gain kept,
    validation, AUCs and training wall time."""
    rows = [
        "| run | " + " | ".join(RETRIEVAL_SETS) + " | stsb-zh | mean kuake+cmedir | gain | kept "
        "| validation | AUC of weights | AUC of p_positive | train |",
        "| --- |" + " ---: |" * (len(RETRIEVAL_SETS) + 8),
    ]
    for name, record in found.items():
        evals = record["eval"]
        gain = mean2(name) - mean2("base")
        kept = kept_share(name, best, mean2)
        auc = record.get("auc")
        wall = record["seconds"].get(f"train/{name}")
        cells = [f"{study.ndcg(evals, s):.2f}" for s in RETRIEVAL_SETS]
        cells += [f"{study.spearman(evals):.2f}", f"{mean2(name):.2f}", f"{gain:+.2f}"]
        cells += [
            "-" if kept is None else f"{100 * kept:.0f}%",
            f"{record['validation']:.3f}" if "validation" in record else "-",
            "-" if auc is None or name == "noisy A" else f"{auc['weight']:.3f}",
            "-" if auc is None else f"{auc['p_positive']:.3f} ({auc['lines']} lines)",
            f"{wall / 60:.1f} min" if wall else "-",
        ]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def goal_lines(
    found: dict[str, dict],
    mean2: Callable[[str], float],
    compare: Callable[..., study.Interval],
    best: str,
) -> list[str]:
    """The issue's three goals, each met or missed, from the ledger's numbers."""
    aucs = {name: found[f"noisy {name}"]["auc"]["weight"] for name in WEIGHTINGS}
    best_auc = max(aucs, key=lambda name: aucs[name])
    noisy_runs = [run for run in RUNS if run.startswith("noisy") and run != "noisy A"]
    winner = max(noisy_runs, key=mean2)
    robust = compare(winner, "noisy A")
    kept = kept_share(winner, best, mean2) or 0.0
    distill = compare("clean C-best + distill", "clean C-best", ("kuake-qtr-dev",))
    others = [
        compare("clean C-best + distill", "clean C-best", (s,))[0]
        for s in (*RETRIEVAL_SETS[1:], study.STSB)
    ]
    return [
        f"- Noise detection: best AUC of a weighting {aucs[best_auc]:.3f} ({best_auc}); focal "
        f"{aucs['C-focal']:.3f}; goal >= 0.8: "
        + ("**met**" if aucs[best_auc] >= 0.8 else "**missed**"),
        f"- Robustness: best noisy run ({winner}) - noisy A on mean kuake+cmedir: "
        f"{study.interval(robust)}; goal: the interval above 0: "
        + ("**met**" if robust[1] > 0 else "**missed**")
        + f". It keeps {100 * kept:.0f}% of its clean counterpart's "
        f"({clean_counterpart(winner, best)}) gain over the base model.",
        f"- Distillation on clean data: kuake-qtr-dev {study.interval(distill)} (goal >= +1.0), "
        f"largest loss elsewhere {min(others):+.2f} (goal >= -0.5): "
        + ("**met**" if distill[0] >= 1.0 and min(others) >= -0.5 else "**missed**"),
    ]


def plot(evals: dict, aucs: dict, mean2: Callable[[str], float], target: Path) -> None:
    """Mean kuake+cmedir nDCG@10 per run, and the noisy weighted runs' AUCs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(evals)
    colors = [
        "grey" if n == "base" else "tab:blue" if n.startswith("clean") else "tab:red" for n in names
    ]
    left.barh(names, [mean2(n) for n in names], color=colors)
    left.set_xlim(min(mean2(n) for n in names) - 2, max(mean2(n) for n in names) + 1)
    left.invert_yaxis()
    left.set_xlabel("mean nDCG@10 x 100, kuake-qtr-dev and cmedir-dev")
    runs = [r for r in aucs if r != "noisy A"]
    y = np.arange(len(runs))
    right.barh(y - 0.2, [aucs[r]["weight"] for r in runs], 0.4, label="its weights")
    right.barh(y + 0.2, [aucs[r]["p_positive"] for r in runs], 0.4, label="p_positive")
    right.set_yticks(y, runs)
    right.axvline(0.5, color="black", linewidth=0.8)
    right.invert_yaxis()
    right.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    right.set_xlabel("AUC at flagging the corrupted lines (0.5 = chance)")
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def main() -> None:
    units = ("base", *RUNS, *TEACHER_RECORDS)
    args, work = study.study_arguments(__doc__, STAGES, "noise", units)
    if args.evaluate:
        evaluate(work, args.smoke, args.evaluate)
        return
    if "prepare" in args.stages:
        prepare(work, args.smoke)
    if "runs" in args.stages:
        for name in args.runs:
            if name in TEACHER_RECORDS:
                training_data(work, args.smoke, name, args.lock)
            else:
                run_model(work, args.smoke, name, args.lock)
    if "report" in args.stages:
        report(work, args.smoke)


if __name__ == "__main__":
    main()
