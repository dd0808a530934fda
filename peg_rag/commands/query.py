"""``peg-rag query``: search a hybrid index built by ``peg-rag index``."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from peg_rag import retrieval
from peg_rag.core.records import DataError, FileLine, read_jsonl, text_field
from peg_rag.retrieval.settings import FUSIONS, METHODS

from .common import add_reranker_arguments, add_runtime_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "query",
        help="search a hybrid index",
        description="Print the chunks that best answer a query, with their source and the "
        "fused and per-retriever scores. With --queries, answer every line of a JSONL file "
        "and write one JSON line per query.",
    )
    parser.add_argument("query", nargs="?", help="the question (or use --queries)")
    parser.add_argument("--index-dir", type=Path, required=True, metavar="DIR")
    parser.add_argument("-k", type=int, default=5, help="results per query (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--queries", type=Path, metavar="FILE.jsonl", help='{"id", "text"} per line'
    )
    parser.add_argument("--output", type=Path, help="write --queries results here (default stdout)")
    parser.add_argument(
        "--method", choices=METHODS, default=METHODS[0], help=f"default {METHODS[0]}"
    )
    parser.add_argument("--fusion", choices=FUSIONS, help="default: the index's")
    parser.add_argument(
        "--filter",
        type=json.loads,
        metavar="JSON",
        help='metadata filter, e.g. \'{"source": "a.md"}\'',
    )
    add_runtime_arguments(parser.add_argument_group("encoder runtime"), "queries")
    add_reranker_arguments(
        parser, "rerank the fused results with this cross-encoder (default: the index's, if any)"
    )
    parser.add_argument(
        "--no-rerank", action="store_true", help="skip the reranker the index records"
    )
    parser.set_defaults(run=run)


def _read_queries(path: Path) -> list[tuple[str, str]]:
    def parse(record: dict, where: FileLine) -> tuple[str, str]:
        query_id = record.get("id", record.get("_id"))
        if query_id is None or str(query_id) == "":
            raise DataError(where, "missing", "id")
        return str(query_id), text_field(record, "text", where)

    return list(read_jsonl(path, parse))


def _print_text(query: str, results: list[retrieval.RetrievalResult]) -> None:
    print(f"query: {query}")
    if not results:
        print("  (no results)")
    for rank, r in enumerate(results, start=1):
        source = r.metadata.get("source", r.doc_id)
        title = f" {r.metadata['title']}" if "title" in r.metadata else ""
        parts = [
            f"{name} #{r.ranks[name]} {r.scores[name]:.4f}"
            for name in ("dense", "bm25", "rerank")
            if r.ranks[name] is not None
        ]
        print(f"{rank:>3}. {r.score:.4f}  {r.id}  [{source}{title}]  ({', '.join(parts)})")
        print(textwrap.indent(textwrap.fill(r.text, width=100), "     "))


def run(args: argparse.Namespace) -> int:
    if (args.query is None) == (args.queries is None):
        raise ValueError("give either a query or --queries FILE.jsonl")
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    if args.no_rerank and args.reranker:
        raise ValueError("give --reranker or --no-rerank, not both")
    pairs = _read_queries(args.queries) if args.queries else [("", args.query)]
    retriever = retrieval.HybridRetriever.load(
        args.index_dir,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        batch_size=args.batch_size,
        reranker=False if args.no_rerank else args.reranker,
    )
    found = retriever.retrieve_many(
        [text for _, text in pairs],
        args.k,
        args.filter,
        method=args.method,
        fusion=args.fusion,
        rerank_top_n=args.rerank_top_n,
    )
    if not args.queries:
        if args.json:
            results = [r.to_dict() for r in found[0]]
            print(json.dumps({"query": args.query, "results": results}, ensure_ascii=False))
        else:
            _print_text(args.query, found[0])
        return 0
    out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        for (query_id, text), answers in zip(pairs, found, strict=True):
            line = {"id": query_id, "query": text, "results": [r.to_dict() for r in answers]}
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    return 0
