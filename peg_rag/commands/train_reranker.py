"""``peg-rag train-reranker``: fine-tune a cross-encoder reranker on query/pos/neg JSONL.

The same flags work with ``python -m peg_rag.trainer.reranker`` and
``accelerate launch -m peg_rag.trainer.reranker`` (several processes or GPUs).
"""

from __future__ import annotations

import argparse

from peg_rag import trainer
from peg_rag.trainer.config import add_arguments
from peg_rag.trainer.reranker_config import DESCRIPTION, RerankerConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-reranker",
        help="fine-tune a cross-encoder reranker (listwise or pointwise)",
        description=DESCRIPTION,
    )
    add_arguments(parser, RerankerConfig)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(trainer.train_reranker(trainer.reranker_config_from_args(args)).summary())
    return 0
