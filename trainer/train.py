"""The training loop: accelerate, AdamW with warmup and decay, logging, checkpoints, evaluation.

Output folder layout::

    model/                  the final model (PEGEncoder and sentence-transformers format)
    best-model/             the best model by metric_for_best, when set
    checkpoints/checkpoint-<step>/   resumable state, see checkpoint.py
    logs/                   tracker logs (TensorBoard by default)
    log.jsonl               every logged training and evaluation value, one JSON line each
    config.yaml             the settings of the run
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from peg_rag.core.extras import require

require("accelerate", "train", "peg-rag's trainer")  # first, so that the error names the extra
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

from peg_rag.core.encoder import PEGEncoder
from peg_rag.core.files import write_json, write_text
from peg_rag.retrieval.evaluate import evaluate_folder

from . import checkpoint as ckpt
from .collate import build_inputs
from .config import TrainConfig, validate
from .data import TrainData
from .progressive import WEIGHTINGS, gamma_at
from .step import ContrastiveStep, StepStats

logger = logging.getLogger("peg_rag")
Evaluate = Callable[[PEGEncoder, str], dict[str, float]]
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
class TrainResult:
    output_dir: Path
    model_dir: Path  # the final model
    step: int
    best_model_dir: Path | None = None
    best: dict[str, Any] | None = None  # {"step", "metric", "value"}
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation
    last_step: dict[str, float] = field(default_factory=dict)  # the last logged training values

    def summary(self) -> str:
        """What the command line prints at the end of a run."""
        lines = [f"trained {self.step} steps; model saved to {self.model_dir}"]
        if self.best:
            lines.append(
                f"best {self.best['metric']} = {self.best['value']:.4f} at step "
                f"{self.best['step']}: {self.best_model_dir}"
            )
        return "\n".join(lines)


def train(config: TrainConfig, *, evaluate: Evaluate | None = None) -> TrainResult:
    """Train ``config.model`` on ``config.train``; returns where the results are.

    ``evaluate(encoder, folder) -> {metric: value}`` runs on every ``eval_dirs`` entry every
    ``eval_steps`` steps and at the end (default: :func:`peg_rag.retrieval.evaluate.evaluate_folder`).
    """
    validate(config)

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    accelerator = Accelerator(
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
    main = accelerator.is_main_process
    if config.batch_size % accelerator.num_processes:
        raise ValueError(
            f"batch_size={config.batch_size} must be divisible by the "
            f"{accelerator.num_processes} processes"
        )
    if main:
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

    encoder = PEGEncoder.from_pretrained(
        config.model,
        dtype="float32",
        device=accelerator.device,
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
            device=accelerator.device,
            max_length=config.max_length,
            trust_remote_code=config.trust_remote_code,
        )

    total_steps = config.max_steps or math.ceil(
        (config.epochs or 1.0) * data.total_lines / config.batch_size
    )
    optimizer = torch.optim.AdamW(
        _parameter_groups(encoder.model, config.weight_decay),
        lr=config.learning_rate,
        eps=config.adam_epsilon,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        _lr_lambda(config.lr_schedule, total_steps, int(config.warmup_ratio * total_steps)),
    )
    model, optimizer, scheduler = accelerator.prepare(encoder.model, optimizer, scheduler)
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
    if config.resume:
        resumed = _resume(accelerator, config, output_dir, data)
        if resumed is not None:
            step, data_state, best = resumed
    log = _JsonLog(output_dir / "log.jsonl", main, keep_until=step)
    if config.report_to != "none":
        accelerator.init_trackers("peg-rag", config=_tracker_config(config))
    evaluator = (
        _Evaluator(config, evaluate, encoder, output_dir, best) if config.eval_dirs else None
    )

    # A copy of the tokenizer for the data thread: a fast tokenizer must not be used by two
    # threads at once, and evaluation tokenizes in this one.
    tokenizing = copy.copy(encoder)
    tokenizing.tokenizer = copy.deepcopy(encoder.tokenizer)
    guide_tokenize = None
    if guide is not None:
        guide_tokenizing = copy.copy(guide)
        guide_tokenizing.tokenizer = copy.deepcopy(guide.tokenizer)
        guide_tokenize = guide_tokenizing.tokenize

    def prepare(batch):
        return build_inputs(
            batch,
            tokenizing.tokenize,
            mask_duplicates=config.mask_duplicates,
            guide_tokenize=guide_tokenize,
        )

    if main:
        logger.info(
            "training %d steps on %d processes: %d queries x (1 positive + %d hard negatives) per "
            "step, %d lines in %d sources",
            total_steps,
            accelerator.num_processes,
            config.batch_size,
            config.hard_negatives,
            data.total_lines,
            len(data.index.sources),
        )

    def save_checkpoint() -> None:
        state = {
            "step": step,
            "data": data_state,
            "best": evaluator.best if evaluator else None,
            "config": config.to_dict(),
            "skipped_lines": data.index.skipped.count,
        }
        ckpt.save_checkpoint(accelerator, encoder, output_dir, step, state, config.save_total_limit)

    progress = tqdm(total=total_steps, initial=step, desc="Training", unit="step", disable=not main)
    last: dict[str, float] = {}
    metrics: dict[str, float] = {}
    truncated_warned = False
    batches = data.batches(data_state, prepare)
    try:
        while step < total_steps:
            started = time.perf_counter()
            inputs, _, data_state = next(batches)
            gamma = gamma_at(
                config.progressive,
                step,
                total_steps,
                config.gamma_start,
                config.gamma_end,
                config.gamma_stairs,
            )
            stats = step_fn(inputs, gamma)
            grad_norm = accelerator.clip_grad_norm_(
                model.parameters(), config.max_grad_norm or float("inf")
            )
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            if inputs.truncated and not truncated_warned and main:
                logger.warning(
                    "%d of %d texts of step %d exceed max_length=%d tokens and are truncated "
                    "(logged as 'truncated' every logging step)",
                    inputs.truncated,
                    inputs.n_texts,
                    step,
                    encoder.max_length,
                )
                truncated_warned = True
            if step % config.logging_steps == 0 or step == total_steps:
                last = _step_values(
                    stats,
                    gamma,
                    lr,
                    float(grad_norm),
                    inputs.truncated,
                    time.perf_counter() - started,
                )
                accelerator.log(last, step=step)
                log.write(step, last)
                progress.set_postfix(loss=f"{stats.loss:.4f}", rank=f"{stats.positive_rank:.1f}")
            if (
                evaluator
                and config.eval_steps
                and step % config.eval_steps == 0
                and step < total_steps
            ):
                metrics = evaluator.run(step, accelerator, log)
            if config.save_steps and step % config.save_steps == 0 and step < total_steps:
                save_checkpoint()
    finally:
        batches.close()
        data.close()
        progress.close()

    if evaluator:
        metrics = evaluator.run(step, accelerator, log)
    if config.save_steps:  # a last checkpoint, so that a finished run can be extended
        save_checkpoint()
    model_dir = output_dir / "model"
    if main:
        ckpt.save_model_atomically(encoder, model_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        output_dir=output_dir,
        model_dir=model_dir,
        step=step,
        best_model_dir=evaluator.best_dir if evaluator and evaluator.best else None,
        best=evaluator.best if evaluator else None,
        metrics=metrics,
        last_step=last,
    )


def _mixed_precision(setting: str, on_gpu: bool) -> str:
    if setting != "auto":
        return setting
    if not on_gpu:
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _freeze_unused(encoder: PEGEncoder) -> None:
    """Freeze parameters the embedding never uses (e.g. BERT's pooler): they would get no
    gradient, which DDP without find_unused_parameters treats as an error."""
    features = encoder.collate(encoder.tokenize(["probe"], "passage")[0])
    encoder.embed(features).sum().backward()
    for parameter in encoder.model.parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.requires_grad_(False)
    encoder.model.zero_grad(set_to_none=True)


def _enable_checkpointing(model: torch.nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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


def _step_values(
    stats: StepStats, gamma: float, lr: float, grad_norm: float, truncated: int, seconds: float
) -> dict[str, float]:
    return {
        "train/loss": stats.loss,
        "train/lr": lr,
        "train/gamma": gamma,
        "train/weight_mean": stats.weight_mean,
        "train/weight_min": stats.weight_min,
        "train/weight_max": stats.weight_max,
        "train/positive_rank": stats.positive_rank,
        "train/accuracy": stats.accuracy,
        "train/grad_norm": grad_norm,
        "train/masked": stats.masked,
        "train/truncated": truncated,
        "train/texts_per_second": stats.texts / seconds,
    }


def _tracker_config(config: TrainConfig) -> dict[str, Any]:
    """Settings as scalars/strings, which is all TensorBoard's hparams accept."""
    return {
        key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
        for key, value in config.to_dict().items()
    }


def _resume(accelerator, config: TrainConfig, output_dir: Path, data: TrainData):
    """Load a checkpoint; returns (step, data state, best) or None to start afresh."""
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


class _JsonLog:
    """Appends {"step": ..., values} lines; on resume drops lines past the resumed step."""

    def __init__(self, path: Path, enabled: bool, keep_until: int) -> None:
        self.path = path
        self.enabled = enabled
        if enabled and path.exists():
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= keep_until
            ]
            write_text(path, "".join(line + "\n" for line in kept))

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **values}, ensure_ascii=False) + "\n")


