"""Trainer settings as dataclasses, read from a YAML file and/or command-line flags.

Every YAML key is also a flag: ``batch_size: 64`` in the file is ``--batch-size 64`` on the
command line, and flags win over the file. Values from both go through the same checks, so a
bad value names the file or flag it came from.

:class:`RunConfig` holds what every training run has (data, batch, optimizer, checkpoints,
evaluation); :class:`TrainConfig` (the embedder, ``peg-rag train``) and
``reranker_config.RerankerConfig`` (``peg-rag train-reranker``) add their own keys. The
machinery below (:func:`build_config`, :func:`add_arguments`, :func:`validate`) works on any
of them: a field's metadata carries its help, its range rule and its choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

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
# Range rules a field may name in its metadata (``rule=">= 1"``).
RULES: dict[str, Callable[[Any], bool]] = {
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    ">= 2": lambda v: v >= 2,
    "> 0": lambda v: v > 0,
}


class ConfigError(ValueError):
    """A bad setting; the message names the file or flag and the key."""


def setting(default: Any, help: str, **extra: Any) -> Any:
    """A field with its help and metadata: ``rule`` (a key of RULES), ``choices``, ``metavar``."""
    if isinstance(default, (list, dict)):
        return field(
            default_factory=lambda: type(default)(default), metadata={"help": help, **extra}
        )
    return field(default=default, metadata={"help": help, **extra})


Bad = Callable[[str, str], ConfigError]  # (key, message) -> the error naming where it was set


@dataclass
class RunConfig:
    """Settings every training run has: data, batch, optimizer, checkpoints, evaluation."""

    # Keys of older releases, still read (with a warning): old name -> new name.
    RENAMED: ClassVar[dict[str, str]] = {}
    # Settings that decide the data order: a resumed run must keep them to continue exactly.
    DATA_ORDER_KEYS: ClassVar[tuple[str, ...]] = (
        "train",
        "batch_size",
        "seed",
        "source_weights",
        "skip_bad_lines",
        "general_sources",
        "mix_general",
    )

    # What to train on, and where results go.
    model: str | None = setting(None, "hub id or local directory of the model to fine-tune")
    train: list[str] = setting([], "training JSONL files or folders of them", metavar="PATH")
    output_dir: str | None = setting(None, "where the model, checkpoints and logs are written")
    source_weights: dict[str, float] = setting(
        {}, "per-source sampling weight multipliers, NAME=WEIGHT", metavar="NAME=WEIGHT"
    )
    skip_bad_lines: bool = setting(
        False, "count and skip malformed training lines instead of failing"
    )
    # Against forgetting: general-domain lines in every batch of the other sources.
    general_sources: list[str] = setting(
        [], "sources of general-domain lines that mix_general draws from", metavar="NAME"
    )
    mix_general: float = setting(
        0.0,
        "share of each batch of another source given to lines of one of general_sources (0: off)",
    )
    # Batch shape.
    batch_size: int = setting(64, "queries per global batch (across all processes)", rule=">= 1")
    mini_batch_size: int = setting(
        32, "texts per forward pass; bounds activation memory", rule=">= 1"
    )
    max_length: int | None = setting(
        None, "max tokens per text (default: the model's)", rule=">= 1"
    )
    # Optimization.
    learning_rate: float = setting(2e-5, "peak AdamW learning rate", rule="> 0")
    weight_decay: float = setting(
        0.01, "AdamW weight decay (not applied to biases and norms)", rule=">= 0"
    )
    warmup_ratio: float = setting(0.1, "fraction of the steps with linear warmup")
    lr_schedule: str = setting("linear", "decay after warmup", choices=LR_SCHEDULES)
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0 disables)", rule=">= 0")
    adam_epsilon: float = setting(1e-8, "AdamW epsilon", rule="> 0")
    max_steps: int | None = setting(None, "optimizer steps to run (or set epochs)", rule=">= 1")
    epochs: float | None = setting(
        None, "passes over the data (default 1 when max_steps is unset)", rule="> 0"
    )
    seed: int = setting(42, "seed of data order, negatives and initialization of dropout")
    mixed_precision: str = setting(
        "auto",
        "auto = bf16 on GPUs that support it, fp16 on older GPUs, no on CPU",
        choices=MIXED_PRECISION,
    )
    gradient_checkpointing: bool = setting(
        False, "recompute activations in backward to save memory"
    )
    trust_remote_code: bool = setting(False, "run code shipped with the model")
    # Logging, checkpoints, evaluation.
    logging_steps: int = setting(10, "log training metrics every N steps", rule=">= 1")
    report_to: str = setting("tensorboard", "accelerate tracker (tensorboard, wandb, ...) or none")
    save_steps: int = setting(
        0, "write a checkpoint every N steps (0: only the final model)", rule=">= 0"
    )
    save_total_limit: int = setting(3, "keep the last K checkpoints", rule=">= 1")
    resume: str | None = setting(
        None,
        "continue from a checkpoint directory, or 'latest' in output_dir",
        metavar="CHECKPOINT",
    )
    eval_dirs: list[str] = setting([], "BEIR folders / pairs.tsv files evaluated during training")
    eval_steps: int = setting(0, "evaluate every N steps (0: only at the end)", rule=">= 0")
    metric_for_best: str | None = setting(
        None, "keep the best model by this metric, e.g. kuake-qtr-dev/ndcg@10"
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self, bad: Bad) -> None:
        """Checks of this kind of run beyond each key's type, range and choices."""


