"""Hybrid index build throughput and query latency at 10k and 100k chunks.

The corpus is every document of the shared eval sets plus the distinct texts of the shared
training files, chunked with the defaults (256 tokens, overlap 32). The 100k index holds
every eval document plus training texts; the 10k index is a seeded random sample of it.
Each size is built in a fresh embedded index. Passage vectors come from an on-disk cache
(see retrieval_common.py), so the build time shows chunking + Chroma + BM25 + commit; dense
encoding throughput is measured on its own, on a sample. Queries are the shared eval
queries (shuffled, seed 1), answered one at a time with query encoding included, after a
warm-up. Indexes are built under --work, passage vectors cached under --cache (defaults
under peg-rag's cache directory; see retrieval_common.py).

    flock /tmp/peg-cpu.lock python benchmarks/retrieval_latency.py [--write] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from results_file import publish
from retrieval_common import (
    EVAL,
    MODEL,
    SETS,
    CachedEncoder,
    bench_dir,
    default_vector_cache,
    train_texts,
)

from peg_rag import Document, HybridRetriever, PEGEncoder
from peg_rag.core.beir import load_beir
from peg_rag.retrieval.bm25 import BM25Index
from peg_rag.retrieval.chunker import Chunker
from peg_rag.retrieval.settings import HybridSettings
from peg_rag.retrieval.store import ChromaStore

DEFAULTS = HybridSettings()


def corpus_and_queries() -> tuple[list[Document], list[str]]:
    """All eval documents, then the training texts; the eval queries, shuffled (seed 1)."""
    docs, queries = [], []
    for name in SETS:
        data = load_beir(EVAL / name)
        docs += [Document(f"{name}/{d}", text) for d, text in data.corpus.items()]
        queries += list(data.queries.values())
    docs += [Document(f"train/{i}", text) for i, text in enumerate(train_texts())]
    random.Random(1).shuffle(queries)
    return docs, queries


def take_chunks(docs: list[Document], chunker, target: int) -> list[Document]:
    """The first documents whose chunks reach ``target``."""
    chosen, count = [], 0
    for doc in docs:
        chosen.append(doc)
        count += len(chunker.split(doc.text))
        if count >= target:
            return chosen
    raise ValueError(f"the corpus has only {count} chunks, fewer than {target}")


def select(docs: list[Document], chunker, sizes: list[int]) -> dict[int, list[Document]]:
    """The largest size takes documents in order (so it holds every eval document); smaller
    sizes are seeded random samples of it, so all sizes hold the same mixture."""
    largest = take_chunks(docs, chunker, max(sizes))
    mixed = largest[:]
    random.Random(0).shuffle(mixed)
    return {size: take_chunks(mixed, chunker, size) for size in sizes}


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95))}


def measure(chosen: list[Document], queries, encoder, cached, n_queries: int, work: Path) -> dict:
    """Build an index of ``chosen`` under ``work``, time its parts, then answer queries."""
    chunker = Chunker(DEFAULTS.chunk_size, DEFAULTS.chunk_overlap, tokenizer=encoder.tokenizer)
    texts = [c.text for doc in chosen for c in chunker.split(doc.text)]
    cached.encode_passages(texts, batch_size=64, show_progress_bar=True)  # fill the cache
    index_dir = work / f"idx-{len(texts)}"
    shutil.rmtree(index_dir, ignore_errors=True)

    start = time.perf_counter()
    retriever = HybridRetriever.create(
        index_dir, cached, chunk_size=DEFAULTS.chunk_size, chunk_overlap=DEFAULTS.chunk_overlap
    )
    retriever.add(chosen)
    build_s = time.perf_counter() - start
    n_chunks = len(retriever)

    # Components on the same chunks, each on its own.
    ids = [f"c{i}" for i in range(len(texts))]
    start = time.perf_counter()
    bm25 = BM25Index()
    bm25.add(ids, texts)
    bm25._built()
    bm25_s = time.perf_counter() - start
    import bm25s  # peer: bm25s's default regex tokenizer + index, same chunks

    start = time.perf_counter()
    peer = bm25s.BM25()
    peer.index(bm25s.tokenize(texts, stopwords=None, show_progress=False), show_progress=False)
    peer_s = time.perf_counter() - start
    vectors = cached.encode_passages(texts)
    store_dir = work / f"store-{len(texts)}"
    shutil.rmtree(store_dir, ignore_errors=True)
    start = time.perf_counter()
    ChromaStore.persistent(store_dir).upsert(
        ids, vectors, texts, [{"n": i} for i in range(len(ids))]
    )
    chroma_s = time.perf_counter() - start
    shutil.rmtree(store_dir)
    sample = texts[:: max(1, len(texts) // 1000)][:1000]
    start = time.perf_counter()
    encoder.encode_passages(sample, batch_size=64)
    encode_rate = len(sample) / (time.perf_counter() - start)

    start = time.perf_counter()
    loaded = HybridRetriever.load(index_dir, encoder=encoder)
    load_s = time.perf_counter() - start
    timings: dict[str, list[float]] = {"encode": [], "dense": [], "bm25": [], "hybrid": []}
    for i, query in enumerate(queries[: n_queries + 20]):
        steps = {}
        start = time.perf_counter()
        vector = encoder.encode_queries([query])
        steps["encode"] = time.perf_counter() - start
        start = time.perf_counter()
        loaded.store.query(vector, 100)
        steps["dense"] = time.perf_counter() - start
        start = time.perf_counter()
        loaded.bm25.search(query, 100)
        steps["bm25"] = time.perf_counter() - start
        start = time.perf_counter()
        loaded.retrieve(query, k=10)
        steps["hybrid"] = time.perf_counter() - start
        if i >= 20:  # the first 20 warm up caches and lazy imports
            for name, value in steps.items():
                timings[name].append(value)
    dense_total = [e + d for e, d in zip(timings["encode"], timings["dense"], strict=True)]
    return {
        "chunks": n_chunks,
        "documents": len(chosen),
        "mean_chunk_chars": statistics.mean(map(len, texts)),
        "build_s": build_s,
        "build_rate": n_chunks / build_s,
        "bm25_rate": len(texts) / bm25_s,
        "bm25s_regex_rate": len(texts) / peer_s,
        "chroma_rate": len(texts) / chroma_s,
        "encode_rate": encode_rate,
        "load_s": load_s,
        "queries": len(timings["hybrid"]),
        "latency_ms": {name: percentiles(values) for name, values in timings.items()},
        "dense_with_encoding_ms": percentiles(dense_total),
    }


def long_chunk_bm25_rate(encoder) -> tuple[int, float, float]:
    """BM25 indexing rate on 256-token chunks of the cmrc2018-dev Wikipedia passages, the
    longest texts in the shared data: (chunks, mean characters, chunks per second)."""
    chunker = Chunker(DEFAULTS.chunk_size, DEFAULTS.chunk_overlap, tokenizer=encoder.tokenizer)
    texts = [
        c.text for t in load_beir(EVAL / "cmrc2018-dev").corpus.values() for c in chunker.split(t)
    ]
    start = time.perf_counter()
    index = BM25Index()
    index.add([str(i) for i in range(len(texts))], texts)
    index._built()
    return len(texts), statistics.mean(map(len, texts)), len(texts) / (time.perf_counter() - start)


def render(results: dict) -> str:
    lines = [
        "- Model: `../shared/models/me5-small-zh`, fp32 on CPU (2 torch threads); embedded "
        "Chroma (HNSW, cosine, ef_search 200); BM25 on jieba + characters; defaults: "
        "256-token chunks, relative-score fusion of the top 100 from each side, k=10",
        "- Corpus: 100k = every document of kuake-qtr-dev, cmedir-dev and cmrc2018-dev, then "
        "distinct texts of the shared training files, chunked; 10k = a seeded sample of it",
        "",
        "| chunks (docs, mean chars) | build incl. commit, cached vectors | BM25 index "
        "(jieba) | bm25s regex peer | Chroma insert | me5 encoding | load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    sizes = [r for key, r in results.items() if key != "long"]
    for r in sizes:
        lines.append(
            f"| {r['chunks']:,} ({r['documents']:,}, {r['mean_chunk_chars']:.0f}) | "
            f"{r['build_s']:.1f} s ({r['build_rate']:,.0f}/s) | {r['bm25_rate']:,.0f}/s | "
            f"{r['bm25s_regex_rate']:,.0f}/s ({r['bm25_rate'] / r['bm25s_regex_rate']:.2f}x) | "
            f"{r['chroma_rate']:,.0f}/s | {r['encode_rate']:,.0f}/s | {r['load_s']:.1f} s |"
        )
    lines += [
        "",
        "Query latency, ms (one query at a time; hybrid includes query encoding):",
        "",
        "| chunks | queries | hybrid p50 | hybrid p95 | dense incl. encoding p50 (hybrid/dense) "
        "| encode p50 | Chroma top-100 p50 | BM25 top-100 p50 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sizes:
        lat = r["latency_ms"]
        dense = r["dense_with_encoding_ms"]["p50"]
        lines.append(
            f"| {r['chunks']:,} | {r['queries']} | {lat['hybrid']['p50']:.1f} | "
            f"{lat['hybrid']['p95']:.1f} | {dense:.1f} ({lat['hybrid']['p50'] / dense:.2f}x) | "
            f"{lat['encode']['p50']:.1f} | {lat['dense']['p50']:.1f} | {lat['bm25']['p50']:.1f} |"
        )
    if "long" in results:
        n, chars, rate = results["long"]
        lines += [
            "",
            f"BM25 indexing of long chunks (the {n:,} 256-token chunks of the cmrc2018-dev "
            f"passages, {chars:.0f} characters on average): {rate:,.0f} chunks/s.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--json", help="also write the raw numbers to this file")
    parser.add_argument(
        "--work",
        type=Path,
        default=bench_dir() / "latency",
        help="folder for the indexes built (default: %(default)s)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=default_vector_cache(),
        help="passage vector cache (default: %(default)s; $PEG_BENCH_CACHE sets it)",
    )
    args = parser.parse_args()
    encoder = PEGEncoder.from_pretrained(MODEL, batch_size=64)
    cached = CachedEncoder(encoder, args.cache)
    docs, queries = corpus_and_queries()
    chunker = Chunker(DEFAULTS.chunk_size, DEFAULTS.chunk_overlap, tokenizer=encoder.tokenizer)
    results = {}
    for size, chosen in sorted(select(docs, chunker, args.sizes).items()):
        results[size] = measure(chosen, queries, encoder, cached, args.queries, args.work)
        print(size, json.dumps(results[size]), flush=True)
    results["long"] = long_chunk_bm25_rate(encoder)
    body = render(results)
    publish("hybrid_latency", "Hybrid retrieval (issue 5): speed", body, results, args)


if __name__ == "__main__":
    main()
