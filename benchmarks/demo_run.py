"""Time ``peg-rag demo`` end to end, offline, and record its hit@5 in RESULTS.md.

Each repeat runs the real command in a fresh process with no network (HF_HUB_OFFLINE=1)
and an empty Hugging Face cache, so the demo takes its fallback path: it trains the small
model on the knowledge base, indexes and answers all 90 sample questions. Then the same
command again on the warm cache (model and index reused), and, side by side, the demo with
a pretrained model given with --model (``../shared/models/me5-small-zh`` by default).

    python benchmarks/demo_run.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import header, update_section

ROOT = Path(__file__).resolve().parents[1]
HIT = re.compile(r"^  (hybrid|dense|bm25)\s+([\d.]+)%$", re.MULTILINE)
LIMIT_S = 300  # the budget for the fallback path on 2 CPU cores


def run_demo(args: list[str], cache: Path, hf_home: Path) -> tuple[float, dict[str, float]]:
    """Wall seconds and hit@5 per method of one ``peg-rag demo`` process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    env.pop("PEG_RAG_MODEL", None)
    command = [sys.executable, "-m", "peg_rag.cli", "demo", "--cache-dir", str(cache), *args]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode:
        tail = f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        raise RuntimeError(f"{' '.join(command)} failed:\n{tail}")
    hits = {method: float(value) for method, value in HIT.findall(done.stdout)}
    if set(hits) != {"hybrid", "dense", "bm25"}:
        raise RuntimeError(f"no hit@5 lines in the output:\n{done.stdout[-2000:]}")
    return seconds, hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pretrained", default=str(ROOT.parent / "shared/models/me5-small-zh"))
    options = parser.parse_args()

    rows: dict[str, list[tuple[float, dict[str, float]]]] = {}
    for _ in range(options.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cache, hf_home = Path(tmp) / "peg-rag", Path(tmp) / "hf"
            hf_home.mkdir()
            rows.setdefault("fallback, fresh cache (trains the model)", []).append(
                run_demo([], cache, hf_home)
            )
            rows.setdefault("fallback, warm cache (model and index reused)", []).append(
                run_demo([], cache, hf_home)
            )
            if Path(options.pretrained).is_dir():
                rows.setdefault(f"--model {Path(options.pretrained).name}", []).append(
                    run_demo(["--model", options.pretrained], cache, hf_home)
                )

    fresh = statistics.median(s for s, _ in rows["fallback, fresh cache (trains the model)"])
    lines = [
        "| run | median wall s (runs) | vs fresh fallback | hit@5 hybrid | dense | BM25 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, runs in rows.items():
        seconds = statistics.median(s for s, _ in runs)
        hits = {m: statistics.median(h[m] for _, h in runs) for m in ("hybrid", "dense", "bm25")}
        lines.append(
            f"| {name} | {seconds:.1f} ({', '.join(f'{s:.0f}' for s, _ in runs)}) | "
            f"{seconds / fresh:.2f}x | {hits['hybrid']:.1f}% | {hits['dense']:.1f}% | "
            f"{hits['bm25']:.1f}% |"
        )
    verdict = "within" if fresh < LIMIT_S else "OVER"
    body = (
        header("Integrations and demo (issue 6): `peg-rag demo` run time and hit@5")
        + f"- Setup: `peg-rag demo` in a fresh process, HF_HUB_OFFLINE=1, empty HF_HOME and "
        f"peg-rag cache, 2 torch threads; 300 passages, 90 questions, k=5; "
        f"{options.repeats} repeats\n"
        + f"- Fresh fallback path: median {fresh:.0f} s, {verdict} the {LIMIT_S} s budget\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print(body)
    update_section("demo_run", body)


if __name__ == "__main__":
    main()
