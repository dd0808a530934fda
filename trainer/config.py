"""All trainer settings in one dataclass, read from a YAML file and/or command-line flags.

Every YAML key is also a flag: ``batch_size: 64`` in the file is ``--batch-size 64`` on the
command line, and flags win over the file. Values from both go through the same checks, so a
bad value names the file or flag it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peg_rag.core.deprecation import warn_renamed
from peg_rag.core.encoding import POOLING_MODES

DESCRIPTION = (
    "Fine-tune an embedding model on query/pos/neg JSONL with in-batch and hard negatives, "
    "gradient caching (batch size independent of memory) and progressive weighting. "
    "Settings come from --config FILE.yaml, whose keys are these flags with underscores; "
    "flags win over the file."
)
PROGRESSIVE = ("off", "linear", "cosine", "step")
LR_SCHEDULES = ("linear", "cosine", "constant")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
REQUIRED = ("model", "train", "output_dir")
# Keys of peg-rag 0.1, still read (with a warning) until 0.3.
RENAMED = {"query_instruction": "query_prompt", "passage_instruction": "passage_prompt"}


class ConfigError(ValueError):
    """A bad setting; the message names the file or flag and the key."""


def _opt(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(
            default_factory=lambda: type(default)(default), metadata={"help": help, **extra}
        )
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Settings of a training run; see ``trainer/configs/peg.yaml`` for a commented example."""

    # What to train on, and where results go.
    model: str | None = _opt(None, "hub id or local directory of the model to fine-tune")
    train: list[str] = _opt([], "training JSONL files or folders of them", metavar="PATH")
    output_dir: str | None = _opt(None, "where the model, checkpoints and logs are written")
    source_weights: dict[str, float] = _opt(
        {}, "per-source sampling weight multipliers, NAME=WEIGHT", metavar="NAME=WEIGHT"
    )
    skip_bad_lines: bool = _opt(False, "count and skip malformed training lines instead of failing")
    # Batch shape.
    batch_size: int = _opt(64, "queries per global batch (across all processes)")
    mini_batch_size: int = _opt(32, "texts per forward pass; bounds activation memory")
    hard_negatives: int = _opt(5, "hard negatives per query, taken from 'neg' (filled if short)")
    max_length: int | None = _opt(None, "max tokens per text (default: the model's)")
    # Loss.
    temperature: float = _opt(0.02, "InfoNCE temperature tau")
    loss_chunk_size: int = _opt(
        1024, "queries per loss chunk; logits never exceed chunk x candidates"
    )
    mask_duplicates: bool = _opt(True, "never use a text identical to a positive as its negative")
    false_negative_margin: float | None = _opt(
        None,
        "mask candidates scoring above score(positive) - margin (off when unset; a negative "
        "margin masks only candidates scoring more than |margin| above the positive)",
    )
    guide_model: str | None = _opt(None, "score false negatives with this frozen model instead")
    # Progressive learning.
    progressive: str = _opt(
        "linear", "gamma(t) schedule, or off for plain InfoNCE", choices=PROGRESSIVE
    )
    weighting: str = _opt("focal", "per-query weighting function (see progressive.WEIGHTINGS)")
    gamma_start: float = _opt(0.0, "gamma at the first step")
    gamma_end: float = _opt(2.0, "gamma at the last step")
    gamma_stairs: int = _opt(4, "number of levels of the 'step' schedule")
    # Optimization.
    learning_rate: float = _opt(2e-5, "peak AdamW learning rate")
    weight_decay: float = _opt(0.01, "AdamW weight decay (not applied to biases and norms)")
    warmup_ratio: float = _opt(0.1, "fraction of the steps with linear warmup")
    lr_schedule: str = _opt("linear", "decay after warmup", choices=LR_SCHEDULES)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables)")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon")
    max_steps: int | None = _opt(None, "optimizer steps to run (or set epochs)")
    epochs: float | None = _opt(None, "passes over the data (default 1 when max_steps is unset)")
    seed: int = _opt(42, "seed of data order, negatives and initialization of dropout")
    mixed_precision: str = _opt(
        "auto",
        "auto = bf16 on GPUs that support it, fp16 on older GPUs, no on CPU",
        choices=MIXED_PRECISION,
    )
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    # Encoder settings (default: the model's sentence-transformers files).
    pooling: str | None = _opt(
        None, "cls or mean (default: from the model files)", choices=POOLING_MODES
    )
    query_prompt: str | None = _opt(None, "query prefix (default: the model's query prompt)")
    passage_prompt: str | None = _opt(None, "passage prefix (default: the model's prompt)")
    trust_remote_code: bool = _opt(False, "run code shipped with the model")
    # Logging, checkpoints, evaluation.
    logging_steps: int = _opt(10, "log training metrics every N steps")
    report_to: str = _opt("tensorboard", "accelerate tracker (tensorboard, wandb, ...) or none")
    save_steps: int = _opt(0, "write a checkpoint every N steps (0: only the final model)")
    save_total_limit: int = _opt(3, "keep the last K checkpoints")
    resume: str | None = _opt(
        None,
        "continue from a checkpoint directory, or 'latest' in output_dir",
        metavar="CHECKPOINT",
    )
    eval_dirs: list[str] = _opt([], "BEIR folders / pairs.tsv files evaluated during training")
    eval_steps: int = _opt(0, "evaluate every N steps (0: only at the end)")
    metric_for_best: str | None = _opt(
        None, "keep the best model by this metric, e.g. kuake-qtr-dev/ndcg@10"
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def _base(kind: Any) -> tuple[Any, bool]:
    """(type without None, whether None is allowed)."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return kind, False


def _convert(name: str, value: Any, origin: str) -> Any:
    """Check and convert one value (from YAML, or a string from the command line)."""
    kind, nullable = _base(_TYPES[name])

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{origin}: key {name!r}: expected {expected}, got {value!r}")

    if value is None:
        if nullable:
            return None
        raise fail("a value")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise fail("true or false")
    if kind is int:
        if isinstance(value, bool):
            raise fail("an integer")
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise fail("an integer") from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise fail("an integer")
        return value
    if kind is float:
        if isinstance(value, bool):
            raise fail("a number")
        try:  # YAML reads "2e-5" (no dot) as a string, so numeric strings are accepted
            number = float(value)
        except (TypeError, ValueError):
            raise fail("a number") from None
        if not math.isfinite(number):
            raise fail("a finite number")
        return number
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise fail("a string")
        return str(value)
    if typing.get_origin(kind) is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
            raise fail("a list of non-empty strings")
        return list(items)
    if typing.get_origin(kind) is dict:
        if isinstance(value, list):  # NAME=WEIGHT items from the command line
            pairs: dict[str, str] = {}
            for item in value:
                source, sep, weight = str(item).partition("=")
                if not sep or not source:
                    raise fail("NAME=NUMBER items")
                pairs[source] = weight
            value = pairs
        if not isinstance(value, dict):
            raise fail("a mapping of names to numbers")
        out = {}
        for key, number in value.items():
            try:
                out[str(key)] = float(number)
            except (TypeError, ValueError):
                raise fail(f"a number for {key!r}") from None
        return out
    raise AssertionError(f"unhandled type {kind} of {name}")


def _check_key(key: Any, origin: str) -> str:
    name = str(key).replace("-", "_")
    if name in RENAMED:
        warn_renamed(name, RENAMED[name], stacklevel=4)
        name = RENAMED[name]
    if name not in FIELDS:
        close = difflib.get_close_matches(name, FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{origin}: unknown key {key!r}{hint}")
    return name


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file into {key: value}, checking keys and value types."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(raw).__name__}")
    values = {}
    for key, value in raw.items():
        name = _check_key(key, str(path))
        values[name] = _convert(name, value, str(path))
    return values


def make_config(
    values: dict[str, Any] | None = None, *, config_file: str | Path | None = None, **overrides: Any
) -> TrainConfig:
    """Build and validate a config: dataclass defaults < YAML file < ``values`` < ``overrides``."""
    return _build(config_file, {**(values or {}), **overrides}, lambda name: f"argument {name}")


def _build(
    config_file: str | Path | None, values: dict[str, Any], origin: typing.Callable[[str], str]
) -> TrainConfig:
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if config_file is not None:
        for name, value in read_yaml(config_file).items():
            merged[name], origins[name] = value, str(config_file)
    for key, value in values.items():
        name = _check_key(key, origin(str(key)))
        merged[name], origins[name] = _convert(name, value, origin(name)), origin(name)
    config = TrainConfig(**merged)
    validate(config, origins)
    return config


# (settings, rule, test) for numbers; None passes (unset optional settings).
_RANGES: list[tuple[tuple[str, ...], str, typing.Callable[[Any], bool]]] = [
    (
        (
            "batch_size",
            "mini_batch_size",
            "loss_chunk_size",
            "save_total_limit",
            "logging_steps",
            "max_steps",
            "max_length",
        ),
        ">= 1",
        lambda v: v >= 1,
    ),
    (
        (
            "hard_negatives",
            "save_steps",
            "eval_steps",
            "weight_decay",
            "gamma_start",
            "gamma_end",
            "max_grad_norm",
        ),
        ">= 0",
        lambda v: v >= 0,
    ),
    (("temperature", "learning_rate", "adam_epsilon", "epochs"), "> 0", lambda v: v > 0),
]


def validate(config: TrainConfig, origins: dict[str, str] | None = None) -> None:
    """Raise ConfigError for the first setting that is missing, out of range or inconsistent."""
    origins = origins or {}

    def bad(name: str, message: str) -> ConfigError:
        where = origins.get(name, "default")
        return ConfigError(f"{where}: key {name!r}: {message}")

    for name in REQUIRED:
        if not getattr(config, name):
            raise ConfigError(f"missing required setting {name!r} (--{name.replace('_', '-')})")
    for names, rule, holds in _RANGES:
        for name in names:
            value = getattr(config, name)
            if value is not None and not holds(value):
                raise bad(name, f"must be {rule}, got {value}")
    if config.max_steps is not None and config.epochs is not None:
        raise bad("epochs", "set max_steps or epochs, not both")
    if not 0 <= config.warmup_ratio < 1:
        raise bad("warmup_ratio", f"must be in [0, 1), got {config.warmup_ratio}")
    if config.batch_size < 2 and config.hard_negatives == 0:
        raise bad("batch_size", "a single query without hard negatives has no negatives")
    if config.gamma_stairs < 2:
        raise bad("gamma_stairs", f"must be >= 2, got {config.gamma_stairs}")
    if config.guide_model and config.false_negative_margin is None:
        raise bad("guide_model", "only used for false-negative masking; set false_negative_margin")
    for name in ("progressive", "lr_schedule", "mixed_precision", "pooling"):
        choices = FIELDS[name].metadata["choices"]
        value = getattr(config, name)
        if value is not None and value not in choices:
            raise bad(name, f"must be one of {', '.join(choices)}, got {value!r}")
    from .progressive import WEIGHTINGS  # here: it imports torch, and the CLI imports config

    if config.weighting not in WEIGHTINGS:
        raise bad("weighting", f"must be one of {', '.join(WEIGHTINGS)}, got {config.weighting!r}")
    for source, weight in config.source_weights.items():
        if weight <= 0:
            raise bad("source_weights", f"weight of {source!r} must be > 0, got {weight}")
    for name in ("train", "eval_dirs"):
        for path in getattr(config, name):
            if not Path(path).exists():
                raise bad(name, f"path does not exist: {path}")
    if config.metric_for_best and not config.eval_dirs:
        raise bad("metric_for_best", "needs eval_dirs to evaluate on")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --config and one flag per TrainConfig key; unset flags stay out of the namespace."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings (flags win)")
    defaults = TrainConfig()
    for name, spec in FIELDS.items():
        kind, _ = _base(_TYPES[name])
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        shown = f" (default: {default})" if default not in (None, [], {}) else ""
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": spec.metadata["help"] + shown,
        }
        if "metavar" in spec.metadata:
            kwargs["metavar"] = spec.metadata["metavar"]
        if "choices" in spec.metadata:
            kwargs["choices"] = spec.metadata["choices"]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) in (list, dict):
            kwargs["nargs"] = "+"
        elif name == "resume":
            kwargs.update(nargs="?", const="latest")
        parser.add_argument(flag, **kwargs)
    for old in RENAMED:  # hidden; config_from_args warns and maps them
        parser.add_argument(
            "--" + old.replace("_", "-"),
            dest=old,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a namespace parsed with add_arguments' flags."""
    given = {name: getattr(args, name) for name in [*FIELDS, *RENAMED] if hasattr(args, name)}
    return _build(args.config, given, lambda name: "--" + name.replace("_", "-"))
