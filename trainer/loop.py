"""The training loop: steps, logging, checkpoints, evaluation, whatever the model and loss.

:func:`run_training` steps a :class:`setup.Run`: it calls the run's step object, clips the
gradients, steps the optimizer and schedule, logs, evaluates and writes checkpoints, then
saves the final model. train.py's ``train`` (the embedder) and reranker.py's
``train_reranker`` build their runs and hand them to it.

Output folder layout::

    model/                  the final model (PEGEncoder or Reranker format; both load in
                            sentence-transformers)
    best-model/             the best model by metric_for_best, when set
    checkpoints/checkpoint-<step>/   resumable state, see checkpoint.py
    logs/                   tracker logs (TensorBoard by default)
    log.jsonl               every logged training and evaluation value, one JSON line each
    config.yaml             the settings of the run
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from peg_rag.core.files import write_json, write_text
from peg_rag.retrieval.evaluate import set_name

from . import checkpoint as ckpt
from .config import RunConfig
from .setup import Run, Trainee
from .step import StepLog

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["TrainResult", "run_training"]

logger = logging.getLogger("peg_rag")


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


def run_training(
    run: Run,
    evaluate: Callable[[Any, str], dict[str, float]],
) -> TrainResult:
    """Step ``run`` to its last step, then evaluate, save the final model and return.

    ``evaluate(run.trainee, path)`` scores each ``eval_dirs`` entry, named in the metrics as
    ``peg-rag eval`` names sets (:func:`peg_rag.retrieval.evaluate.set_name`).
    """
    config = run.config
    accelerator, main = run.accelerator, run.accelerator.is_main_process
    log = _JsonLog(run.output_dir / "log.jsonl", main, keep_until=run.step)
    if config.report_to != "none":
        accelerator.init_trackers("peg-rag", config=_tracker_config(config))
    evaluator = (
        _Evaluator(config, evaluate, run.trainee, run.output_dir, run.best)
        if config.eval_dirs
        else None
    )
    if main:
        logger.info(
            "training %d steps on %d processes: %s per step, %d lines in %d sources",
            run.total_steps,
            accelerator.num_processes,
            run.shape,
            run.data.total_lines,
            len(run.data.index.sources),
        )

    last = _train_steps(run, log, evaluator)

    metrics = evaluator.run(run.step, accelerator, log) if evaluator else {}
    if config.save_steps:  # a last checkpoint, so that a finished run can be extended
        _save_checkpoint(run, evaluator)
    model_dir = run.output_dir / "model"
    if main:
        ckpt.save_model_atomically(run.trainee, model_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        output_dir=run.output_dir,
        model_dir=model_dir,
        step=run.step,
        best_model_dir=evaluator.best_dir if evaluator and evaluator.best else None,
        best=evaluator.best if evaluator else None,
        metrics=metrics,
        last_step=last,
    )


def _train_steps(run: Run, log: _JsonLog, evaluator: _Evaluator | None) -> dict[str, float]:
    """Step from ``run.step`` to ``run.total_steps``, logging, evaluating and saving
    checkpoints on the way; returns the last logged training values."""
    config, accelerator = run.config, run.accelerator
    main = accelerator.is_main_process
    progress = tqdm(
        total=run.total_steps, initial=run.step, desc="Training", unit="step", disable=not main
    )
    last: dict[str, float] = {}
    truncated_warned = False
    batches = run.data.batches(run.data_state, run.prepare)
    try:
        while run.step < run.total_steps:
            started = time.perf_counter()
            inputs, _, run.data_state = next(batches)
            stats = run.step_fn(inputs, run.step)
            grad_norm = accelerator.clip_grad_norm_(
                run.model.parameters(), config.max_grad_norm or float("inf")
            )
            lr = run.scheduler.get_last_lr()[0]  # the rate this step used
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            progress.update(1)
            if inputs.truncated and not truncated_warned and main:
                logger.warning(
                    "%d of %d texts of step %d exceed max_length=%d tokens and are truncated "
                    "(logged as 'truncated' every logging step)",
                    inputs.truncated,
                    inputs.n_texts,
                    run.step,
                    run.trainee.max_length,
                )
                truncated_warned = True
            if run.step % config.logging_steps == 0 or run.step == run.total_steps:
                last = _step_values(
                    stats, lr, float(grad_norm), inputs.truncated, time.perf_counter() - started
                )
                accelerator.log(last, step=run.step)
                log.write(run.step, last)
                progress.set_postfix(
                    loss=f"{stats.values['loss']:.4f}",
                    rank=f"{stats.values['positive_rank']:.1f}",
                )
            # The last step's evaluation and checkpoint follow the loop.
            before_end = run.step < run.total_steps
            if evaluator and config.eval_steps and run.step % config.eval_steps == 0 and before_end:
                evaluator.run(run.step, accelerator, log)
            if config.save_steps and run.step % config.save_steps == 0 and before_end:
                _save_checkpoint(run, evaluator)
    finally:
        batches.close()
        run.data.close()
        progress.close()
    return last


def _save_checkpoint(run: Run, evaluator: _Evaluator | None) -> None:
    state = {
        "step": run.step,
        "data": run.data_state,
        "best": evaluator.best if evaluator else None,
        "config": run.config.to_dict(),
        "skipped_lines": run.data.index.skipped.count,
    }
    ckpt.save_checkpoint(
        run.accelerator, run.trainee, run.output_dir, run.step, state, run.config.save_total_limit
    )


def _step_values(
    stats: StepLog, lr: float, grad_norm: float, truncated: int, seconds: float
) -> dict[str, float]:
    """The step's values and the loop's (lr, grad norm, truncated texts, throughput)."""
    values = {f"train/{name}": value for name, value in stats.values.items()}
    values.update(
        {
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/truncated": truncated,
            "train/texts_per_second": stats.texts / seconds,
        }
    )
    return values


def _tracker_config(config: RunConfig) -> dict[str, Any]:
    """Settings as scalars/strings, which is all TensorBoard's hparams accept."""
    return {
        key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
        for key, value in config.to_dict().items()
    }


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

    def __init__(
        self,
        config: RunConfig,
        evaluate: Callable[[Any, str], dict[str, float]],
        trainee: Trainee,
        output_dir: Path,
        best: dict[str, Any] | None,
    ) -> None:
        self.config = config
        self.evaluate = evaluate
        self.trainee = trainee
        self.best = best
        self.best_dir = output_dir / "best-model"

    def run(self, step: int, accelerator: Accelerator, log: _JsonLog) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if accelerator.is_main_process:
            for folder in self.config.eval_dirs:
                name = set_name(folder)
                for key, value in self.evaluate(self.trainee, folder).items():
                    metrics[f"{name}/{key}"] = float(value)
            self.trainee.model.train()  # in case an evaluate function switched it to eval
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
            ckpt.save_model_atomically(self.trainee, self.best_dir)
            self.best = {"step": step, "metric": name, "value": metrics[name]}
            write_json(self.best_dir / "best.json", self.best, indent=2)
