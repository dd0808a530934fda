"""Fine-tuning without forgetting (issue 15): the in-domain gain of run C against what it
loses on sources it never trained on, with anchoring during training and with merging into
the base model afterwards. One command, resumable, sized for 2 cores.

    python benchmarks/forgetting_study.py [--work DIR] [--lock FILE] [--stages ...]
    python benchmarks/forgetting_study.py --smoke     # the whole pipeline, tiny, a few minutes

``--work`` defaults to ``bench/forgetting`` in peg-rag's cache directory; ``--lock`` as in
reproduce_peg.py. Stages, each skipped where its output exists (a killed training run resumes
from its last checkpoint); about 9 hours on 2 cores (4 runs of 50 minutes to 2 hours, the
auto searches of 45 and 16 minutes, and up to 10 models to evaluate at about 22 minutes each):

1. ``prepare``: reproduce_peg.py's subsample and validation sets without the LEFT_OUT
   sources, and one held-out retrieval set per left-out source, in BEIR layout:
   - ``heldout-drcd``: HELD_QUERIES questions against every distinct passage of drcd
     (Traditional Chinese Wikipedia);
   - ``heldout-paraphrase-finance``: a query against all distinct texts of the source (the
     sampled queries' own texts left out), its paraphrases relevant.
2. ``mine``: reproduce_peg.py's mining of the remaining sources.
3. ``train``: RUNS: C (trainer/configs/ablation-c.yaml) as it is, with the embedding anchor at
   two weights, and with general-domain mixing (cmrc2018-trial, the general source left in
   training).
4. ``merge``: ``peg-rag merge BASE C`` with C's weight at 0.3, 0.5 and 0.7, ``auto`` on the
   held-out training queries (MERGE_QUERIES per source, every training source), and
   ``auto-all`` on those plus MERGE_QUERIES other queries of each left-out source.
5. ``eval``: per query nDCG@10 (dense, max length 512) on kuake-qtr-dev, cmedir-dev,
   cmrc2018-dev and the held-out-source sets, and stsb-zh's Spearman, for the base model and
   every model (study_eval.py); a model with the same weights as one evaluated before (auto
   choosing a given split) reuses its record.
6. ``report``: the table, paired-bootstrap 95% intervals against the base model, the goals
   and the recipe that meets them, ``benchmarks/forgetting_study.png`` and the "Forgetting
   (issue 15)" section of RESULTS.md (with ``--smoke``: both in the work folder).
"""

from __future__ import annotations

import functools
import hashlib
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import reproduce_peg as peg
import results_file
import study_eval as study
from results_file import header, update_section

from peg_rag.core.records import read_jsonl

STAGES = ("prepare", "mine", "train", "merge", "eval", "report")
LEFT_OUT = ("drcd", "paraphrase-finance")
HELD_QUERIES = 500
IN_DOMAIN = ("kuake-qtr-dev", "cmedir-dev")  # the goal's in-domain gain: their mean
GENERAL = "cmrc2018-trial"
# reproduce_peg.PLAN without LEFT_OUT; cmrc2018-trial gives 50 of its 1,000 lines to validation.
PLAN = {s: v for s, v in peg.PLAN.items() if s not in LEFT_OUT} | {GENERAL: (950, 0.4)}
VALIDATION = peg.VALIDATION | {GENERAL: 50}
RUNS = {
    "C": [],
    "C + anchor 1": ["--anchor-weight", "1"],
    "C + anchor 10": ["--anchor-weight", "10"],
    "C + mix 0.25": ["--mix-general", "0.25", "--general-sources", GENERAL],
}
# C's weight; the base model gets the rest. auto: validation on the training sources' held-out
# queries; auto-all: also on MERGE_QUERIES queries of each left-out source, none of them in its
# held-out set (what a user who also cares about those domains would set aside).
MERGES = ("0.3", "0.5", "0.7", "auto", "auto-all")
MERGE_QUERIES = 50
MERGE_DISTRACTORS = 1000  # auto-all: bounds the search's time on the large left-out corpora
# --smoke: small sources, a 1-layer model, 4 steps, evaluation on a few queries.
SMOKE_PLAN = {"kuake-qtr": (40, 1.0), "paraphrase-medical": (40, 1.0), GENERAL: (20, 1.0)}
SMOKE_VALIDATION = {"paraphrase-medical": 10, GENERAL: 5}
SMOKE_HELD = 10


def log(message: str) -> None:
    peg.log(f"forgetting_study: {message}")


