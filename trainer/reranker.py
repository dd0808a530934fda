"""Reranker training (``peg-rag train-reranker``): a cross-encoder on the embedder's machinery.

from peg_rag.trainer import make_reranker_config, train_reranker
result = train_reranker(make_reranker_config(model=..., train=["mined/"], output_dir="out"))

The data, batches, optimizer, schedule, accelerate set-up, checkpoints, exact resume,
logging and evaluation during training are the embedder's (setup.py, loop.py); what differs
is the model, a :class:`peg_rag.core.reranker.Reranker` (a cross-encoder, or any BERT-style
encoder with a new one-logit head), and the step (reranker_step.py): each query is a group of
its positive and ``group_size - 1`` negatives, scored pair by pair and trained with the
listwise softmax cross-entropy (listwise_loss.py) or pointwise BCE (pointwise_loss.py). The
default evaluation reranks held-out queries' candidate lists (reranker_eval.py); every saved
model loads with ``Reranker.from_pretrained`` and ``sentence_transformers.CrossEncoder``.

**Group size.** 8 by default: FlagEmbedding's default ``train_group_size`` (in its first
reranker trainer, ``FlagEmbedding/reranker/arguments.py``, and in the current
``FlagEmbedding.abc.finetune.reranker``), i.e. 1 positive + 7 hard negatives per query (mine
them with ``peg-rag mine --negatives 7``). A cross-encoder reads every (query, candidate)
pair in a forward pass of its own, and there are no in-batch negatives to get for free as
the embedder has, so each negative costs as much as the positive: 7 is enough for the
softmax to single out the hardest ones, at a cost a CPU run affords
(``trainer/configs/reranker.yaml``: 128 pairs per step). Larger groups (16 in
FlagEmbedding's bge-reranker fine-tuning example) help when the mined lists are long and
hard, at proportionally more compute per query.

    python -m peg_rag.trainer.reranker --config trainer/configs/reranker.yaml ...
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Callable
from typing import Any

import torch

from peg_rag.core.reranker import Reranker
from peg_rag.core.torch_backend import collate

from .config import command_line, validate
from .loop import TrainResult, run_training
from .reranker_config import DESCRIPTION, RerankerConfig
from .reranker_eval import RerankEvaluation
from .reranker_step import RerankerStep, build_pair_inputs
from .setup import Run, begin_run, complete_run, own_tokenizer, prepare_for_training
from .step import Step

__all__ = ["EvaluateReranker", "set_up_reranker", "train_reranker"]

EvaluateReranker = Callable[[Reranker, str], dict[str, float]]


def train_reranker(
    config: RerankerConfig, *, evaluate: EvaluateReranker | None = None
) -> TrainResult:
    """Train a reranker from ``config.model`` on ``config.train``; returns where it is.

    ``evaluate(reranker, path) -> {metric: value}`` runs on every ``eval_dirs`` entry every
    ``eval_steps`` steps and at the end (default: :class:`reranker_eval.RerankEvaluation`,
    which reports ndcg@10, mrr@10 and recall@10 of the reranked candidate lists).
    """
    validate(config)
    if evaluate is None:
        evaluation = RerankEvaluation(config.eval_top_n)
        for path in config.eval_dirs:  # a bad held-out set fails before training starts
            evaluation.load(path)
        evaluate = evaluation
    return run_training(set_up_reranker(config), evaluate)


def set_up_reranker(config: RerankerConfig) -> Run:
    """The embedder's set-up with a Reranker (a new head when the model has none) and the
    reranker step; ``config`` must be validated."""
    accelerator, data, output_dir = begin_run(config, hard_negatives=config.group_size - 1)
    assert config.model, "validate(config) checks it"
    reranker = Reranker.from_pretrained(
        config.model,
        new_head=True,
        dtype="float32",
        device=accelerator.device,
        max_length=config.max_length,
        trust_remote_code=config.trust_remote_code,
    )
    prepare_for_training(reranker.model, lambda: _probe(reranker), config.gradient_checkpointing)

    def make_step(model: torch.nn.Module, total_steps: int) -> Step:
        trainee = copy.copy(reranker)  # scores through the (possibly DDP-wrapped) prepared model
        trainee.model = model  # type: ignore[assignment]  # DDP forwards like the model
        return RerankerStep(
            trainee,
            mini_batch_size=config.mini_batch_size,
            loss=config.loss,
            backward=accelerator.backward,
            no_sync=lambda: accelerator.no_sync(model),
        )

    return complete_run(
        config,
        accelerator,
        data,
        output_dir,
        trainee=reranker,
        make_step=make_step,
        prepare=functools.partial(build_pair_inputs, tokenize=own_tokenizer(reranker).tokenize),
        shape=f"{config.batch_size} queries x (1 positive + {config.group_size - 1} negatives) "
        f"= {config.batch_size * config.group_size} pairs, {config.loss} loss",
    )


def _probe(reranker: Reranker) -> torch.Tensor:
    ids, types, _ = reranker.tokenize([("probe", "probe")])
    features = collate(ids, reranker.tokenizer.pad_token_id, reranker.device, types)
    return reranker.logits(features).sum()


def main(argv: Any = None) -> int:
    """``python -m peg_rag.trainer.reranker``: the flags of ``peg-rag train-reranker``."""
    return command_line(
        argv,
        prog="python -m peg_rag.trainer.reranker",
        description=DESCRIPTION,
        schema=RerankerConfig,
        train=train_reranker,
    )


if __name__ == "__main__":
    sys.exit(main())