@dataclass
class TrainConfig(RunConfig):
    """Settings of an embedder's training run; see ``trainer/configs/peg.yaml`` for a commented
    example."""

    # Keys of peg-rag 0.1, still read (with a warning) until 0.3.
    RENAMED: ClassVar[dict[str, str]] = {
        "query_instruction": "query_prompt",
        "passage_instruction": "passage_prompt",
    }
    DATA_ORDER_KEYS: ClassVar[tuple[str, ...]] = (*RunConfig.DATA_ORDER_KEYS, "hard_negatives")

    hard_negatives: int = setting(
        5, "hard negatives per query, taken from 'neg' (filled if short)", rule=">= 0"
    )
    # Loss.
    temperature: float = setting(0.02, "InfoNCE temperature tau", rule="> 0")
    loss_chunk_size: int = setting(
        1024, "queries per loss chunk; logits never exceed chunk x candidates", rule=">= 1"
    )
    mask_duplicates: bool = setting(
        True, "never use a text identical to a positive as its negative"
    )
    false_negative_margin: float | None = setting(
        None,
        "mask candidates scoring above score(positive) - margin (off when unset; a negative "
        "margin masks only candidates scoring more than |margin| above the positive)",
    )
    guide_model: str | None = setting(None, "score false negatives with this frozen model instead")
    # Distillation from teacher scores (lines with pos_scores and neg_scores).
    distill_weight: float = setting(
        0.0,
        "weight of KL(teacher || student) over each query's positive and hard negatives, "
        "averaged over the queries whose lines have pos_scores/neg_scores (0: off)",
        rule=">= 0",
    )
    teacher_temperature: float = setting(
        1.0,
        "divides the teacher's scores before their softmax (the student's logits are the "
        "InfoNCE ones, divided by temperature)",
        rule="> 0",
    )
    # Against forgetting: embedding distillation from the frozen starting model.
    anchor_weight: float = setting(
        0.0,
        "weight of the mean squared distance between each text's embedding and the frozen "
        "starting model's embedding of it, which keeps the model near what it knew (0: off)",
        rule=">= 0",
    )
    # Progressive learning.
    progressive: str = setting(
        "linear", "gamma(t) schedule, or off for plain InfoNCE", choices=PROGRESSIVE
    )
    weighting: str = setting(
        "focal",
        "per-query weighting: focal (hardest queries count most) or self_paced (hardest count "
        "least); see progressive.WEIGHTINGS",
    )
    gamma_start: float = setting(0.0, "gamma at the first step", rule=">= 0")
    gamma_end: float = setting(2.0, "gamma at the last step", rule=">= 0")
    gamma_stairs: int = setting(4, "number of levels of the 'step' schedule", rule=">= 2")
    log_line_weights: str | None = setting(
        None,
        "append every query's training line (file, line), raw weight, p_positive and gamma "
        "to this JSONL file, one row per query and step",
        metavar="PATH",
    )
    # Encoder settings (default: the model's sentence-transformers files).
    pooling: str | None = setting(
        None, "cls or mean (default: from the model files)", choices=POOLING_MODES
    )
    query_prompt: str | None = setting(None, "query prefix (default: the model's query prompt)")
    passage_prompt: str | None = setting(None, "passage prefix (default: the model's prompt)")

    def check(self, bad: Bad) -> None:
        if self.batch_size < 2 and self.hard_negatives == 0:
            raise bad("batch_size", "a single query without hard negatives has no negatives")
        if self.distill_weight > 0 and self.hard_negatives == 0:
            raise bad("distill_weight", "distillation needs hard_negatives >= 1")
        if self.log_line_weights and not self.resume and Path(self.log_line_weights).exists():
            raise bad(
                "log_line_weights",
                f"{self.log_line_weights} exists; name a new file (a resumed run appends to it)",
            )
        if self.guide_model and self.false_negative_margin is None:
            raise bad(
                "guide_model", "only used for false-negative masking; set false_negative_margin"
            )
        from .progressive import WEIGHTINGS  # here: it imports torch, and the CLI imports config

        if self.weighting not in WEIGHTINGS:
            raise bad(
                "weighting", f"must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}"
            )


