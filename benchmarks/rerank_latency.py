"""End-to-end latency of ``HybridRetriever.retrieve`` with a reranker at 100k chunks (issue 11).

One query at a time, query encoding included: hybrid first stage, then the top 20 reranked,
k=10. Two set-ups side by side, alternating per query: encoder and reranker in fp32, and
both with ``quantize="int8"``. Queries are seeded samples of two kinds:

- short-text sets: kuake-qtr-dev and cmedir-dev queries, whose candidates are mostly short
  titles and questions;
- 256-token chunks: cmrc2018-dev queries, whose candidates are mostly full 256-token chunks
  of Wikipedia passages.

The index is retrieval_latency.py's 100k corpus (every eval document, then training texts,
256-token chunks), built once under ``--work`` with passage vectors from the shared vector
cache (retrieval_common.py). The reranker defaults to the one reproduce_reranker.py trains.

    python benchmarks/rerank_latency.py [--reranker DIR] [--queries 200] [--write]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from results_file import header, update_section
from retrieval_common import EVAL, MODEL, CachedEncoder, bench_dir, default_vector_cache
from retrieval_latency import DEFAULTS, corpus_and_queries, percentiles, select

from peg_rag import HybridRetriever, PEGEncoder, Reranker
from peg_rag.core.beir import load_beir
from peg_rag.core.cache import cache_dir
from peg_rag.retrieval.chunker import Chunker
from peg_rag.retrieval.index_files import is_index

TRAINED = cache_dir() / "bench" / "reranker" / "runs" / "reranker" / "best-model"
GROUPS = {"short-text sets": ("kuake-qtr-dev", "cmedir-dev"), "256-token chunks": ("cmrc2018-dev",)}
SIZE = 100_000
TOP_N = 20
WARM_UP = 10


def build_index(work: Path, cache: Path) -> Path:
    """The 100k-chunk index (built once; vectors from the cache, computed where missing)."""
    index_dir = work / "idx-100k"
    if is_index(index_dir):
        return index_dir
    encoder = PEGEncoder.from_pretrained(MODEL, batch_size=64)
    cached = CachedEncoder(encoder, cache)
    docs, _ = corpus_and_queries()
    chunker = Chunker(DEFAULTS.chunk_size, DEFAULTS.chunk_overlap, tokenizer=encoder.tokenizer)
    chosen = select(docs, chunker, [SIZE])[SIZE]
    texts = [c.text for doc in chosen for c in chunker.split(doc.text)]
    cached.encode_passages(texts, batch_size=64, show_progress_bar=True)  # fill the cache
    retriever = HybridRetriever.create(
        index_dir, cached, chunk_size=DEFAULTS.chunk_size, chunk_overlap=DEFAULTS.chunk_overlap
    )
    retriever.add(chosen)
    return index_dir


def sample_queries(per_group: int, seed: int = 0) -> dict[str, list[str]]:
    """A seeded sample of ``per_group`` queries (plus warm-up ones) for each group."""
    found = {}
    for group, names in GROUPS.items():
        queries = [q for name in names for q in load_beir(EVAL / name).queries.values()]
        found[group] = random.Random(seed).sample(sorted(queries), per_group + WARM_UP)
    return found


def measure(index_dir: Path, reranker_dir: Path, per_group: int) -> tuple[dict, int]:
    """p50/p95 per group and set-up, the mean length of the reranked candidates, and the
    number of chunks in the index."""
    setups = {}
    for name, quantize in (("fp32", None), ("int8", "int8")):
        encoder = PEGEncoder.from_pretrained(MODEL, quantize=quantize)
        reranker = Reranker.from_pretrained(reranker_dir, quantize=quantize)
        setups[name] = (HybridRetriever.load(index_dir, encoder=encoder), reranker)
    results: dict = {}
    for group, queries in sample_queries(per_group).items():
        timings: dict[str, list[float]] = {name: [] for name in setups}
        chars: list[int] = []
        for i, query in enumerate(queries):
            order = list(setups) if i % 2 == 0 else list(reversed(setups))  # alternate
            for name in order:
                retriever, reranker = setups[name]
                start = time.perf_counter()
                retriever.retrieve(query, k=10, reranker=reranker, rerank_top_n=TOP_N)
                if i >= WARM_UP:
                    timings[name].append(time.perf_counter() - start)
            first = setups["fp32"][0].retrieve(query, k=TOP_N, reranker=False)
            chars += [len(r.text) for r in first]
        results[group] = {
            "queries": per_group,
            "candidate_chars": statistics.mean(chars),
            "ms": {name: percentiles(values) for name, values in timings.items()},
        }
        print(group, json.dumps(results[group]), flush=True)
    return results, len(setups["fp32"][0])


def render(results: dict, reranker_dir: Path, chunks: int) -> str:
    lines = [
        f"- Index: {chunks:,} chunks (retrieval_latency.py's 100k corpus, 256-token chunks, "
        "embedded Chroma + BM25 with the default tokenizer), encoder "
        "`../shared/models/me5-small-zh`; reranker "
        f"`{reranker_dir}` (max length 256). `retrieve(query, k=10, reranker=R, "
        f"rerank_top_n={TOP_N})`, one query at a time, query encoding included, fp32 and int8 "
        f"set-ups alternating per query, after {WARM_UP} warm-up queries per group.",
        '- fp32: encoder and reranker in fp32; int8: both loaded with `quantize="int8"`.',
        "",
        "| queries | n | mean chars of the top 20 | fp32 p50 | fp32 p95 | int8 p50 | int8 p95 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for group, r in results.items():
        ms = r["ms"]
        lines.append(
            f"| {group} | {r['queries']} | {r['candidate_chars']:.0f} | "
            f"{ms['fp32']['p50']:.0f} ms | {ms['fp32']['p95']:.0f} ms | "
            f"{ms['int8']['p50']:.0f} ms | {ms['int8']['p95']:.0f} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reranker", type=Path, default=TRAINED, help="(default: %(default)s)")
    parser.add_argument("--queries", type=int, default=200, help="timed queries per group")
    parser.add_argument("--work", type=Path, default=bench_dir() / "rerank-latency")
    parser.add_argument("--cache", type=Path, default=default_vector_cache())
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    if not (args.reranker / "config.json").is_file():
        raise SystemExit(
            f"no reranker at {args.reranker}: run benchmarks/reproduce_reranker.py, or give "
            "--reranker"
        )
    index_dir = build_index(args.work, args.cache)
    results, chunks = measure(index_dir, args.reranker, args.queries)
    body = render(results, args.reranker, chunks)
    print(body)
    if args.write:
        title = "Reranking (issue 11): end-to-end retrieve latency at 100k chunks"
        update_section("rerank_latency", header(title) + "\n" + body)


if __name__ == "__main__":
    main()
