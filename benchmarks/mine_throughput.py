"""Hard-negative mining throughput and peak memory against a 100k-text candidate pool.

The pool is 100,000 distinct texts from the shared data: the positives of the mined lines,
the three eval corpora, then the other training positives and queries. Encoding and search
are timed apart, because on a 2-core CPU encoding dominates and is the encoder benchmark's
subject: the vectors are encoded once with the model and cached under --cache (default:
``bench/mine_throughput`` in peg-rag's cache directory, see ``peg_rag.core.cache``; the encoding
time is stored beside them and reported), then the search-and-sample step of mining
(trainer.mine: exact top-100 + window sampling with the guards) runs on the cached vectors
with each top-k backend, interleaved, each repeat in a fresh process so its peak RSS is its own.

    # the one-off encoding, one cached piece per lock hold, then the benchmark
    for i in $(seq 12); do flock /tmp/peg-cpu.lock python benchmarks/mine_throughput.py \
        --encode-pieces 1; done
    flock /tmp/peg-cpu.lock python benchmarks/mine_throughput.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from results_file import header, update_section

from peg_rag.core.cache import cache_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
EVAL_SETS = ("kuake-qtr-dev", "cmedir-dev", "cmrc2018-dev")
GUARD_RATIOS = (0.95, 0.98, 0.99, 1.0)


def training_lines(train_dir: Path, count: int, seed: int) -> tuple[list, list]:
    """All training lines (parsed), and ``count`` of them drawn with ``seed`` to be mined."""
    from peg_rag.core.records import read_jsonl
    from peg_rag.trainer.data import parse_example

    lines = []
    for path in sorted(train_dir.glob("*/train.jsonl")):
        lines.extend(read_jsonl(path, parse_example))
    chosen = random.Random(seed).sample(range(len(lines)), count)
    return lines, [lines[i] for i in chosen]


def build_pool(lines: list, mined: list, eval_dir: Path, size: int) -> list[str]:
    from peg_rag.trainer.mine import read_corpus, unique

    corpora = read_corpus([eval_dir / name for name in EVAL_SETS])
    ordered = unique(
        [p for e in mined for p in e.pos]
        + corpora
        + [p for e in lines for p in e.pos]
        + [e.query for e in lines]
    )
    if len(ordered) < size:
        raise SystemExit(f"only {len(ordered)} distinct texts available, asked for {size}")
    return ordered[:size]


def cached_vectors(args: argparse.Namespace, mined: list, pool: list[str]) -> dict | None:
    """Query and pool vectors from the cache, encoding missing pieces (and timing them).

    The pool is encoded in pieces of --piece texts, each saved as it completes, so the
    one-off encoding can run as several short jobs (--encode-pieces) between other users
    of the CPU lock. Returns None while pieces are missing.
    """
    key = hashlib.sha256(
        json.dumps([args.model, args.max_length, [e.query for e in mined], pool]).encode()
    ).hexdigest()[:16]
    folder = args.cache / key
    folder.mkdir(parents=True, exist_ok=True)
    starts = range(0, len(pool), args.piece)
    todo = [None] * (not (folder / "queries.json").exists()) + [
        start for start in starts if not (folder / f"pool-{start:07d}.json").exists()
    ]
    if todo and args.encode_pieces != 0:
        from peg_rag import PEGEncoder
        from peg_rag.trainer.mine import encode_queries

        encoder = PEGEncoder.from_pretrained(
            args.model, device="cpu", max_length=args.max_length, show_progress_bar=True
        )
        for start in todo[: args.encode_pieces if args.encode_pieces > 0 else None]:
            began = time.perf_counter()
            if start is None:
                vectors, rows = encode_queries(encoder, mined)
                np.save(folder / "rows.npy", rows)
                name, count = "queries", len(vectors)
            else:
                vectors = encoder.encode(pool[start : start + args.piece], "passage")
                name, count = f"pool-{start:07d}", len(vectors)
            np.save(folder / f"{name}.npy", vectors)
            seconds = time.perf_counter() - began
            timing = {"texts": count, "seconds": seconds, "max_length": encoder.max_length}
            (folder / f"{name}.json").write_text(json.dumps(timing))
            todo.remove(start)
    if todo:
        print(f"{len(todo)} pieces left to encode in {folder}")
        return None
    pieces = [json.loads((folder / f"pool-{s:07d}.json").read_text()) for s in starts]
    queries = json.loads((folder / "queries.json").read_text())
    if not (folder / "pool.npy").exists():
        np.save(
            folder / "pool.npy",
            np.concatenate([np.load(folder / f"pool-{s:07d}.npy") for s in starts]),
        )
    return {
        "folder": str(folder),
        "queries": queries["texts"],
        "query_seconds": queries["seconds"],
        "pool": len(pool),
        "pool_seconds": sum(p["seconds"] for p in pieces),
        "max_length": queries["max_length"],
    }


def memory_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def search_once(args: argparse.Namespace) -> None:
    """Child process: mine from cached vectors with one backend, print timing and memory."""
    import peg_rag.trainer.mine as mine
    from peg_rag.retrieval.topk import top_k

    folder = Path(args.child)
    queries = np.load(folder / "queries.npy")
    rows = np.load(folder / "rows.npy")
    pool_vectors = np.load(folder / "pool.npy")
    lines, mined = training_lines(Path(args.train_dir), args.queries, args.seed)
    pool = build_pool(lines, mined, Path(args.eval_dir), args.pool)
    del lines
    options = mine.MiningOptions()
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
    baseline = memory_mib("VmRSS")
    start = time.perf_counter()
    positive = mine.positive_scores(None, mined, queries, rows, pool, pool_vectors)
    scores, ranked = top_k(queries, pool_vectors, options.range_max, backend=args.backend)
    searched = time.perf_counter()
    stats = mine.MiningStats(lines=len(mined), pool=len(pool))
    mine.choose_negatives(mined, rows, scores, ranked, positive, pool, options, stats)
    end = time.perf_counter()
    peak = memory_mib("VmHWM")
    # How the guard ratio decides how many lines can get their negatives (scores of the
    # window relative to each line's positive score).
    ratios = scores[rows, options.range_min : options.range_max] / positive[:, None]
    full_at = {
        str(r): float(((ratios <= r).sum(axis=1) >= options.negatives).mean()) for r in GUARD_RATIOS
    }
    print(
        json.dumps(
            {
                "search_seconds": searched - start,
                "total_seconds": end - start,
                "baseline_mib": baseline,
                "peak_mib": peak,
                "negatives": stats.negatives,
                "short_lines": stats.short_lines,
                "skipped_score": stats.skipped_score,
                "skipped_equal": stats.skipped_equal,
                "full_at": full_at,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models/me5-small-zh"))
    parser.add_argument("--train-dir", default=str(SHARED / "data/train"))
    parser.add_argument("--eval-dir", default=str(SHARED / "data/eval"))
    parser.add_argument(
        "--cache",
        type=Path,
        default=cache_dir() / "bench" / "mine_throughput",
        help="where the encoded vectors are kept (default: %(default)s)",
    )
    parser.add_argument("--pool", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000, help="training lines to mine")
    parser.add_argument("--max-length", type=int, help="encoder max tokens (default: model's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--piece", type=int, default=10_000, help="texts per cached piece")
    parser.add_argument(
        "--encode-pieces",
        type=int,
        default=-1,
        help="encode at most this many missing pieces, then stop (-1: all, then benchmark)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-only", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--backend", choices=["torch", "faiss"], help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        search_once(args)
        return

    from peg_rag.retrieval.topk import faiss_available

    lines, mined = training_lines(Path(args.train_dir), args.queries, args.seed)
    pool = build_pool(lines, mined, Path(args.eval_dir), args.pool)
    timing = cached_vectors(args, mined, pool)
    if timing is None:
        return
    backends = ["torch"] + (["faiss"] if faiss_available() else [])
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for _ in range(args.repeats):
        for backend in backends:  # interleaved, so drift hits both alike
            command = [
                sys.executable,
                __file__,
                "--child",
                timing["folder"],
                "--backend",
                backend,
            ] + [a for a in sys.argv[1:]]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[backend].append(json.loads(out.strip().splitlines()[-1]))
            print(backend, runs[backend][-1], flush=True)

    pairs = timing["queries"] * timing["pool"]
    table = [
        "| top-k backend | search s (median) | mining s (median) | candidates/s (search) "
        "| candidates/s (mining) | peak RSS MiB | RSS over loaded vectors MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    medians = {}
    for backend, results in runs.items():
        search = statistics.median(r["search_seconds"] for r in results)
        total = statistics.median(r["total_seconds"] for r in results)
        peak = max(r["peak_mib"] for r in results)
        extra = max(r["peak_mib"] - r["baseline_mib"] for r in results)
        medians[backend] = total
        table.append(
            f"| {backend} | {search:.1f} | {total:.1f} | {pairs / search / 1e6:.1f}M "
            f"| {pairs / total / 1e6:.1f}M | {peak:.0f} | {extra:.0f} |"
        )
    first = runs[backends[0]][0]
    lines_out = [
        header("Mining and evaluation (issue 4)"),
        f"Hard-negative mining of {timing['queries']:,} distinct training queries "
        f"(from {args.queries:,} lines) against a pool of {timing['pool']:,} texts, "
        "me5-small-zh (384-d), top-100, window [10, 100), 5 negatives, guard 0.95. "
        "A candidate is one query-text pair scored. Medians of "
        f"{args.repeats} interleaved runs, each in a fresh process.",
        "",
        f"- Encoding (once, cached; {timing['max_length']} max tokens, fp32 CPU): "
        f"{timing['queries']:,} queries in {timing['query_seconds']:.0f} s "
        f"({timing['queries'] / timing['query_seconds']:.0f} texts/s), "
        f"{timing['pool']:,} pool texts in {timing['pool_seconds']:.0f} s "
        f"({timing['pool'] / timing['pool_seconds']:.0f} texts/s).",
        f"- Mined: {first['negatives']:,} negatives; {first['short_lines']} lines short; "
        f"skipped {first['skipped_equal']:,} equal-to-positive/query and "
        f"{first['skipped_score']:,} by the score guard.",
        "- Lines whose window holds at least 5 candidates under the guard ratio: "
        + ", ".join(f"{r}: {100 * v:.0f}%" for r, v in first["full_at"].items())
        + " (window scores are this close to the positive's: the guard decides most).",
        "",
        *table,
        "",
    ]
    if len(medians) == 2:
        lines_out.append(f"faiss / torch mining time: {medians['faiss'] / medians['torch']:.2f}x.")
    if not args.print_only:
        update_section("mine-throughput", "\n".join(lines_out))
    print("\n".join(lines_out))


if __name__ == "__main__":
    main()
