"""A training run up to its first step: accelerate, data, models, AdamW with warmup and decay.

:func:`set_up` builds the :class:`Run` that the loop in train.py steps for the embedder: the
Accelerator, the data, the PEGEncoder (and the optional guide model) prepared for training,
the optimizer and learning-rate schedule, the contrastive step, and where to start: step 0 or
a checkpoint. The reranker's set-up (reranker.py) shares everything but the model and the
step: :func:`begin_run` (output folder, accelerator, data) before its model loads and
:func:`complete_run` (optimizer, schedule, accelerate, resume) after.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import yaml

from peg_rag.core.extras import require

require("accelerate", "train", "peg-rag's trainer")  # first, so that the error names the extra
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

from peg_rag.core.encoder import PEGEncoder
from peg_rag.core.records import FileLine

from . import checkpoint as ckpt
from .collate import StepInputs, build_inputs
from .config import RunConfig, TrainConfig
from .data import Batch, TrainData
from .distributed import rank_and_world
from .progressive import WEIGHTINGS, gamma_at
from .step import ContrastiveStep, Step, StepLog

logger = logging.getLogger("peg_rag")
# The embedder's settings that decide the data order (a resumed run must keep them).
DATA_ORDER_KEYS = TrainConfig.DATA_ORDER_KEYS


class Trainee(Protocol):
    """What the loop trains, evaluates and saves: a PEGEncoder or a Reranker."""

    @property
    def model(self) -> torch.nn.Module: ...

    @property
    def max_length(self) -> int: ...

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None: ...


@dataclass
class Run:
    """A run ready to train; the loop advances ``step`` and ``data_state``."""

    config: RunConfig
    output_dir: Path
    accelerator: Accelerator
    data: TrainData
    trainee: Trainee  # the unwrapped model: what evaluation uses and checkpoints save
    model: torch.nn.Module  # trainee.model as prepared by accelerate (DDP-wrapped if distributed)
    optimizer: AcceleratedOptimizer
    scheduler: AcceleratedScheduler
    step_fn: Step
    prepare: Callable[[Batch], Any]  # batch -> step inputs; runs in the data thread
    shape: str  # what one step trains on, for the first log line
    total_steps: int
    step: int  # 0, or the resumed checkpoint's step
    data_state: dict[str, Any]  # the data position after ``step`` steps
    best: dict[str, Any] | None  # the resumed checkpoint's best evaluation


def set_up(config: TrainConfig) -> Run:
    """Build everything the embedder's first step needs; resume from a checkpoint when asked.

    ``config`` must be validated.
    """
    accelerator, data, output_dir = begin_run(config, hard_negatives=config.hard_negatives)
    encoder, guide, anchor = _load_models(config, accelerator.device)

    def make_step(model: torch.nn.Module, total_steps: int) -> Step:
        trainee = copy.copy(encoder)  # embeds through the (possibly DDP-wrapped) prepared model
        trainee.model = model  # type: ignore[assignment]  # DDP forwards like the model
        contrastive = ContrastiveStep(
            trainee,
            mini_batch_size=config.mini_batch_size,
            temperature=config.temperature,
            chunk_size=config.loss_chunk_size,
            false_negative_margin=config.false_negative_margin,
            guide=guide,
            weighting=None if config.progressive == "off" else WEIGHTINGS[config.weighting],
            distill_weight=config.distill_weight,
            teacher_temperature=config.teacher_temperature,
            anchor=anchor,
            anchor_weight=config.anchor_weight,
            gather_queries=config.log_line_weights is not None,
            backward=accelerator.backward,
            no_sync=lambda: accelerator.no_sync(model),
        )
        return ProgressiveStep(contrastive, config, total_steps)

    return complete_run(
        config,
        accelerator,
        data,
        output_dir,
        trainee=encoder,
        make_step=make_step,
        prepare=_batch_preparer(config, encoder, guide),
        shape=f"{config.batch_size} queries x (1 positive + {config.hard_negatives} hard "
        "negatives)",
    )


class ProgressiveStep:
    """The embedder's step: gamma(t) of progressive learning, then the contrastive step; with
    ``log_line_weights``, each query's weight is appended to that file (main process only)."""

    def __init__(self, contrastive: ContrastiveStep, config: TrainConfig, total_steps: int):
        self.contrastive = contrastive
        self.config = config
        self.total_steps = total_steps
        self.line_weights = (
            LineWeightLog(Path(config.log_line_weights))
            if config.log_line_weights and rank_and_world()[0] == 0
            else None
        )

    def __call__(self, inputs: StepInputs, step: int) -> StepLog:
        config = self.config
        gamma = gamma_at(
            config.progressive,
            step,
            self.total_steps,
            config.gamma_start,
            config.gamma_end,
            config.gamma_stairs,
        )
        stats = self.contrastive(inputs, gamma)
        values = {
            "loss": stats.loss,
            "gamma": gamma,
            "weight_mean": stats.weight_mean,
            "weight_min": stats.weight_min,
            "weight_max": stats.weight_max,
            "positive_rank": stats.positive_rank,
            "accuracy": stats.accuracy,
            "masked": float(stats.masked),
        }
        if config.distill_weight > 0:
            values.update(distill_kl=stats.distill_kl, distilled=stats.distilled)
        if config.anchor_weight > 0:
            values.update(anchor_distance=stats.anchor_distance)
        if self.line_weights is not None and stats.query_values is not None:
            self.line_weights.write(step + 1, gamma, inputs.origins, stats.query_values)
        return StepLog(values, stats.texts)


