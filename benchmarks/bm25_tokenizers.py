"""BM25 tokenizers, jieba vs rjieba (jieba-rs): indexing speed, token agreement and quality.

- Speed: BM25 indexing (tokenize, add, build the score matrix) of the 256-token chunks of the
  cmrc2018-dev passages, the longest texts in the shared data, chunked as
  retrieval_latency.py's ``long_chunk_bm25_rate`` does; median chunks/s of ``--repeats``
  interleaved runs per tokenizer, with the tokenizing alone beside it. Dictionaries are loaded
  before timing.
- Agreement: the share of those chunks whose tokens (words and characters, in order) are the
  same with rjieba as with jieba, and the share of tokens the two have in common.
- Quality: for every shared eval set, an in-memory hybrid index per tokenizer (documents
  whole, as retrieval_quality.py builds them), scored by nDCG@10 with BM25 alone, dense alone
  (the same vectors for both: a check that only BM25 differs) and the default hybrid.

Vectors are cached under --cache (see retrieval_common.py). ``--limit N`` runs a quick check
on N chunks, and N queries per set over their judged documents plus N others.

    flock /tmp/peg-cpu.lock python benchmarks/bm25_tokenizers.py [--write] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

from results_file import publish
from retrieval_common import EVAL, MODEL, SETS, CachedEncoder, default_vector_cache

from peg_rag import PEGEncoder
from peg_rag.core.beir import load_beir
from peg_rag.core.metrics import retrieval_scores
from peg_rag.retrieval.bm25 import BM25Index, ChineseTokenizer
from peg_rag.retrieval.chunker import Chunker
from peg_rag.retrieval.evaluate import index_corpus, judged_queries, run_queries
from peg_rag.retrieval.settings import BM25_TOKENIZERS, DEFAULT_BM25_TOKENIZER, HybridSettings

DEFAULTS = HybridSettings()
METHODS = ("bm25", "dense", "hybrid")
GOAL_CHUNKS_PER_S = 5_000  # issue 13
GOAL_NDCG_POINTS = 0.3  # issue 13: each set's nDCG@10 within this of the jieba build


def long_chunks(encoder, limit: int | None) -> list[str]:
    """The 256-token chunks of the cmrc2018-dev passages (the first ``limit`` of them)."""
    chunker = Chunker(DEFAULTS.chunk_size, DEFAULTS.chunk_overlap, tokenizer=encoder.tokenizer)
    corpus = load_beir(EVAL / "cmrc2018-dev").corpus.values()
    return [c.text for text in corpus for c in chunker.split(text)][:limit]


def speed(texts: list[str], repeats: int) -> dict:
    """Median BM25 indexing and tokenizing rates per tokenizer, and the agreement of rjieba's
    tokens with jieba's."""
    tokenizers = {name: ChineseTokenizer(segmenter=name) for name in BM25_TOKENIZERS}
    for tokenizer in tokenizers.values():
        tokenizer("预热")  # load the dictionary outside the timing
    ids = [str(i) for i in range(len(texts))]
    times: dict[str, dict[str, list[float]]] = {
        name: {"index": [], "tokenize": []} for name in tokenizers
    }
    tokens = {}
    for _ in range(repeats):  # interleaved, so that a busy spell hits both tokenizers
        for name, tokenizer in tokenizers.items():
            start = time.perf_counter()
            index = BM25Index(tokenizer)
            index.add(ids, texts)
            index._built()
            times[name]["index"].append(time.perf_counter() - start)
            start = time.perf_counter()
            tokens[name] = index.tokenize_many(texts)
            times[name]["tokenize"].append(time.perf_counter() - start)
    same = sum(a == b for a, b in zip(tokens["jieba"], tokens["rjieba"], strict=True))
    shared = sum(
        sum((Counter(a) & Counter(b)).values())
        for a, b in zip(tokens["jieba"], tokens["rjieba"], strict=True)
    )
    total = sum(map(len, tokens["jieba"]))
    return {
        "chunks": len(texts),
        "mean_chars": statistics.mean(map(len, texts)),
        "rates": {
            name: {part: len(texts) / statistics.median(s) for part, s in parts.items()}
            for name, parts in times.items()
        },
        "same_tokens_share": same / len(texts),
        "shared_token_share": shared / total,
    }


