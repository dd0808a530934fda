"""Settings of ``peg-rag train-reranker``: the keys every run has plus the reranker's own.

Light, like config.py: the command line imports it for its flags. YAML keys are flags here
too (``group_size: 8`` is ``--group-size 8``), with the same checks and error messages.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .config import Bad, RunConfig, build_config, config_from_namespace, setting

DESCRIPTION = (
    "Fine-tune a cross-encoder reranker on the embedder's query/pos/neg JSONL: each query "
    "is a group of its positive and group_size - 1 negatives (mined ones from 'neg', filled "
    "with other lines' positives when short), scored together and trained with a listwise "
    "softmax cross-entropy (or pointwise BCE). Start from a cross-encoder or from any "
    "BERT-style encoder, which gets a new one-logit head. Settings come from --config "
    "FILE.yaml, whose keys are these flags with underscores; flags win over the file."
)
# The loss functions by name (reranker_step.LOSSES holds them; this module stays light).
LOSSES = ("listwise", "pointwise")


@dataclass
class RerankerConfig(RunConfig):
    """Settings of a reranker's training run; see ``trainer/configs/reranker.yaml``."""

    DATA_ORDER_KEYS: ClassVar[tuple[str, ...]] = (*RunConfig.DATA_ORDER_KEYS, "group_size")

    # Redefined keys keep their place among RunConfig's; only default and help change.
    batch_size: int = setting(
        16, "query groups per global batch, i.e. per optimizer step (all processes)", rule=">= 1"
    )
    mini_batch_size: int = setting(
        4,
        "query groups per forward/backward pass (group_size pairs each); their gradients "
        "are accumulated, one optimizer step per batch",
        rule=">= 1",
    )
    max_length: int | None = setting(
        None,
        "max tokens per (query, passage) pair, cut longest-first (default: the model's, "
        "at most 512)",
        rule=">= 1",
    )
    eval_dirs: list[str] = setting(
        [],
        "held-out sets reranked during training: JSONL files of held-out lines (candidates: "
        "pos + neg; relevant: pos) or BEIR folders (candidates: BM25 top eval_top_n)",
    )
    metric_for_best: str | None = setting(
        None, "keep the best model by this metric, e.g. held-out/ndcg@10"
    )
    # The reranker's own keys.
    group_size: int = setting(
        8,
        "candidates per query: its positive and group_size - 1 negatives from 'neg' "
        "(filled with other lines' positives when short)",
        rule=">= 2",
    )
    loss: str = setting(
        "listwise",
        "listwise: softmax cross-entropy over each group; pointwise: binary cross-entropy per pair",
        choices=LOSSES,
    )
    eval_top_n: int = setting(
        30, "first-stage (BM25) candidates reranked per query of a BEIR eval folder", rule=">= 1"
    )

    def check(self, bad: Bad) -> None:
        for path in self.eval_dirs:
            if not Path(path).is_dir() and Path(path).suffix != ".jsonl":
                raise bad(
                    "eval_dirs",
                    f"expected a BEIR folder or a .jsonl file of held-out lines, got {path}",
                )


def make_reranker_config(
    values: dict[str, Any] | None = None, *, config_file: str | Path | None = None, **overrides: Any
) -> RerankerConfig:
    """Build and validate a reranker's config: defaults < YAML file < ``values`` < ``overrides``."""
    return build_config(RerankerConfig, values, config_file=config_file, **overrides)


def reranker_config_from_args(args: argparse.Namespace) -> RerankerConfig:
    """The RerankerConfig of a namespace parsed with ``add_arguments(parser, RerankerConfig)``."""
    return config_from_namespace(RerankerConfig, args)