class LineWeightLog:
    """Per-query weights for studying what a weighting does to each training line.

    Each step appends one JSON row per query of the global batch,
    ``{"step", "file", "line", "gamma", "weight", "p_positive"}``: ``step`` counts from 1 as in
    log.jsonl, (file, line) is the query's training line (1-based line number), ``weight`` the
    raw weight before normalizing to mean 1, and ``p_positive`` the softmax probability of its
    positive that the weighting saw. Every weighting is a function of (p_positive, gamma), so
    the rows also give what any other weighting would have assigned. A line drawn twice in a
    step has two rows. A resumed run appends again from its checkpoint's step, so steps after
    it can appear twice: keep the last rows of each step.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(
        self, step: int, gamma: float, origins: Sequence[FileLine], values: torch.Tensor
    ) -> None:
        """Append the rows of ``step``: ``values`` is (queries, 2) raw weight and p_positive."""
        rows = [
            json.dumps(
                {
                    "step": step,
                    "file": str(where.path),
                    "line": where.line,
                    "gamma": gamma,
                    "weight": weight,
                    "p_positive": p,
                },
                ensure_ascii=False,
            )
            for where, (weight, p) in zip(origins, values.tolist(), strict=True)
        ]
        with self.path.open("a", encoding="utf-8") as handle:  # closed, so flushed, each step
            handle.write("".join(row + "\n" for row in rows))


def begin_run(config: RunConfig, *, hard_negatives: int) -> tuple[Accelerator, TrainData, Path]:
    """The output folder (config.yaml written, partial writes removed), the Accelerator, the
    seed, and the data with ``hard_negatives`` negatives per query: all before a model loads,
    so that a bad line fails before minutes of model loading."""
    assert config.model and config.output_dir, "validate(config) checks both"
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = _accelerator(config, output_dir)
    if config.batch_size % accelerator.num_processes:
        raise ValueError(
            f"batch_size={config.batch_size} must be divisible by the "
            f"{accelerator.num_processes} processes"
        )
    if accelerator.is_main_process:
        ckpt.remove_partial(output_dir)
        (output_dir / "config.yaml").write_text(
            yaml.safe_dump(config.to_dict(), allow_unicode=True, sort_keys=False), encoding="utf-8"
        )
    set_seed(config.seed)
    data = TrainData(
        config.train,
        batch_size=config.batch_size,
        hard_negatives=hard_negatives,
        seed=config.seed,
        source_weights=config.source_weights,
        skip_bad_lines=config.skip_bad_lines,
        general_sources=config.general_sources,
        mix_general=config.mix_general,
    )
    return accelerator, data, output_dir


def complete_run(
    config: RunConfig,
    accelerator: Accelerator,
    data: TrainData,
    output_dir: Path,
    *,
    trainee: Trainee,
    make_step: Callable[[torch.nn.Module, int], Step],
    prepare: Callable[[Batch], Any],
    shape: str,
) -> Run:
    """AdamW and its schedule over the run's steps, prepared by accelerate with
    ``trainee.model``; the step built by ``make_step(prepared model, total steps)``; and the
    start: step 0, or the checkpoint ``config.resume`` names."""
    total_steps = config.max_steps or math.ceil(
        (config.epochs or 1.0) * data.total_lines / config.batch_size
    )
    model, optimizer, scheduler = accelerator.prepare(
        trainee.model, *_optimizer(config, trainee.model, total_steps)
    )
    step, data_state, best = 0, data.initial_state(), None
    resumed = _resume(accelerator, config, output_dir, data)
    if resumed is not None:
        step, data_state, best = resumed
    return Run(
        config=config,
        output_dir=output_dir,
        accelerator=accelerator,
        data=data,
        trainee=trainee,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        step_fn=make_step(model, total_steps),
        prepare=prepare,
        shape=shape,
        total_steps=total_steps,
        step=step,
        data_state=data_state,
        best=best,
    )


def _accelerator(config: RunConfig, output_dir: Path) -> Accelerator:
    on_gpu = torch.cuda.is_available()
    return Accelerator(
        cpu=not on_gpu and not torch.backends.mps.is_available(),
        mixed_precision=_mixed_precision(config.mixed_precision, on_gpu),
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        # One scheduler step per optimizer step: our batch is already global.
        step_scheduler_with_optimizer=False,
        # BERT's buffers (position ids) never change, so there is nothing to broadcast.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )


def _mixed_precision(setting: str, on_gpu: bool) -> str:
    if setting != "auto":
        return setting
    if not on_gpu:
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _load_models(
    config: TrainConfig, device: torch.device
) -> tuple[PEGEncoder, PEGEncoder | None, PEGEncoder | None]:
    """The encoder to train, in float32 and ready for training; the optional guide model;
    with ``anchor_weight``, a frozen copy of the starting model (on resume too: the anchor is
    where training began, not the checkpoint)."""
    assert config.model, "validate(config) checks it"
    model: str = config.model

    def load() -> PEGEncoder:
        return PEGEncoder.from_pretrained(
            model,
            dtype="float32",
            device=device,
            pooling=config.pooling,
            query_prompt=config.query_prompt,
            passage_prompt=config.passage_prompt,
            max_length=config.max_length,
            trust_remote_code=config.trust_remote_code,
        )

    encoder = load()
    anchor = load() if config.anchor_weight else None
    prepare_for_training(
        encoder.model,
        lambda: encoder.embed(encoder.collate(encoder.tokenize(["probe"], "passage")[0])).sum(),
        config.gradient_checkpointing,
    )
    guide = None
    if config.guide_model:
        guide = PEGEncoder.from_pretrained(
            config.guide_model,
            device=device,
            max_length=config.max_length,
            trust_remote_code=config.trust_remote_code,
        )
    return encoder, guide, anchor


def prepare_for_training(
    model: torch.nn.Module, probe: Callable[[], torch.Tensor], gradient_checkpointing: bool
) -> None:
    """Training mode; parameters that ``probe()`` (a scalar from a forward pass) does not
    depend on are frozen (e.g. BERT's pooler under an embedder): they would get no gradient,
    which DDP without find_unused_parameters treats as an error; and gradient checkpointing
    when asked."""
    model.train()
    probe().backward()
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    if gradient_checkpointing:
        _enable_checkpointing(model)


def _enable_checkpointing(model: Any) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _optimizer(
    config: RunConfig, model: torch.nn.Module, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its learning-rate schedule over ``total_steps`` steps."""
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, config.weight_decay),
        lr=config.learning_rate,
        eps=config.adam_epsilon,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        _lr_lambda(config.lr_schedule, total_steps, int(config.warmup_ratio * total_steps)),
    )
    return optimizer, scheduler


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases and norm weights (1-D) are not decayed."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def _lr_lambda(schedule: str, total: int, warmup: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` steps, then linear/cosine decay to 0 or constant."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def _batch_preparer(
    config: TrainConfig, encoder: PEGEncoder, guide: PEGEncoder | None
) -> Callable[[Batch], StepInputs]:
    """Turns a batch into step inputs, with tokenizers of its own for the data thread."""
    return functools.partial(
        build_inputs,
        tokenize=own_tokenizer(encoder).tokenize,
        mask_duplicates=config.mask_duplicates,
        guide_tokenize=None if guide is None else own_tokenizer(guide).tokenize,
    )


