"""``peg-rag train``: contrastive fine-tuning with PEG's huge batches and progressive weighting.

The same flags work with ``python -m peg_rag.trainer`` and
``accelerate launch -m peg_rag.trainer`` (several processes or GPUs).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

DESCRIPTION = (
    "Fine-tune an embedding model on query/pos/neg JSONL with in-batch and hard negatives, "
    "gradient caching (batch size independent of memory) and progressive weighting. "
    "Settings come from --config FILE.yaml, whose keys are these flags with underscores; "
    "flags win over the file."
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune an embedding model (PEG training)", description=DESCRIPTION
    )
    _add_arguments(parser)
    parser.set_defaults(run=run)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    from peg_rag.trainer.config import add_arguments

    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from peg_rag.trainer import config_from_args, train

    result = train(config_from_args(args))
    print(f"trained {result.step} steps; model saved to {result.model_dir}")
    if result.best:
        print(
            f"best {result.best['metric']} = {result.best['value']:.4f} at step "
            f"{result.best['step']}: {result.best_model_dir}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m peg_rag.trainer``: the ``peg-rag train`` command alone."""
    parser = argparse.ArgumentParser(prog="python -m peg_rag.trainer", description=DESCRIPTION)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
