"""Embedder training: :func:`train` builds the run (setup.py) and steps it (loop.py).

``TrainResult``, ``run_training`` and the output folder layout are loop.py's; they are
importable from here as before.
"""

from __future__ import annotations

from collections.abc import Callable

from peg_rag.core.encoder import PEGEncoder
from peg_rag.retrieval.evaluate import evaluate_folder

from .config import TrainConfig, validate
from .loop import TrainResult, run_training
from .setup import DATA_ORDER_KEYS, set_up

__all__ = ["DATA_ORDER_KEYS", "Evaluate", "TrainResult", "run_training", "train"]

Evaluate = Callable[[PEGEncoder, str], dict[str, float]]


def train(config: TrainConfig, *, evaluate: Evaluate | None = None) -> TrainResult:
    """Train ``config.model`` on ``config.train``; returns where the results are.

    ``evaluate(encoder, folder) -> {metric: value}`` runs on every ``eval_dirs`` entry every
    ``eval_steps`` steps and at the end (default:
    :func:`peg_rag.retrieval.evaluate.evaluate_folder`).
    """
    validate(config)
    return run_training(set_up(config), evaluate or evaluate_folder)
