"""Reranker vs sentence-transformers' CrossEncoder: scoring throughput on the same model and pairs.

Runs interleaved (A B C A B C ...) in one process on the same 2,000 (query, passage) pairs
from the shared eval sets (1,000 short kuake-qtr-dev pairs, 1,000 long cmrc2018-dev pairs, each
query with a judged passage or a random one), with the same batch size and max length, and
reports median pairs/s and the ratio to CrossEncoder.predict in fp32. The Reranker rows are
torch fp32, torch int8 and ONNX Runtime int8 (``backend="onnx"``, exported once and cached).

The default model is me5-small-zh with a fresh one-logit head (seeded), saved as a
cross-encoder under the cache directory: speed does not depend on what the head learned.
Give ``--model`` to time a trained reranker (or BAAI/bge-reranker-base where the hub is
reachable).

    python benchmarks/rerank_throughput.py [--model DIR] [--write]
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
from pathlib import Path

import torch
from results_file import header, update_section
from sentence_transformers import CrossEncoder

from peg_rag import Reranker
from peg_rag.core.beir import load_beir
from peg_rag.core.cache import cache_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pairs(eval_dir: Path, per_set: int, seed: int = 0) -> list[tuple[str, str]]:
    """``per_set`` pairs from kuake-qtr-dev (short) and from cmrc2018-dev (long passages):
    half with a judged passage, half with a random one."""
    rng = random.Random(seed)
    found = []
    for name in ("kuake-qtr-dev", "cmrc2018-dev"):
        data = load_beir(eval_dir / name)
        judged = sorted(q for q in data.qrels if q in data.queries)
        docs = sorted(data.corpus)
        for n, query in enumerate(rng.sample(judged, per_set)):
            doc = next(iter(data.qrels[query])) if n % 2 == 0 else rng.choice(docs)
            found.append((data.queries[query], data.corpus[doc]))
    rng.shuffle(found)  # every slice mixes short and long pairs
    return found


def default_model(base: Path) -> Path:
    """The base encoder with a seeded new head, saved once as a cross-encoder."""
    target = cache_dir() / "bench" / "rerankers" / f"{base.name}-new-head"
    if not (target / "config.json").is_file():
        torch.manual_seed(0)
        Reranker.from_pretrained(base, new_head=True, device="cpu").save_pretrained(target)
    return target


def timed(fn, part) -> float:
    start = time.perf_counter()
    fn(part)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="cross-encoder folder (default: see above)")
    parser.add_argument("--base", type=Path, default=SHARED / "models" / "me5-small-zh")
    parser.add_argument("--eval-dir", type=Path, default=SHARED / "data" / "eval")
    parser.add_argument("--per-set", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slice", type=int, default=250, help="pairs per interleaved slice")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()

    logging.getLogger("peg_rag").setLevel(logging.ERROR)  # truncation is expected here
    model = args.model or default_model(args.base)
    work = pairs(args.eval_dir, args.per_set)
    common = {"device": "cpu", "max_length": args.max_length, "batch_size": args.batch_size}
    fp32 = Reranker.from_pretrained(model, **common)
    int8 = Reranker.from_pretrained(model, quantize="int8", **common)
    onnx_int8 = Reranker.from_pretrained(model, backend="onnx", quantize="int8", **common)
    peer = CrossEncoder(str(model), device="cpu", max_length=args.max_length)
    runs = {
        "CrossEncoder.predict fp32": lambda part: peer.predict(part, batch_size=args.batch_size),
        "Reranker fp32": fp32.score_pairs,
        "Reranker int8": int8.score_pairs,
        "Reranker ONNX int8": onnx_int8.score_pairs,
    }
    for fn in runs.values():  # warm-up: allocator, thread pools, lazy initialization
        fn(work[:64])
    slices = [work[i : i + args.slice] for i in range(0, len(work), args.slice)]
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        totals = dict.fromkeys(runs, 0.0)
        for part in slices:
            for name, fn in runs.items():
                totals[name] += timed(fn, part)
        for name, total in totals.items():
            seconds[name].append(total)
            print(f"repeat {repeat + 1} {name}: {len(work) / total:.1f} pairs/s", flush=True)
    speed = {name: len(work) / statistics.median(s) for name, s in seconds.items()}
    base = speed["CrossEncoder.predict fp32"]
    lines = [
        header("Reranking throughput (issues 11 and 13)"),
        f"- Model: {model.name} ({fp32.model.config.num_hidden_layers} layers x "
        f"{fp32.model.config.hidden_size}); pairs: {len(work)} "
        f"({args.per_set} kuake-qtr-dev, {args.per_set} cmrc2018-dev; judged or random "
        f"passage), batch size {args.batch_size}, max_length {args.max_length}, "
        f"{args.repeats} repeats, each scorer run in turn on every slice of {args.slice} "
        f"shuffled pairs, {torch.get_num_threads()} torch threads\n",
        "| scorer | median pairs/s | ratio vs CrossEncoder fp32 |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {s:.1f} | {s / base:.2f}x |" for name, s in speed.items()]
    print("\n".join(lines))
    if args.write:
        update_section("rerank_throughput", "\n".join(lines))


if __name__ == "__main__":
    main()
