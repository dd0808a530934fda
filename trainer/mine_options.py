"""Settings of hard-negative mining (light: the command line takes its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MiningOptions:
    """How many negatives to take, from which ranks, and the false-negative guard."""

    negatives: int = 5
    range_min: int = 10
    range_max: int = 100
    max_score_ratio: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.negatives < 1:
            raise ValueError(f"negatives must be >= 1, got {self.negatives}")
        if not 0 <= self.range_min < self.range_max:
            raise ValueError(
                f"need 0 <= range_min < range_max, got {self.range_min}, {self.range_max}"
            )