def plan(smoke: bool) -> tuple[dict[str, tuple[int, float]], dict[str, int]]:
    return (SMOKE_PLAN, SMOKE_VALIDATION) if smoke else (PLAN, VALIDATION)


def heldout_sets(work: Path) -> dict[str, Path]:
    return {f"heldout-{s}": work / "data" / f"heldout-{s}" for s in LEFT_OUT}


# --- 1. prepare -----------------------------------------------------------------------


def heldout_set(
    work: Path, source: str, name: str, count: int, skip: frozenset[str] = frozenset()
) -> None:
    """Folder ``name``: ``count`` seeded queries of a left-out source (none of the ``skip``
    texts) against its distinct texts: drcd's passages, or every text of paraphrase-finance
    but the sampled queries' own."""
    lines = peg.merged_lines(source)
    candidates = [line for line in lines if line["query"] not in skip]
    held = random.Random(f"{peg.SEED}-{name}").sample(candidates, count)
    texts = [p for line in lines for p in line["pos"]]
    if source != "drcd":  # paraphrases: any text of the source may be a query's match
        asked = {peg.squeeze(line["query"]) for line in held}
        texts += [line["query"] for line in lines]
        texts = [t for t in texts if peg.squeeze(t) not in asked]
    corpus = {f"d{i}": text for i, text in enumerate(dict.fromkeys(texts))}
    kept = peg.write_validation(work / "data" / name, held, corpus)
    log(f"{name}: {kept} queries, {len(corpus)} documents")


def prepare(work: Path, smoke: bool) -> None:
    if (work / "data" / "prepared.json").exists():
        return
    for source in LEFT_OUT:
        heldout_set(work, source, f"heldout-{source}", SMOKE_HELD if smoke else HELD_QUERIES)
    peg.prepare(work, *plan(smoke))  # writes prepared.json last


# --- 2. mine and 3. train -------------------------------------------------------------


def mine_jobs(work: Path, smoke: bool) -> list[peg.Job]:
    data, jobs = work / "data", []
    for source in plan(smoke)[0]:
        target = data / "mined" / f"{source}.jsonl"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            lines, pool = data / "train" / f"{source}.jsonl", data / "pool" / f"{source}.jsonl"
            command = peg.mine_command(lines, target, pool, study.base_model(work, smoke))
            jobs.append((f"mine/{source}", command))
    return jobs


def train_job(work: Path, smoke: bool, run: str) -> list[peg.Job]:
    output = work / "runs" / study.folder_name(run)
    if (output / "model").is_dir():
        return []
    train_plan, validation = plan(smoke)
    command = peg.train_command(
        peg.config_path("c"),
        work / "data" / "mined",
        output,
        train_plan,
        study.base_model(work, smoke),
    )
    command += ["--eval-dirs", *peg.validation_sets(work, validation), *RUNS[run]]
    return [(f"train/{run}", command + (study.SMOKE_TRAIN if smoke else []))]


# --- 4. merge -------------------------------------------------------------------------


def leftout_validation(work: Path, smoke: bool) -> list[str]:
    """auto-all's extra folders, ``val-<source>``, written on first use."""
    folders = []
    for source in LEFT_OUT:
        folder = work / "data" / f"val-{source}"
        if not (folder / "qrels" / "test.tsv").is_file():
            queries = work / "data" / f"heldout-{source}" / "queries.jsonl"
            asked = frozenset(read_jsonl(queries, lambda record, _: record["text"]))
            count = SMOKE_VALIDATION[GENERAL] if smoke else MERGE_QUERIES
            heldout_set(work, source, folder.name, count, asked)
        folders.append(str(folder))
    return folders


def merge_jobs(work: Path, smoke: bool) -> list[peg.Job]:
    jobs = []
    tuned = work / "runs" / "C" / "model"
    for weight in MERGES:
        output = model_path(work, smoke, f"merge {weight}")
        if output.is_dir():
            continue
        automatic = weight.startswith("auto")
        weights = ["auto"] if automatic else [f"{1 - float(weight):g}", weight]
        command = [peg.PEG_RAG, "merge", str(study.base_model(work, smoke)), str(tuned)]
        command += ["--weights", *weights, "--output", str(output)]
        if automatic:
            folders = [f for f in peg.validation_sets(work, plan(smoke)[1]) if "val-" in f]
            if weight == "auto-all":
                folders += leftout_validation(work, smoke)
                command += ["--max-distractors", str(MERGE_DISTRACTORS)]
            command += ["--validation", *folders, "--max-queries", str(MERGE_QUERIES)]
            command += ["--max-length", str(peg.MAX_LENGTH)]
        jobs.append((f"merge/{weight}", command))
    return jobs


