"""A training run up to its first step: accelerate, data, models, AdamW with warmup and decay.

:func:`set_up` builds the :class:`Run` that the loop in train.py steps: the Accelerator, the
data, the PEGEncoder (and the optional guide model) prepared for training, the optimizer and
learning-rate schedule, the contrastive step, and where to start: step 0 or a checkpoint.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from peg_rag.core.extras import require

require("accelerate", "train", "peg-rag's trainer")  # first, so that the error names the extra
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

from peg_rag.core.encoder import PEGEncoder

from . import checkpoint as ckpt
from .collate import StepInputs, build_inputs
from .config import TrainConfig
from .data import Batch, TrainData
from .progressive import WEIGHTINGS
from .step import ContrastiveStep

logger = logging.getLogger("peg_rag")
# Settings that decide the data order: a resumed run must keep them to continue exactly.
DATA_ORDER_KEYS = (
    "train",
    "batch_size",
    "hard_negatives",
    "seed",
    "source_weights",
    "skip_bad_lines",
)


@dataclass
class Run:
    """A run ready to train; the loop advances ``step`` and ``data_state``."""

    config: TrainConfig
    output_dir: Path
    accelerator: Accelerator
    data: TrainData
    encoder: PEGEncoder  # the unwrapped model: what evaluation uses and checkpoints save
    model: torch.nn.Module  # encoder.model as prepared by accelerate (DDP-wrapped if distributed)
    optimizer: AcceleratedOptimizer
    scheduler: AcceleratedScheduler
    step_fn: ContrastiveStep
    prepare: Callable[[Batch], StepInputs]  # runs in the data thread
    total_steps: int
    step: int  # 0, or the resumed checkpoint's step
    data_state: dict[str, Any]  # the data position after ``step`` steps
    best: dict[str, Any] | None  # the resumed checkpoint's best evaluation


def set_up(config: TrainConfig) -> Run:
    """Build everything the first step needs and resume from a checkpoint when asked.

    ``config`` must be validated.
    """
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
    # The data first: a bad line should fail before minutes of model loading.
    data = TrainData(
        config.train,
        batch_size=config.batch_size,
        hard_negatives=config.hard_negatives,
        seed=config.seed,
        source_weights=config.source_weights,
        skip_bad_lines=config.skip_bad_lines,
    )
    encoder, guide = _load_models(config.model, config, accelerator.device)

    total_steps = config.max_steps or math.ceil(
        (config.epochs or 1.0) * data.total_lines / config.batch_size
    )
    model, optimizer, scheduler = accelerator.prepare(
        encoder.model, *_optimizer(config, encoder.model, total_steps)
    )
    trainee = copy.copy(encoder)  # embeds through the (possibly DDP-wrapped) prepared model
    trainee.model = model
    step_fn = ContrastiveStep(
        trainee,
        mini_batch_size=config.mini_batch_size,
        temperature=config.temperature,
        chunk_size=config.loss_chunk_size,
        false_negative_margin=config.false_negative_margin,
        guide=guide,
        weighting=None if config.progressive == "off" else WEIGHTINGS[config.weighting],
        backward=accelerator.backward,
        no_sync=lambda: accelerator.no_sync(model),
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
        encoder=encoder,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        step_fn=step_fn,
        prepare=_batch_preparer(config, encoder, guide),
        total_steps=total_steps,
        step=step,
        data_state=data_state,
        best=best,
    )


def _accelerator(config: TrainConfig, output_dir: Path) -> Accelerator:
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
    model: str, config: TrainConfig, device: torch.device
) -> tuple[PEGEncoder, PEGEncoder | None]:
    """The encoder to train, in float32 and ready for training, and the optional guide model."""
    encoder = PEGEncoder.from_pretrained(
        model,
        dtype="float32",
        device=device,
        pooling=config.pooling,
        query_prompt=config.query_prompt,
        passage_prompt=config.passage_prompt,
        max_length=config.max_length,
        trust_remote_code=config.trust_remote_code,
    )
    encoder.model.train()
    _freeze_unused(encoder)
    if config.gradient_checkpointing:
        _enable_checkpointing(encoder.model)
    guide = None
    if config.guide_model:
        guide = PEGEncoder.from_pretrained(
            config.guide_model,
            device=device,
            max_length=config.max_length,
            trust_remote_code=config.trust_remote_code,
        )
    return encoder, guide


def _freeze_unused(encoder: PEGEncoder) -> None:
    """Freeze parameters the embedding never uses (e.g. BERT's pooler): they would get no
    gradient, which DDP without find_unused_parameters treats as an error."""
    features = encoder.collate(encoder.tokenize(["probe"], "passage")[0])
    encoder.embed(features).sum().backward()
    for parameter in encoder.model.parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.requires_grad_(False)
    encoder.model.zero_grad(set_to_none=True)


def _enable_checkpointing(model: Any) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _optimizer(
    config: TrainConfig, model: torch.nn.Module, total_steps: int
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
        tokenize=_own_tokenizer(encoder).tokenize,
        mask_duplicates=config.mask_duplicates,
        guide_tokenize=None if guide is None else _own_tokenizer(guide).tokenize,
    )


def _own_tokenizer(encoder: PEGEncoder) -> PEGEncoder:
    """A copy of ``encoder`` with a copy of its tokenizer: a fast tokenizer must not be used by
    two threads at once, and evaluation tokenizes in the training thread."""
    tokenizing = copy.copy(encoder)
    tokenizing.tokenizer = copy.deepcopy(encoder.tokenizer)
    return tokenizing


def _resume(
    accelerator: Accelerator, config: TrainConfig, output_dir: Path, data: TrainData
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
    changed = [k for k in DATA_ORDER_KEYS if k in saved and saved[k] != getattr(config, k)]
    if changed:
        raise ValueError(
            f"resume: {', '.join(changed)} differ from the checkpoint {path}; they decide the "
            "data order, so the run could not continue exactly"
        )
    data.check_state(state["data"])
    accelerator.load_state(str(path))
    logger.info("resumed from %s at step %d", path, state["step"])
    return state["step"], state["data"], state.get("best")
