"""``python -m peg_rag.trainer`` (or ``accelerate launch -m peg_rag.trainer``): train a model,
with the same flags as ``peg-rag train``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .config import DESCRIPTION, add_arguments, config_from_args
from .train import train


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peg_rag.trainer", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = train(config_from_args(args))
    except (ValueError, OSError) as exc:  # bad input: one clear line, no traceback
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