# --- 5. eval --------------------------------------------------------------------------


def model_names() -> list[str]:
    return ["base", *RUNS, *(f"merge {w}" for w in MERGES)]


def model_path(work: Path, smoke: bool, name: str) -> Path:
    if name == "base":
        return study.base_model(work, smoke)
    if name.startswith("merge"):
        return work / "merged" / study.folder_name(name)
    return work / "runs" / study.folder_name(name) / "model"


def eval_sets(work: Path) -> dict[str, Path]:
    return {name: peg.EVAL / name for name in peg.RETRIEVAL_SETS} | heldout_sets(work)


def eval_jobs(work: Path, smoke: bool) -> list[peg.Job]:
    jobs = []
    for name in model_names():
        if (work / "eval" / f"{study.folder_name(name)}.json").exists():
            continue
        command = [sys.executable, str(Path(__file__).resolve()), "--work", str(work)]
        command += ["--evaluate", name, *(["--smoke"] if smoke else [])]
        jobs.append((f"eval/{name}", command))
    return jobs


@functools.cache
def weights_digest(model: Path) -> str | None:
    """sha256 of a model's weights file (None without one); each file is read once."""
    weights = model / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None


def twin(work: Path, smoke: bool, name: str) -> str | None:
    """The first model before NAME in ``model_names()`` whose weights file is byte-identical
    (``auto`` may choose one of the given splits), or None. Evaluating a twin again would
    repeat a record."""
    digest = weights_digest(model_path(work, smoke, name))
    names = model_names()
    earlier = names[: names.index(name)]
    same = (n for n in earlier if digest and weights_digest(model_path(work, smoke, n)) == digest)
    return next(same, None)


def evaluate(work: Path, smoke: bool, name: str) -> None:
    same = twin(work, smoke, name)
    done = work / "eval" / f"{study.folder_name(same)}.json" if same else None
    if done is not None and done.is_file():
        shutil.copyfile(done, work / "eval" / f"{study.folder_name(name)}.json")
        log(f"{name} has the same weights as {same}: its evaluation is reused")
        return
    study.evaluate(
        model_path(work, smoke, name),
        eval_sets(work),
        peg.EVAL / "stsb-zh" / "pairs.tsv",
        work / "eval" / f"{study.folder_name(name)}.json",
        max_length=128 if smoke else peg.EVAL_LENGTH,
        smoke=study.SMOKE_EVAL if smoke else None,
    )


# --- 6. report ------------------------------------------------------------------------


