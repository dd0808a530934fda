"""Progressive learning: weight each query by how the model fares on it, more so over time.

PEG's abstract says progressive learning lets the model "dynamically modulate its attention to
the samples" over training; the paper's body is not available to us, so how it does so is our
reading. Every weighting here is a function of ``p_i``, the detached softmax probability of
query i's positive (its InfoNCE loss is ``-log p_i``), and of ``gamma(t)``, which grows from
``gamma_start`` to ``gamma_end`` over training on the ``progressive`` schedule. At gamma = 0
every query weighs 1 (plain InfoNCE); the loss normalizes the weights to mean 1 over the global
batch, so only their ratios matter. Two opposite readings are registered:

- ``focal``, ``w_i = (1 - p_i) ** gamma``: the focal-loss form. Queries the model already
  solves (p near 1) count less and less; the hardest count most. Under label noise the hardest
  queries are often the mislabelled ones (a wrong positive, a false negative), so this can
  amplify the noise.
- ``self_paced``, ``w_i = p_i ** gamma``: trust the easy queries. The hardest queries (low p,
  the likely mislabelled) count less and less, those the model agrees with count most:
  robustness to noisy labels, at the cost of learning less from hard but correct queries.
  With gamma = 2 a query at p = 0.1 weighs 1/81 of one at p = 0.9. It shares self-paced
  learning's preference for easy samples, but in the opposite order in time: classic
  self-paced learning starts from the easy samples and admits harder ones later, while here
  every query counts alike at first (when an untrained model's p says little) and the
  preference grows as the model's judgement becomes worth trusting.

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


def self_paced(p_positive: torch.Tensor, gamma: float) -> torch.Tensor:
    """p ** gamma: the hardest queries (lowest p) count least; gamma = 0 weighs all queries 1.

    Increasing in p for gamma > 0, and the more so the larger gamma: as gamma grows, the
    weight of a hard query relative to an easy one, (p_hard / p_easy) ** gamma, shrinks.
    """
    return p_positive.clamp(0, 1) ** gamma


register_weighting("focal", focal)
register_weighting("self_paced", self_paced)


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
