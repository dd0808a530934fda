"""Settings of hard-negative mining (light: the command line takes its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MiningOptions:
    """How many negatives to take, from which ranks, and the false-negative guards.

    ``reranker_threshold`` and ``reranker_margin`` set the reranker's guard (used only when
    mining is given a reranker), on sigmoid-normalized scores: drop a sampled candidate when
    ``sigmoid(score) >= reranker_threshold``, or when ``sigmoid(score) > sigmoid(lowest
    positive's score) - reranker_margin``. Set at most one; with neither, the margin rule with
    margin 0 applies: drop what the reranker prefers to the line's weakest positive.
    """

    negatives: int = 5
    range_min: int = 10
    range_max: int = 100
    max_score_ratio: float = 0.95
    seed: int = 0
    reranker_threshold: float | None = None
    reranker_margin: float | None = None

    def __post_init__(self) -> None:
        if self.negatives < 1:
            raise ValueError(f"negatives must be >= 1, got {self.negatives}")
        if not 0 <= self.range_min < self.range_max:
            raise ValueError(
                f"need 0 <= range_min < range_max, got {self.range_min}, {self.range_max}"
            )
        if self.reranker_threshold is not None and self.reranker_margin is not None:
            raise ValueError("set reranker_threshold or reranker_margin, not both")
        if self.reranker_threshold is not None and not 0 <= self.reranker_threshold <= 1:
            raise ValueError(
                f"reranker_threshold is a sigmoid score in [0, 1], got {self.reranker_threshold}"
            )
        if self.reranker_margin is not None and not -1 <= self.reranker_margin <= 1:
            raise ValueError(
                f"reranker_margin is a difference of sigmoid scores in [-1, 1], got "
                f"{self.reranker_margin}"
            )

    @property
    def reranker_rule_set(self) -> bool:
        """Whether a reranker threshold or margin was given (they need a reranker)."""
        return self.reranker_threshold is not None or self.reranker_margin is not None