def report(work: Path, smoke: bool) -> None:
    evals = {n: study.load(work / "eval" / f"{study.folder_name(n)}.json") for n in model_names()}
    sets = [*eval_sets(work), study.STSB]
    base = evals["base"]

    def gain(name: str) -> float:
        """Mean in-domain nDCG@10 over the base model's."""
        return sum(study.ndcg(evals[name], s) - study.ndcg(base, s) for s in IN_DOMAIN) / 2

    def kept(name: str) -> float:
        """The share of C's in-domain gain kept (0 when C gained nothing)."""
        return gain(name) / gain("C") if gain("C") > 0 else 0.0

    def worst(name: str) -> tuple[float, str]:
        """The largest drop below the base model on a held-out-source set."""
        drops = {s: study.ndcg(evals[name], s) - study.ndcg(base, s) for s in heldout_sets(work)}
        found = min(drops, key=drops.__getitem__)
        return drops[found], found

    table = ["| model | " + " | ".join(sets) + " | in-domain gain | kept of C's |"]
    table.append("| --- | " + " | ".join("---:" for _ in sets) + " | ---: | ---: |")
    for name, record in evals.items():
        cells = [f"{study.headline(record, s):.2f}" for s in sets]
        if name != "base":
            cells = [
                f"{c} ({study.headline(record, s) - study.headline(base, s):+.2f})"
                for c, s in zip(cells, sets, strict=True)
            ]
        share = f"{100 * kept(name):.1f}%" if name != "base" else "-"  # 79.9% is not 80%
        table.append(f"| {name} | " + " | ".join(cells) + f" | {gain(name):+.2f} | {share} |")
    intervals = ["| model - base | " + " | ".join(sets) + " |"]
    intervals.append("| --- | " + " | ".join("---:" for _ in sets) + " |")
    for name in model_names()[1:]:
        cells = [study.interval(study.difference(evals[name], base, s)) for s in sets]
        intervals.append(f"| {name} | " + " | ".join(cells) + " |")
    meets = [n for n in model_names()[1:] if kept(n) >= 0.8 and worst(n)[0] >= -0.5]
    recommended = max(meets, key=gain) if meets else None
    goals = [
        f"- {name}: keeps {100 * kept(name):.1f}% of C's in-domain gain (goal >= "
        f"80%), largest held-out-source drop {worst(name)[0]:+.2f} on {worst(name)[1]} (goal "
        ">= -0.50): " + ("**meets both**" if name in meets else "**misses**")
        for name in model_names()[1:]
    ]
    same_as = {name: twin(work, smoke, name) for name in model_names()}
    plot_file = (
        work / "forgetting_study.png" if smoke else Path(__file__).with_name("forgetting_study.png")
    )
    labels: dict[str, str] = {}  # twins share one point, not two labels printed over each other
    for name in model_names()[1:]:
        point = same_as[name] or name  # may be the base model
        labels[point] = f"{labels.get(point, point)} = {name}" if point != name else name
    plot(labels, gain, lambda n: worst(n)[0], plot_file)
    body = "\n".join(
        [
            header("Forgetting (issue 15): in-domain gain against held-out sources"),
            f"- Recipe: `python benchmarks/forgetting_study.py` (scratch files in `{work}`): "
            f"the PEG ablation's data and run C (ablation-c.yaml) without the sources "
            f"{', '.join(LEFT_OUT)}, which become held-out retrieval sets "
            f"({HELD_QUERIES} queries each); {GENERAL} is the general source left in training.",
            "- Anchoring: " + "; ".join(f"{n}: `{' '.join(f)}`" for n, f in RUNS.items() if f),
            f"- Merges: `peg-rag merge BASE C --weights {{1 - w}} {{w}}` for w in "
            f"{', '.join(w for w in MERGES if not w.startswith('auto'))}; "
            "`--weights auto` on the held-out training queries "
            f"({MERGE_QUERIES} per source); auto-all: the same, plus {MERGE_QUERIES} queries of "
            "each left-out source that are not in its held-out set (`val-<source>`), with "
            f"`--max-distractors {MERGE_DISTRACTORS}`.",
            *(
                f"- {name} has the same weights as {same}; its evaluation is that model's."
                for name, same in same_as.items()
                if same
            ),
            f"- Intervals: paired bootstrap, {study.BOOTSTRAP_DRAWS} draws of the queries, 95%.",
            "",
            "nDCG@10 x 100 (dense, max length 512; change vs base), stsb-zh Spearman x 100:",
            "",
            *table,
            "",
            "Differences from the base model, with 95% intervals:",
            "",
            *intervals,
            "",
            "Goals:",
            "",
            *goals,
            "",
            f"Recommended: **{recommended}**"
            if recommended
            else "Recommended: **none meets both goals**",
            "",
            "![forgetting study](forgetting_study.png)",
        ]
    )
    if smoke:
        results_file.RESULTS = work / "RESULTS.md"
    update_section("forgetting_study", body)


def plot(
    labels: dict[str, str],
    gain: Callable[[str], float],
    drop: Callable[[str], float],
    target: Path,
) -> None:
    """Each model's in-domain gain against its largest held-out-source drop; ``labels`` maps
    the models to plot to their labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 5))
    for name, label in labels.items():
        axis.scatter(drop(name), gain(name))
        axis.annotate(label, (drop(name), gain(name)), fontsize=8)
    axis.axvline(-0.5, color="grey", linestyle="--", linewidth=0.8)
    axis.axhline(0.8 * gain("C"), color="grey", linestyle="--", linewidth=0.8)
    axis.set_xlabel("largest held-out-source change vs base (nDCG@10 x 100)")
    axis.set_ylabel("in-domain gain vs base (mean kuake-qtr-dev, cmedir-dev)")
    axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def main() -> None:
    args, work = study.study_arguments(__doc__, STAGES, "forgetting")
    lock = args.lock
    if args.evaluate:
        evaluate(work, args.smoke, args.evaluate)
        return
    if "prepare" in args.stages:
        prepare(work, args.smoke)
    if "mine" in args.stages:
        peg.run_all(work, mine_jobs(work, args.smoke), lock)
    if "train" in args.stages:
        for run in RUNS:  # one lock hold per run, so other jobs can go in between
            peg.run_all(work, train_job(work, args.smoke, run), lock)
    if "merge" in args.stages:
        peg.run_all(work, merge_jobs(work, args.smoke), lock)
    if "eval" in args.stages:
        peg.run_all(work, eval_jobs(work, args.smoke), lock)
    if "report" in args.stages:
        report(work, args.smoke)


if __name__ == "__main__":
    main()