C = TypeVar("C", bound=RunConfig)


_HINTS: dict[type, dict[str, Any]] = {}


def fields_of(schema: type[RunConfig]) -> dict[str, dataclasses.Field]:
    """The keys of a config class, in order."""
    return {f.name: f for f in dataclasses.fields(schema)}


def _types(schema: type[RunConfig]) -> dict[str, Any]:
    if schema not in _HINTS:
        _HINTS[schema] = typing.get_type_hints(schema)
    return _HINTS[schema]


FIELDS = fields_of(TrainConfig)


def _base(kind: Any) -> tuple[Any, bool]:
    """(type without None, whether None is allowed)."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return kind, False


def _convert(schema: type[RunConfig], name: str, value: Any, origin: str) -> Any:
    """Check and convert one value (from YAML, or a string from the command line)."""
    kind, nullable = _base(_types(schema)[name])

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


def _check_key(schema: type[RunConfig], key: Any, origin: str) -> str:
    name = str(key).replace("-", "_")
    if name in schema.RENAMED:
        warn_renamed(name, schema.RENAMED[name], stacklevel=6)  # the caller of make_config
        name = schema.RENAMED[name]
    known = fields_of(schema)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{origin}: unknown key {key!r}{hint}")
    return name


def read_yaml(path: str | Path, schema: type[RunConfig] = TrainConfig) -> dict[str, Any]:
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
        name = _check_key(schema, key, str(path))
        values[name] = _convert(schema, name, value, str(path))
    return values


def build_config(
    schema: type[C],
    values: dict[str, Any] | None = None,
    *,
    config_file: str | Path | None = None,
    **overrides: Any,
) -> C:
    """Build and validate a ``schema`` config: defaults < YAML file < ``values`` < ``overrides``."""
    return _build(
        schema, config_file, {**(values or {}), **overrides}, lambda name: f"argument {name}"
    )


def make_config(
    values: dict[str, Any] | None = None, *, config_file: str | Path | None = None, **overrides: Any
) -> TrainConfig:
    """Build and validate an embedder's config (defaults < YAML < ``values`` < ``overrides``)."""
    return build_config(TrainConfig, values, config_file=config_file, **overrides)


