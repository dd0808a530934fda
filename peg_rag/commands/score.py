"""``peg-rag score``: add a reranker's teacher scores to a training JSONL, for distillation."""

from __future__ import annotations

import argparse
from pathlib import Path

from peg_rag import trainer

from .common import add_runtime_arguments, load_reranker


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="add a reranker's teacher scores (pos_scores, neg_scores) to a training JSONL",
        description="Score every (query, text) pair of each line's 'pos' and 'neg' with a "
        "cross-encoder and write a copy of INPUT whose lines gain 'pos_scores' and "
        "'neg_scores': the raw logits, in the order of 'pos' and 'neg' (a distilling trainer "
        "applies its temperature softmax to them). Other fields are kept. The output is built "
        "in OUT.jsonl.partial, fsynced chunk by chunk: an interrupted run, killed or not, "
        "continues where it stopped when started again with the same input and reranker "
        "(delete the .partial file to start over), and OUT.jsonl appears only once complete.",
    )
    parser.add_argument("input", type=Path, metavar="INPUT.jsonl")
    parser.add_argument("--output", type=Path, required=True, metavar="OUT.jsonl")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    group = parser.add_argument_group("reranker")
    group.add_argument(
        "--reranker", required=True, metavar="MODEL", help="hub id or local cross-encoder folder"
    )
    group.add_argument(
        "--max-length", type=int, help="max tokens per pair (default: the model's, at most 512)"
    )
    add_runtime_arguments(group, "pairs")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    trainer.check_output(args.input, args.output, overwrite=args.overwrite)  # before loading
    reranker = load_reranker(args, max_length=args.max_length)
    assert reranker is not None  # --reranker is required
    stats = trainer.score_file(
        reranker, args.input, args.output, overwrite=args.overwrite, show_progress_bar=True
    )
    print(f"wrote {args.output}: {stats.summary()}")
    return 0
