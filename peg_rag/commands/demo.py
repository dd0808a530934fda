"""``peg-rag demo``: index the bundled knowledge base and answer its sample questions."""

from __future__ import annotations

import argparse
from pathlib import Path

from peg_rag import apps, core

from .common import add_encoder_arguments, add_reranker_arguments, load_encoder, load_reranker


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="hybrid retrieval over the bundled Chinese knowledge base, offline",
        description="Index the bundled knowledge base (medical insurance, tourism, government "
        "services) into embedded Chroma + BM25 and answer its sample questions with sources "
        "and hit@k. Model: --model, else $PEG_RAG_MODEL, else TownsWu/PEG from the hub or "
        "local cache, else a small model trained on the knowledge base on the spot (cached). "
        "Reranker: --reranker, else BAAI/bge-reranker-base from the hub or local cache, else "
        "none; with one, hit@k is reported with and without it.",
    )
    parser.add_argument("--chat", action="store_true", help="ask your own questions instead")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny fallback model and 3 questions per domain"
    )
    parser.add_argument("-k", type=int, default=5, help="passages per question (hit@k)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="fallback models and the demo index (default: $PEG_RAG_CACHE or ~/.cache/peg-rag)",
    )
    parser.add_argument("--index-dir", type=Path, help="where to keep the index (default: cache)")
    add_encoder_arguments(parser, required=False)
    add_reranker_arguments(
        parser,
        "cross-encoder that reranks the hybrid results (default: BAAI/bge-reranker-base when "
        "the hub or local cache has it)",
    )
    parser.add_argument("--no-rerank", action="store_true", help="run without a reranker")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    if args.no_rerank and args.reranker:
        raise ValueError("give --reranker or --no-rerank, not both")

    def encoder(name: str) -> core.PEGEncoder:
        loaded = load_encoder(args, model=name)
        loaded.show_progress_bar = False  # indexing shows its own bar; queries need none
        return loaded

    def reranker(name: str) -> core.Reranker | None:
        # On the encoder's --device, --dtype and --quantize, as for peg-rag query.
        return load_reranker(argparse.Namespace(**{**vars(args), "reranker": name}))

    apps.run_demo(
        args.model,
        load_encoder=encoder,
        reranker=False if args.no_rerank else args.reranker,
        load_reranker=reranker,
        rerank_top_n=args.rerank_top_n,
        quick=args.quick,
        interactive=args.chat,
        k=args.k,
        cache=args.cache_dir,
        index_dir=args.index_dir,
    )
    return 0
