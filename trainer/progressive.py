"""Progressive learning: weight each query by how hard it still is, more so as training goes on.

Our reading of PEG (the paper's text is not available to us): query i gets the weight
``w_i = (1 - p_i) ** gamma(t)``, where ``p_i`` is the detached softmax probability of its
positive, and ``gamma(t)`` grows from ``gamma_start`` to ``gamma_end`` over training. Early on
every query counts the same (gamma = 0 gives plain InfoNCE); later, queries the model already
solves count less. The loss normalizes the weights to mean 1 over the global batch.

Weighting functions are looked up by name in WEIGHTINGS, so other readings can be registered
with ``register_weighting`` and compared through the ``weighting`` setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Weighting = Callable[[torch.Tensor, float], torch.Tensor]
WEIGHTINGS: dict[str, Weighting] = {}


def register_weighting(name: str, function: Weighting) -> None:
    """Make ``function(p_positive, gamma) -> raw weights`` selectable as ``weighting: name``."""
    WEIGHTINGS[name] = function


def focal(p_positive: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 - p) ** gamma: the focal-loss form; 0 ** 0 is 1, so gamma = 0 weighs all queries 1."""
    return (1 - p_positive).clamp_min(0) ** gamma


register_weighting("focal", focal)


def gamma_at(
    schedule: str, step: int, total_steps: int, start: float, end: float, stairs: int = 4
) -> float:
    """gamma(t) at 0-based ``step`` of ``total_steps``: ``start`` at the first step, ``end`` at
    the last. ``linear`` and ``cosine`` ramp smoothly; ``step`` climbs ``stairs`` equal levels.
    ``off`` is always 0."""
    if schedule == "off":
        return 0.0
    t = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    if schedule == "linear":
        fraction = t
    elif schedule == "cosine":
        fraction = (1 - math.cos(math.pi * t)) / 2
    elif schedule == "step":
        fraction = min(math.floor(t * stairs), stairs - 1) / (stairs - 1)
    else:
        raise ValueError(f"unknown gamma schedule {schedule!r}")
    return start + (end - start) * fraction