class _HasTokenizer(Protocol):
    tokenizer: Any


T = TypeVar("T", bound=_HasTokenizer)


def own_tokenizer(owner: T) -> T:
    """A copy of ``owner`` (an encoder or reranker) with a copy of its tokenizer: a fast
    tokenizer must not be used by two threads at once, and evaluation tokenizes in the
    training thread while the data thread prepares the next batch."""
    tokenizing = copy.copy(owner)
    tokenizing.tokenizer = copy.deepcopy(owner.tokenizer)
    return tokenizing


def _resume(
    accelerator: Accelerator, config: RunConfig, output_dir: Path, data: TrainData
) -> tuple[int, dict[str, Any], dict[str, Any] | None] | None:
    """Load a checkpoint; returns (step, data state, best) or None to start afresh."""
    if not config.resume:
        return None
    if config.resume == "latest":
        found = ckpt.checkpoints(output_dir)
        if not found:
            logger.info("no checkpoint in %s yet: starting from the beginning", output_dir)
            return None
        path = found[-1]
    else:
        path = Path(config.resume)
        if not path.is_dir():
            raise ValueError(f"resume: checkpoint folder {path} does not exist")
    state = ckpt.read_state(path)
    saved = state.get("config", {})
    changed = [
        k for k in type(config).DATA_ORDER_KEYS if k in saved and saved[k] != getattr(config, k)
    ]
    if changed:
        raise ValueError(
            f"resume: {', '.join(changed)} differ from the checkpoint {path}; they decide the "
            "data order, so the run could not continue exactly"
        )
    data.check_state(state["data"])
    accelerator.load_state(str(path))
    logger.info("resumed from %s at step %d", path, state["step"])
    return state["step"], state["data"], state.get("best")