def quality(name: str, encoder, limit: int | None) -> dict:
    """nDCG@10 of each method with each tokenizer on one eval set."""
    data = load_beir(EVAL / name)
    queries = dict(list(judged_queries(data).items())[:limit])
    qrels = {q: data.qrels[q] for q in queries}
    corpus = data.corpus
    if limit is not None:
        keep = {d for rel in qrels.values() for d in rel} | set(list(corpus)[:limit])
        corpus = {d: t for d, t in corpus.items() if d in keep}
    scores = {}
    for tokenizer in BM25_TOKENIZERS:
        retriever = index_corpus(corpus, encoder, bm25_tokenizer=tokenizer)
        runs = run_queries(retriever, queries, k=100, methods=METHODS)
        scores[tokenizer] = {m: retrieval_scores(runs[m], qrels)["ndcg@10"] for m in METHODS}
        print(name, tokenizer, json.dumps(scores[tokenizer]), flush=True)
    return {"queries": len(queries), "docs": len(corpus), "ndcg@10": scores}


def render(results: dict) -> str:
    pct = lambda x: f"{100 * x:.2f}"  # noqa: E731
    s = results["speed"]
    lines = [
        "- BM25: k1=1.2, b=0.75, jieba-style search-mode words + Chinese characters, bundled "
        f"stopwords; the segmenter under it is jieba or rjieba (default for new indexes: "
        f"{DEFAULT_BM25_TOKENIZER})",
        f"- Speed: the {s['chunks']:,} 256-token chunks of the cmrc2018-dev passages "
        f"({s['mean_chars']:.0f} characters on average); BM25 indexing = tokenize, add and "
        "build the score matrix; medians of interleaved runs",
        "",
        "| tokenizer | BM25 indexing, chunks/s | tokenizing alone, chunks/s |",
        "| --- | ---: | ---: |",
    ]
    for name, rate in s["rates"].items():
        lines.append(f"| {name} | {rate['index']:,.0f} | {rate['tokenize']:,.0f} |")
    lines += [
        "",
        f"rjieba gives the same tokens as jieba on {100 * s['same_tokens_share']:.1f}% of "
        f"the chunks; {100 * s['shared_token_share']:.1f}% of jieba's tokens are among "
        "rjieba's for the same chunk.",
        "",
        "nDCG@10 (documents indexed whole; dense: the same vectors in both builds, a check):",
        "",
        "| set | queries / docs | tokenizer | BM25 | dense | hybrid (default) |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, r in results["quality"].items():
        for tokenizer, by_method in r["ndcg@10"].items():
            lines.append(
                f"| {name} | {r['queries']} / {r['docs']} | {tokenizer} | "
                + " | ".join(pct(by_method[m]) for m in METHODS)
                + " |"
            )
    lines += ["", "rjieba minus jieba, nDCG@10 points:", ""]
    worst = 0.0
    for name, r in results["quality"].items():
        diff = {m: 100 * (r["ndcg@10"]["rjieba"][m] - r["ndcg@10"]["jieba"][m]) for m in METHODS}
        worst = min(worst, diff["bm25"], diff["hybrid"])
        lines.append(f"- {name}: BM25 {diff['bm25']:+.2f}, hybrid {diff['hybrid']:+.2f}")
    fastest = s["rates"]["rjieba"]["index"]
    lines += [
        "",
        f"Goals (issue 13): BM25 indexing with rjieba {fastest:,.0f} chunks/s "
        f"(goal >= {GOAL_CHUNKS_PER_S:,}): {'met' if fastest >= GOAL_CHUNKS_PER_S else 'missed'}; "
        f"largest nDCG@10 loss {abs(worst):.2f} points (goal <= {GOAL_NDCG_POINTS}): "
        f"{'met' if abs(worst) <= GOAL_NDCG_POINTS else 'missed'}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per tokenizer")
    parser.add_argument(
        "--limit", type=int, help="quick check: this many chunks, and queries per set"
    )
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--json", help="also write the raw numbers to this file")
    parser.add_argument(
        "--cache",
        type=Path,
        default=default_vector_cache(),
        help="passage and query vectors (default: %(default)s; $PEG_BENCH_CACHE sets it)",
    )
    args = parser.parse_args()
    if args.write and args.limit is not None:
        parser.error("--write records full runs only; drop --limit")
    encoder = PEGEncoder.from_pretrained(MODEL, batch_size=64)
    results = {"speed": speed(long_chunks(encoder, args.limit), args.repeats)}
    print(json.dumps(results["speed"]), flush=True)
    cached = CachedEncoder(encoder, args.cache, kinds=("passage", "query"))
    results["quality"] = {name: quality(name, cached, args.limit) for name in args.sets}
    body = render(results)
    publish("bm25_tokenizers", "BM25 tokenizers (issue 13): jieba vs rjieba", body, results, args)


if __name__ == "__main__":
    main()
