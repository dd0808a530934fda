"""Start-up time: ``peg-rag --help`` and ``import peg_rag``, now and at an earlier commit.

Both versions are laid out as installed (.ci/installed_tree.py) in temporary folders and run
in fresh interpreters, interleaved, so they share the machine's state; medians are reported.
With ``--write`` the table goes into benchmarks/RESULTS.md.

    python benchmarks/startup_time.py --ref acb56ef [--repeats 9] [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import header, update_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".ci"))
from installed_tree import lay_out  # noqa: E402

CASES = {
    "peg-rag --help": "import sys; sys.argv = ['peg-rag', '--help']\n"
    "from peg_rag.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass",
    "import peg_rag": "import peg_rag",
}
HEAVY = ("torch", "transformers", "chromadb", "bm25s", "scipy", "jieba", "numpy", "tqdm")


def run_once(tree: Path, code: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def loaded(tree: Path, code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip().splitlines()[-1].split() if out.strip() else []


def checkout(ref: str, dest: Path) -> Path:
    """The tracked files of ``ref`` in ``dest`` (git archive: no worktree bookkeeping)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True
    ).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="acb56ef", help="earlier commit to compare with")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        trees = {}
        for label, repo in (
            (f"before ({args.ref})", checkout(args.ref, Path(work) / "old-src")),
            ("after (this tree)", REPO),
        ):
            trees[label] = Path(work) / label.split()[0]
            lay_out(trees[label], repo)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for label, tree in trees.items():
                for case, code in CASES.items():
                    times.setdefault((label, case), []).append(run_once(tree, code))
        rows = []
        for (label, case), values in times.items():
            heavy = ", ".join(loaded(trees[label], CASES[case])) or "none"
            rows.append(
                f"| {case} | {label} | {statistics.median(values):.2f} | "
                f"{min(values):.2f}-{max(values):.2f} | {heavy} |"
            )
    table = "\n".join(
        [
            "| command | version | median s | range s | heavy modules loaded |",
            "| --- | --- | ---: | ---: | --- |",
            *rows,
        ]
    )
    print(table)
    if args.write:
        update_section(
            "startup_time",
            header("Start-up time (issue 10)")
            + f"- Method: each version laid out as installed in a temporary folder; a fresh "
            f"interpreter per run, {args.repeats} interleaved repeats; wall seconds including "
            "the interpreter's own start.\n\n" + table,
        )


if __name__ == "__main__":
    main()
