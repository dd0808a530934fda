"""``python -m peg_rag.trainer`` (or ``accelerate launch -m peg_rag.trainer``): train a model,
with the same flags as ``peg-rag train``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .config import DESCRIPTION, TrainConfig, command_line
from .train import train


def main(argv: Sequence[str] | None = None) -> int:
    return command_line(
        argv,
        prog="python -m peg_rag.trainer",
        description=DESCRIPTION,
        schema=TrainConfig,
        train=train,
    )


if __name__ == "__main__":
    sys.exit(main())
