"""``peg-rag train``: contrastive fine-tuning with PEG's huge batches and progressive weighting.

The same flags work with ``python -m peg_rag.trainer`` and
``accelerate launch -m peg_rag.trainer`` (several processes or GPUs).
"""

from __future__ import annotations

import argparse

from peg_rag import trainer
from peg_rag.trainer.config import DESCRIPTION, add_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune an embedding model (PEG training)", description=DESCRIPTION
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(trainer.train(trainer.config_from_args(args)).summary())
    return 0
