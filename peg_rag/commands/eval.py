"""``peg-rag eval``: retrieval metrics on BEIR folders and Spearman on sentence pairs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peg_rag import retrieval
from peg_rag.core.files import write_text
from peg_rag.retrieval.settings import METHODS

from .common import add_encoder_arguments, add_reranker_arguments, load_encoder, load_reranker


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on BEIR folders and sentence-pair files",
        description="Score each PATH: a BEIR folder (corpus.jsonl, queries.jsonl, "
        "qrels/test.tsv) gives nDCG@10, MRR@10, Recall@10 and Recall@100 per method; a "
        "folder holding pairs.tsv (s1, s2, score), or such a .tsv file, gives the Spearman "
        "correlation of the embeddings' cosine with the gold scores. The JSON holds "
        "fractions in [0, 1]; the Markdown table shows them x 100, as C-MTEB reports.",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=["dense"],
        help="dense: exact search over the model's vectors; bm25 and hybrid: a HybridRetriever "
        "(jieba BM25, and its fusion with the dense store) over the whole documents",
    )
    parser.add_argument("--output", type=Path, metavar="RESULTS.json", help="write JSON here")
    parser.add_argument("--markdown", type=Path, metavar="TABLE.md", help="write the table here")
    add_encoder_arguments(parser)
    add_reranker_arguments(
        parser, "also score hybrid retrieval followed by this cross-encoder (hybrid+rerank)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    sets = retrieval.load_sets(args.paths)  # bad input fails before the model loads
    encoder = load_encoder(args)
    reranker = load_reranker(args)
    results = retrieval.evaluate_sets(
        encoder, sets, args.methods, reranker=reranker, rerank_top_n=args.rerank_top_n
    )
    table = retrieval.markdown_table(results)
    if args.output:
        report = {
            "model": args.model,
            "reranker": args.reranker,
            "scale": "fraction",
            "results": results,
        }
        write_text(args.output, json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    if args.markdown:
        write_text(args.markdown, table)
    print(table, end="")
    return 0