def _build(
    schema: type[C],
    config_file: str | Path | None,
    values: dict[str, Any],
    origin: Callable[[str], str],
) -> C:
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if config_file is not None:
        for name, value in read_yaml(config_file, schema).items():
            merged[name], origins[name] = value, str(config_file)
    for key, value in values.items():
        name = _check_key(schema, key, origin(str(key)))
        merged[name], origins[name] = _convert(schema, name, value, origin(name)), origin(name)
    config = schema(**merged)
    validate(config, origins)
    return config


def validate(config: RunConfig, origins: dict[str, str] | None = None) -> None:
    """Raise ConfigError for the first setting that is missing, out of range or inconsistent."""
    origins = origins or {}

    def bad(name: str, message: str) -> ConfigError:
        where = origins.get(name, "default")
        return ConfigError(f"{where}: key {name!r}: {message}")

    for name in REQUIRED:
        if not getattr(config, name):
            raise ConfigError(f"missing required setting {name!r} (--{name.replace('_', '-')})")
    known = fields_of(type(config))
    for name, spec in known.items():
        rule = spec.metadata.get("rule")
        value = getattr(config, name)
        if rule is not None and value is not None and not RULES[rule](value):
            raise bad(name, f"must be {rule}, got {value}")
    if config.max_steps is not None and config.epochs is not None:
        raise bad("epochs", "set max_steps or epochs, not both")
    if not 0 <= config.warmup_ratio < 1:
        raise bad("warmup_ratio", f"must be in [0, 1), got {config.warmup_ratio}")
    for name, spec in known.items():
        choices = spec.metadata.get("choices")
        value = getattr(config, name)
        if choices is not None and value is not None and value not in choices:
            raise bad(name, f"must be one of {', '.join(choices)}, got {value!r}")
    if not 0 <= config.mix_general < 1:
        raise bad("mix_general", f"must be in [0, 1), got {config.mix_general}")
    if config.mix_general > 0 and not config.general_sources:
        raise bad("mix_general", "needs general_sources to draw from")
    for source, weight in config.source_weights.items():
        if weight <= 0:
            raise bad("source_weights", f"weight of {source!r} must be > 0, got {weight}")
    for name in ("train", "eval_dirs"):
        for path in getattr(config, name):
            if not Path(path).exists():
                raise bad(name, f"path does not exist: {path}")
    if config.metric_for_best and not config.eval_dirs:
        raise bad("metric_for_best", "needs eval_dirs to evaluate on")
    config.check(bad)


def add_arguments(parser: argparse.ArgumentParser, schema: type[RunConfig] = TrainConfig) -> None:
    """Add --config and one flag per key of ``schema``; unset flags stay out of the namespace."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings (flags win)")
    defaults = schema()
    for name, spec in fields_of(schema).items():
        kind, _ = _base(_types(schema)[name])
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
    for old in schema.RENAMED:  # hidden; the config builder warns and maps them
        parser.add_argument(
            "--" + old.replace("_", "-"),
            dest=old,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )


def config_from_namespace(schema: type[C], args: argparse.Namespace) -> C:
    """The ``schema`` config of a namespace parsed with add_arguments' flags."""
    names = [*fields_of(schema), *schema.RENAMED]
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return _build(schema, args.config, given, lambda name: "--" + name.replace("_", "-"))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a namespace parsed with add_arguments' flags."""
    return config_from_namespace(TrainConfig, args)


def command_line(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    schema: type[C],
    train: Callable[[C], Any],
) -> int:
    """``python -m`` entry points: parse ``schema``'s flags, ``train``, print its summary.

    Bad input (a setting, a training line, a file) prints one line and returns 2.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, schema)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = train(config_from_namespace(schema, args))
    except (ValueError, OSError) as exc:  # bad input: one clear line, no traceback
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0