class _Evaluator:
    """Evaluates on the main process, logs the metrics, keeps the best model."""

    def __init__(self, config, evaluate, encoder, output_dir: Path, best) -> None:
        self.config = config
        self.evaluate = evaluate or evaluate_folder
        self.encoder = encoder
        self.best = best
        self.best_dir = output_dir / "best-model"

    def run(self, step: int, accelerator, log: _JsonLog) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if accelerator.is_main_process:
            for folder in self.config.eval_dirs:
                name = Path(folder).name if Path(folder).is_dir() else Path(folder).parent.name
                for key, value in self.evaluate(self.encoder, folder).items():
                    metrics[f"{name}/{key}"] = float(value)
            self.encoder.model.train()  # in case an evaluate function switched it to eval
            values = {f"eval/{k}": v for k, v in metrics.items()}
            accelerator.log(values, step=step)
            log.write(step, values)
            self._keep_best(step, metrics)
        accelerator.wait_for_everyone()
        return metrics

    def _keep_best(self, step: int, metrics: dict[str, float]) -> None:
        name = self.config.metric_for_best
        if not name:
            return
        if name not in metrics:
            raise ValueError(
                f"metric_for_best {name!r} is not among the metrics: {', '.join(sorted(metrics))}"
            )
        if self.best is None or metrics[name] > self.best["value"]:
            ckpt.save_model_atomically(self.encoder, self.best_dir)
            self.best = {"step": step, "metric": name, "value": metrics[name]}
            write_json(self.best_dir / "best.json", self.best, indent=2)
