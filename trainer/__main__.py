"""``python -m peg_rag.trainer`` (or ``accelerate launch -m peg_rag.trainer``): train a model."""

from __future__ import annotations

import sys

from peg_rag.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
