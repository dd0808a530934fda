"""Retrieval quality of BM25, dense and hybrid retrieval on the shared Chinese eval sets.

For each set the corpus goes into an in-memory HybridRetriever (documents whole, as BEIR
scores them), and every query is answered by BM25 alone, dense alone, and the hybrid with
its defaults (relative-score fusion) and with RRF (k=60), equal and default weights.
nDCG@10 and Recall@100 come from peg_rag.core.metrics. Sweeps of fusion weights and
candidate depth, run on the same per-retriever lists, and BM25 variants (tokenization,
k1/b; alone and fused) show how the one set of defaults, the same for every set, was chosen.

Vectors are cached under --cache (see retrieval_common.py).

    flock /tmp/peg-cpu.lock python benchmarks/retrieval_quality.py [--write] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from results_file import publish
from retrieval_common import EVAL, MODEL, SETS, CachedEncoder, default_vector_cache

from peg_rag import PEGEncoder
from peg_rag.core.beir import load_beir
from peg_rag.core.metrics import retrieval_scores
from peg_rag.retrieval.bm25 import BM25Index, ChineseTokenizer
from peg_rag.retrieval.evaluate import index_corpus, run_queries
from peg_rag.retrieval.fusion import reciprocal_rank, relative_score

SWEEP = (0.5, 0.6, 0.7, 0.8)
DEPTHS = (20, 50, 100, 200)


def _sweep_run(dense: dict, bm25: dict, fusion: str, weight: float) -> dict[str, list[str]]:
    """Fuse per-query (doc_id, score) lists with dense weight ``weight``, BM25 1 - weight."""
    run = {}
    for q in dense:
        if fusion == "rrf":
            ranked = [[d for d, _ in dense[q]], [d for d, _ in bm25[q]]]
            fused = reciprocal_rank(ranked, [weight, 1 - weight])
        else:
            fused = relative_score([dense[q], bm25[q]], [weight, 1 - weight])
        run[q] = [d for d, _ in fused[:100]]
    return run


def evaluate(name: str, encoder) -> dict:
    data = load_beir(EVAL / name)
    qrels = {q: rel for q, rel in data.qrels.items() if q in data.queries}
    queries = {q: data.queries[q] for q in qrels}
    start = time.perf_counter()
    retriever = index_corpus(data.corpus, encoder)
    build_s = time.perf_counter() - start
    runs = run_queries(retriever, queries, k=100, methods=("bm25", "dense"))
    runs["hybrid-relative (default)"] = run_queries(retriever, queries, k=100, methods=("hybrid",))[
        "hybrid"
    ]
    for label, weights in (
        ("hybrid-rrf (equal)", {"dense": 1, "bm25": 1}),
        ("hybrid-rrf (0.7/0.3)", None),
    ):
        runs[label] = run_queries(
            retriever, queries, k=100, methods=("hybrid",), fusion="rrf", weights=weights
        )["hybrid"]
    scores = {m: retrieval_scores(run, qrels) for m, run in runs.items()}

    # Sweeps fuse the same per-retriever lists the retriever fuses, cut to each depth.
    lists = {}
    for method in ("dense", "bm25"):
        found = retriever.retrieve_many(list(queries.values()), max(DEPTHS), method=method)
        lists[method] = {
            q: [(r.doc_id, r.score) for r in res] for q, res in zip(queries, found, strict=True)
        }

    def fused(dense: dict, bm25: dict, fusion: str = "relative", w: float = 0.7, depth: int = 100):
        cut = lambda run: {q: v[:depth] for q, v in run.items()}  # noqa: E731
        return retrieval_scores(_sweep_run(cut(dense), cut(bm25), fusion, w), qrels)["ndcg@10"]

    sweep = {
        f"{fusion} w_dense={w}": fused(lists["dense"], lists["bm25"], fusion, w)
        for fusion in ("relative", "rrf")
        for w in SWEEP
    }
    sweep.update(
        {
            f"relative w_dense=0.7, top {n} each": fused(lists["dense"], lists["bm25"], depth=n)
            for n in DEPTHS
        }
    )

    # BM25 variants, alone and fused (defaults) with the same dense lists.
    import bm25s  # the peer: bm25s's default regex tokenizer, on the same BM25 engine

    texts = list(data.corpus.values())
    regex_tokens = bm25s.tokenize(texts, stopwords=None, return_ids=False, show_progress=False)
    query_regex = bm25s.tokenize(
        list(queries.values()), stopwords=None, return_ids=False, show_progress=False
    )
    variants = [
        ("bm25s default tokenizer (regex \\w\\w+)", None, 1.2, 0.75),
        (
            "jieba search",
            ChineseTokenizer(segmenter="jieba", stopwords=[], char_unigrams=False),
            1.2,
            0.75,
        ),
        (
            "jieba search + stopwords",
            ChineseTokenizer(segmenter="jieba", char_unigrams=False),
            1.2,
            0.75,
        ),
        ("jieba search + characters", ChineseTokenizer(segmenter="jieba", stopwords=[]), 1.2, 0.75),
        (
            "jieba search + stopwords + characters (default)",
            ChineseTokenizer(segmenter="jieba"),
            1.2,
            0.75,
        ),
        (
            "jieba precise + stopwords + characters",
            ChineseTokenizer(segmenter="jieba", mode="precise"),
            1.2,
            0.75,
        ),
        ("default tokens, k1=0.9 b=0.4", ChineseTokenizer(segmenter="jieba"), 0.9, 0.4),
        ("default tokens, k1=1.5 b=0.75", ChineseTokenizer(segmenter="jieba"), 1.5, 0.75),
        ("default tokens, k1=1.2 b=0.5", ChineseTokenizer(segmenter="jieba"), 1.2, 0.5),
    ]
    tokens_of: dict[str, list] = {}
    ablation = {}
    for label, tokenizer, k1, b in variants:
        key = json.dumps(tokenizer.to_json()) if tokenizer else "regex"
        if key not in tokens_of:
            tokenized = BM25Index(tokenizer).tokenize_many(texts) if tokenizer else None
            tokens_of[key] = tokenized or regex_tokens
        index = BM25Index(tokenizer, k1=k1, b=b)
        index.add_tokens(list(data.corpus), tokens_of[key])
        run = {}
        for (q, text), regex_query in zip(queries.items(), query_regex, strict=True):
            if tokenizer is None:
                index.tokenizer = lambda _text, tokens=regex_query: tokens
            run[q] = index.search(text, max(DEPTHS))
        alone = retrieval_scores({q: [d for d, _ in v] for q, v in run.items()}, qrels)["ndcg@10"]
        ablation[label] = (alone, fused(lists["dense"], run))
    return {
        "queries": len(queries),
        "docs": len(data.corpus),
        "build_s": build_s,
        "scores": scores,
        "sweep": sweep,
        "bm25_ablation": ablation,
    }


def render(results: dict) -> str:
    pct = lambda x: f"{100 * x:.2f}"  # noqa: E731
    lines = [
        "- Model: `../shared/models/me5-small-zh` (mean pooling, `query: `/`passage: ` prompts), "
        "fp32 on CPU; documents indexed whole (`chunk_size=0`), embedded Chroma (HNSW, cosine, "
        "ef_search 200); BM25 k1=1.2, b=0.75 on jieba search-mode words + Chinese characters, "
        "bundled stopwords; hybrid candidates: top 100 from each retriever",
        "- Defaults (one set for all data sets): relative-score fusion, dense 0.7 / BM25 0.3",
        "",
        "| set | queries / docs | method | nDCG@10 | Recall@100 |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for name, r in results.items():
        for method, s in r["scores"].items():
            lines.append(
                f"| {name} | {r['queries']} / {r['docs']} | {method} | {pct(s['ndcg@10'])} | "
                f"{pct(s['recall@100'])} |"
            )
    lines += ["", "Hybrid (default) minus the better single retriever, nDCG@10 points:", ""]
    for name, r in results.items():
        s = r["scores"]
        best = max(s["bm25"]["ndcg@10"], s["dense"]["ndcg@10"])
        lines.append(f"- {name}: {100 * (s['hybrid-relative (default)']['ndcg@10'] - best):+.2f}")
    lines += ["", "Fusion sweep (nDCG@10; the same per-retriever lists, top 100 unless noted):", ""]
    labels = list(next(iter(results.values()))["sweep"])
    lines.append("| fusion | " + " | ".join(results) + " |")
    lines.append("| --- |" + " ---: |" * len(results))
    for label in labels:
        lines.append(
            f"| {label} | " + " | ".join(pct(r["sweep"][label]) for r in results.values()) + " |"
        )
    lines += ["", "BM25 variants: nDCG@10 alone / hybrid (default fusion, same dense lists):", ""]
    labels = list(next(iter(results.values()))["bm25_ablation"])
    lines.append("| BM25 | " + " | ".join(results) + " |")
    lines.append("| --- |" + " ---: |" * len(results))
    for label in labels:
        cells = [r["bm25_ablation"][label] for r in results.values()]
        lines.append(f"| {label} | " + " | ".join(f"{pct(a)} / {pct(h)}" for a, h in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--json", help="also write the raw numbers to this file")
    parser.add_argument(
        "--cache",
        type=Path,
        default=default_vector_cache(),
        help="passage and query vectors (default: %(default)s; $PEG_BENCH_CACHE sets it)",
    )
    args = parser.parse_args()
    encoder = CachedEncoder(
        PEGEncoder.from_pretrained(MODEL, batch_size=64), args.cache, kinds=("passage", "query")
    )
    results = {}
    for name in args.sets:
        results[name] = evaluate(name, encoder)
        print(name, json.dumps(results[name]["scores"]), flush=True)
    body = render(results)
    publish("hybrid_quality", "Hybrid retrieval (issue 5): quality", body, results, args)


if __name__ == "__main__":
    main()
