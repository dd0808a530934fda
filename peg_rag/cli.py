"""The ``peg-rag`` command line: one subcommand per module in ``peg_rag.commands``.

CLI layer: parses arguments, calls the library, prints. No library module imports it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from peg_rag.commands import (
    demo,
    encode,
    export,
    index,
    merge,
    mine,
    query,
    score,
    serve,
    train,
    train_reranker,
)
from peg_rag.commands import eval as evaluate
from peg_rag.core.extras import MissingExtraError

# Each module defines register(subparsers), which adds its parser and sets ``run``.
COMMANDS = (
    encode,
    mine,
    score,
    evaluate,
    train,
    train_reranker,
    merge,
    index,
    query,
    demo,
    serve,
    export,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peg-rag", description="Train and use robust Chinese text-embedding models."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError, MissingExtraError) as exc:  # one clear line, no traceback
        print(f"peg-rag {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
