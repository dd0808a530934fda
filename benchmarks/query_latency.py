"""Single short query latency in a quiet process, split into its parts.

encode_throughput.py times one query at a time with every encoder in turn, so ONNX Runtime's
spinning worker threads of one encoder take the cores from the next. Here one encoder runs
alone per process, and each query is timed in three parts:

- tokenize: prompt, validation and the tokenizer (``PEGEncoder.tokenize``);
- model: the forward pass (torch, or ONNX Runtime's ``session.run`` behind it);
- rest: everything else ``encode_queries`` does (sorting, padding, pooling, copies).

    python benchmarks/query_latency.py [--model DIR] [--queries 300]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from encode_throughput import short_queries

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SETUPS = {
    "torch fp32": {},
    "torch int8": {"quantize": "int8"},
    "onnx fp32": {"backend": "onnx"},
    "onnx int8": {"backend": "onnx", "quantize": "int8"},
}


def measure(model: Path, setup: str, queries: list[str]) -> dict[str, list[float]]:
    """Milliseconds per query for each part, after a warm-up of 20 queries."""
    from peg_rag import PEGEncoder

    encoder = PEGEncoder.from_pretrained(model, **SETUPS[setup])
    forward = encoder.model.forward
    spent = {"model": 0.0}

    def timed_forward(**features):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = forward(**features)
        spent["model"] += time.perf_counter() - start
        return out

    encoder.model.forward = timed_forward
    parts: dict[str, list[float]] = {"total": [], "tokenize": [], "model": [], "rest": []}
    for i, query in enumerate(queries[:20] + queries):
        spent["model"] = 0.0
        start = time.perf_counter()
        encoder.tokenize([query], "query")
        tokenize = time.perf_counter() - start
        start = time.perf_counter()
        encoder.encode_queries([query])
        total = time.perf_counter() - start
        if i >= 20:
            for name, seconds in (
                ("total", total),
                ("tokenize", tokenize),
                ("model", spent["model"]),
                ("rest", total - tokenize - spent["model"]),
            ):
                parts[name].append(1000 * seconds)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "me5-small-zh")
    parser.add_argument("--eval-dir", type=Path, default=SHARED / "data" / "eval")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--setup", choices=SETUPS, help="internal: measure one set-up")
    args = parser.parse_args()
    queries = short_queries(args.eval_dir, args.queries)
    if args.setup:
        print(json.dumps(measure(args.model, args.setup, queries)))
        return
    print(f"{len(queries)} short kuake-qtr-dev queries, one per call, one process per set-up")
    print("| set-up | total p50 ms | total p95 ms | tokenize p50 | model p50 | rest p50 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for setup in SETUPS:
        command = [sys.executable, __file__, "--setup", setup, "--model", str(args.model)]
        command += ["--eval-dir", str(args.eval_dir), "--queries", str(args.queries)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        parts = {k: np.array(v) for k, v in json.loads(out.splitlines()[-1]).items()}
        p50 = {k: float(np.median(v)) for k, v in parts.items()}
        p95 = float(np.percentile(parts["total"], 95))
        print(
            f"| {setup} | {p50['total']:.1f} | {p95:.1f} | {p50['tokenize']:.2f} "
            f"| {p50['model']:.1f} | {p50['rest']:.2f} |"
        )


if __name__ == "__main__":
    main()
