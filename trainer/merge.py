"""Merge embedding models into one by a weighted average of their weights (``peg-rag merge``).

The idea comes from LM-Cocktail (Xiao et al., 2023, "LM-Cocktail: Resilient Tuning of Language
Models via Model Merging"): averaging a fine-tuned model with its base model, or with models
tuned on other tasks, keeps most of the gain on the tuned task and much of the general ability
that fine-tuning loses. For models ``theta_1 .. theta_n`` and weights ``w_i >= 0`` scaled to
sum to 1, every floating-point tensor ``k`` of the merged model is

    theta[k] = sum_i w_i * theta_i[k]

summed in float64 and stored in float32. Integer tensors (index buffers) are not averaged:
they must be equal in every model. The models must share their architecture (``model_type``
and ``architectures`` of config.json), tensor names and shapes, and tokenizer (vocabulary,
normalization, pre-tokenization, special tokens). The merged folder holds the first model's
config and tokenizer, and its sentence-transformers files as ``PEGEncoder.save_pretrained``
writes them, so it loads with the first model's pooling, prompts and max length.

``weights="auto"`` chooses the weights that maximize a retrieval metric (``ndcg@10`` by
default) averaged over validation BEIR folders. Candidates are multiples of 0.1 summing to 1:

- two or three models: all of them (11 for two models, the weight of the last one going
  from 0 to 1; 66 for three);
- four or more: a greedy hill climb over the same grid. Each model alone is scored, then
  the best move of 0.1 of weight from one model to another is taken while it raises the
  score.

A tie goes to the candidate scored first, which puts more weight on the earlier models (for
``BASE TUNED``: closer to the base model). Each candidate is merged in memory, loaded into the
first model's encoder and scored by exact dense retrieval, as ``peg-rag eval`` does, on each
folder's corpus and at most ``max_queries`` judged queries (a seeded sample). The corpus is
encoded again for every candidate, which is most of the search's time, so keep validation
corpora small or cut them with ``max_distractors``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from peg_rag.core import torch_backend
from peg_rag.core.beir import RetrievalSet
from peg_rag.core.encoder import PEGEncoder
from peg_rag.core.encoding import DEFAULT_BATCH_SIZE
from peg_rag.core.files import read_json
from peg_rag.core.model_files import resolve_model_dir
from peg_rag.retrieval.evaluate import check_sample_limits, load_sets, sample_set, score_set

from .checkpoint import save_model_atomically

logger = logging.getLogger("peg_rag")

METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100")  # what retrieval_scores reports
STEPS = 10  # candidate weights of the search are multiples of 1 / STEPS
FULL_GRID_MAX = 66  # score every candidate up to this many (three models), else hill-climb

State = dict[str, torch.Tensor]
Weights = tuple[float, ...]
Tenths = tuple[int, ...]  # a candidate in units of 1 / STEPS


@dataclass
class MergeResult:
    """What ``merge_models`` wrote, with which weights, and the scores of the weight search."""

    output: Path
    models: list[str]
    weights: Weights  # normalized: they sum to 1
    metric: str | None = None  # the metric of weights="auto"; None for given weights
    scores: dict[Weights, float] = field(default_factory=dict)  # candidate -> mean over sets
    set_scores: dict[Weights, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0  # the whole call, from checking the inputs to the saved folder
    search_seconds: float = 0.0  # of which scoring the candidates of weights="auto"

    def table(self) -> str:
        """A Markdown table of the searched candidates in search order, scores x 100 (as
        ``peg-rag eval`` reports them), the chosen one marked."""
        sets = list(next(iter(self.set_scores.values()), {}))
        heads = [Path(model).name or model for model in self.models] + [*sets, "mean", ""]
        lines = ["| " + " | ".join(heads) + " |", "|" + "---:|" * (len(heads) - 1) + "---|"]
        for weights, mean in self.scores.items():
            cells = [f"{w:.1f}" for w in weights]
            cells += [f"{100 * score:.2f}" for score in self.set_scores[weights].values()]
            cells += [f"{100 * mean:.2f}", "chosen" if weights == self.weights else ""]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def normalized_weights(weights: Sequence[float], count: int) -> Weights:
    """``weights`` divided by their sum; one per model, finite, >= 0, not all zero."""
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} models; give one per model")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite numbers >= 0, got {list(weights)}")
    total = math.fsum(weights)
    if total == 0:
        raise ValueError(f"the weights {list(weights)} are all zero; at least one must be > 0")
    return tuple(w / total for w in weights)


def average(states: Sequence[State], weights: Weights) -> State:
    """The weighted sum of each floating-point tensor (weights summing to 1); other tensors,
    equal in all states, are taken from the first."""
    merged: State = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            parts = (
                w * state[key].double() for w, state in zip(weights, states, strict=True) if w > 0
            )
            merged[key] = sum(parts, torch.zeros_like(first, dtype=torch.float64)).to(first.dtype)
        else:
            merged[key] = first
    return merged


def _first_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """The first key, in ``a``'s order then ``b``'s, whose value differs or is absent in one."""
    absent = object()
    for key in [*a, *b]:
        if a.get(key, absent) != b.get(key, absent):
            return key
    return None


def _shown(values: Mapping[str, Any], key: str) -> str:
    text = repr(values[key]) if key in values else "absent"
    return text if len(text) <= 80 else text[:77] + "..."


def _check_same(what: str, a: Mapping[str, Any], b: Mapping[str, Any], names: Sequence[str]):
    """Refuse to merge models ``names[0]`` and ``names[1]`` if ``a`` and ``b`` differ."""
    key = _first_difference(a, b)
    if key is not None:
        raise ValueError(
            f"cannot merge {names[0]} and {names[1]}: their {what} differ at {key!r} "
            f"({_shown(a, key)} vs {_shown(b, key)})"
        )


def _architecture(model_dir: Path) -> dict[str, Any]:
    config = read_json(model_dir / "config.json")
    return {key: config.get(key) for key in ("model_type", "architectures")}


def _tokenizer(encoder: PEGEncoder) -> dict[str, Any]:
    """What decides how a tokenizer turns text into ids, as comparable keys. Read through the
    tokenizer rather than hashing its files, which differ between library versions that
    save the same tokenizer."""
    tokenizer = encoder.tokenizer
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    described: dict[str, Any] = {f"vocab[{token!r}]": index for token, index in vocab}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # normalizer, pre-tokenizer, special-token templates
        pipeline = json.loads(backend.to_str())
        pipeline["model"].pop("vocab", None)  # compared above, by id
        for key in ("truncation", "padding"):  # set per call, not part of the tokenizer
            pipeline.pop(key, None)
        described.update(pipeline)
    return described


def _tensors(state: State) -> dict[str, str]:
    return {
        key: f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for key, t in state.items()
    }


def check_tensors(first: State, other: State, names: Sequence[str]) -> None:
    """Refuse to merge models ``names[0]`` and ``names[1]`` unless their tensors have the same
    names, shapes and dtypes, and their integer tensors the same values."""
    _check_same("tensors (name, shape, dtype)", _tensors(first), _tensors(other), names)
    for key, tensor in first.items():
        if not tensor.is_floating_point() and not torch.equal(tensor, other[key]):
            raise ValueError(
                f"cannot merge {names[0]} and {names[1]}: their integer tensor {key!r} differs, "
                "and only floating-point tensors are averaged"
            )


def _load(model_dir: Path, name: str, device: str | None, batch_size: int) -> PEGEncoder:
    """The model in float32; a missing or corrupt file raises ValueError naming the model."""
    try:
        return PEGEncoder.from_pretrained(
            model_dir, device=device, dtype="float32", batch_size=batch_size
        )
    except (OSError, ValueError, SafetensorError) as exc:
        raise ValueError(f"cannot load model {name}: {exc}") from exc


def _load_all(
    models: Sequence[str | os.PathLike[str]], device: str | None, batch_size: int
) -> tuple[PEGEncoder, list[State]]:
    """The first model's encoder (on ``device``) and every model's tensors (on the CPU),
    after checking that each model matches the first."""
    names = [str(model) for model in models]
    first_dir = resolve_model_dir(models[0])
    architecture = _architecture(first_dir)
    heads = [a for a in architecture["architectures"] or [] if a.endswith("SequenceClassification")]
    if heads:
        raise ValueError(
            f"{names[0]} is a cross-encoder ({heads[0]}); peg-rag merge merges embedding models"
        )
    encoder = _load(first_dir, names[0], device, batch_size)
    tokenizer = _tokenizer(encoder)
    states = [{k: v.detach().to("cpu", copy=True) for k, v in encoder.model.state_dict().items()}]
    for name, model in zip(names[1:], models[1:], strict=True):
        pair = (names[0], name)
        model_dir = resolve_model_dir(model)
        _check_same("architectures", architecture, _architecture(model_dir), pair)
        other = _load(model_dir, name, "cpu", batch_size)
        _check_same("tokenizers", tokenizer, _tokenizer(other), pair)
        state = {k: v.detach() for k, v in other.model.state_dict().items()}
        check_tensors(states[0], state, pair)
        states.append(state)
    return encoder, states


def _check_output(target: Path, models: Iterable[str | os.PathLike[str]], overwrite: bool):
    """Refuse an output that would replace a model being merged, or (without ``overwrite``)
    an existing non-empty folder."""
    out = target.expanduser().resolve()
    for model in models:
        path = Path(model).expanduser()
        if path.is_dir() and (path.resolve() == out or out in path.resolve().parents):
            raise ValueError(f"the output {target} would replace the input model {model}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{target} exists and is not an empty folder; pass overwrite=True (--overwrite) "
            "to replace it"
        )


def _validation(
    paths: Sequence[str | Path], max_queries: int | None, max_distractors: int | None, seed: int
) -> dict[str, RetrievalSet]:
    """The BEIR folders by name, each cut by ``sample_set``."""
    sets: dict[str, RetrievalSet] = {}
    for name, data in load_sets(paths).items():
        if not isinstance(data, RetrievalSet):
            raise ValueError(
                f"validation set {name} holds sentence pairs; the weight search needs BEIR "
                "folders (corpus.jsonl, queries.jsonl, qrels/test.tsv)"
            )
        sets[name] = sample_set(data, max_queries, max_distractors, seed)
    return sets


def _splits(total: int, parts: int) -> list[Tenths]:
    """Every way to cut ``total`` into ``parts`` non-negative integers, more to earlier
    parts first."""
    if parts == 1:
        return [(total,)]
    return [
        (head, *tail) for head in range(total, -1, -1) for tail in _splits(total - head, parts - 1)
    ]


def _vertices(count: int) -> list[Tenths]:
    """Each model alone."""
    return [tuple(STEPS * (i == j) for i in range(count)) for j in range(count)]


def _climb(score: Callable[[Tenths], float], count: int) -> Tenths:
    """Greedy search of the grid: from the best single model, take the best move of one step
    of weight from one model to another while it raises the score."""
    current = max(_vertices(count), key=score)
    while True:
        moves = [
            tuple(t - (i == give) + (i == take) for i, t in enumerate(current))
            for give in range(count)
            if current[give]
            for take in range(count)
            if take != give
        ]
        best = max(moves, key=score)
        if score(best) <= score(current):
            return current
        current = best


def _search(
    encoder: PEGEncoder,
    states: Sequence[State],
    sets: Mapping[str, RetrievalSet],
    metric: str,
    show_progress_bar: bool,
) -> tuple[Weights, dict[Weights, float], dict[Weights, dict[str, float]]]:
    """The best candidate weights, and the scores of every candidate tried, in order."""
    grid = _splits(STEPS, len(states))
    full = len(grid) <= FULL_GRID_MAX
    scores: dict[Weights, float] = {}
    set_scores: dict[Weights, dict[str, float]] = {}
    progress = tqdm(
        total=len(grid) if full else None,
        desc="Candidates",
        unit="candidate",
        disable=not show_progress_bar,
    )

    def score(tenths: Tenths) -> float:
        weights = tuple(t / STEPS for t in tenths)
        if weights not in scores:  # the hill climb asks again for the current point
            encoder.model.load_state_dict(average(states, weights))
            found = {name: score_set(encoder, data)["dense"][metric] for name, data in sets.items()}
            set_scores[weights] = found
            scores[weights] = math.fsum(found.values()) / len(found)
            progress.update()
        return scores[weights]

    with progress:
        best = max(grid, key=score) if full else _climb(score, len(states))
    return tuple(t / STEPS for t in best), scores, set_scores


def merge_models(
    models: Sequence[str | os.PathLike[str]],
    weights: Sequence[float] | Literal["auto"],
    output: str | os.PathLike[str],
    *,
    validation: Sequence[str | Path] = (),
    metric: str = "ndcg@10",
    max_queries: int | None = 50,
    max_distractors: int | None = None,
    seed: int = 0,
    max_length: int | None = None,
    device: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    show_progress_bar: bool = False,
) -> MergeResult:
    """Write the weighted average of ``models`` (hub ids or folders, at least two) to the
    folder ``output``; the module docstring gives the formula and what must match.

    ``weights`` holds one number >= 0 per model, not all zero; they are divided by their sum,
    so ``[1, 3]`` means 0.25 and 0.75. ``weights="auto"`` searches them (module docstring) on
    the BEIR folders ``validation`` by ``metric`` (one of ``METRICS``), with at most
    ``max_queries`` judged queries per folder (None: all) and at most ``max_distractors``
    passages not judged relevant to them (None: all), both sampled with ``seed``, texts cut to
    ``max_length`` tokens (default: the first model's max length, which the merged model
    keeps either way), encoded on ``device`` (default: the best available) ``batch_size`` at a
    time. Given weights merge on the CPU.

    Every model is held in memory in float32. The folder is written under a temporary name
    and renamed into place. An existing non-empty ``output`` is replaced only with
    ``overwrite=True``, and never when it is, or holds, one of the models.
    """
    if len(models) < 2:
        raise ValueError(f"merging needs at least two models, got {len(models)}")
    start = time.perf_counter()
    target = Path(output)
    _check_output(target, models, overwrite)
    given: Weights | None = None
    if isinstance(weights, str):
        if weights != "auto":
            raise ValueError(f"weights must be numbers or 'auto', got {weights!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
        if not validation:
            raise ValueError("weights='auto' needs validation BEIR folders (--validation)")
        check_sample_limits(max_queries, max_distractors)
        # Bad input fails here, before any model is loaded.
        sets = _validation(validation, max_queries, max_distractors, seed)
    else:
        if validation:
            raise ValueError("validation folders are used only with weights='auto'")
        given = normalized_weights(weights, len(models))
    encoder, states = _load_all(models, "cpu" if given else device, batch_size)
    result = MergeResult(target, [str(model) for model in models], given or ())
    if given is None:
        saved_length = encoder.max_length
        if max_length is not None:
            limit = torch_backend.position_limit(encoder.model, encoder.tokenizer)
            if not 1 <= max_length <= limit:
                raise ValueError(
                    f"max_length must be in [1, {limit}] (the model's limit), got {max_length}"
                )
            encoder.max_length = max_length
        searching = time.perf_counter()
        result.weights, result.scores, result.set_scores = _search(
            encoder, states, sets, metric, show_progress_bar
        )
        result.metric = metric
        result.search_seconds = time.perf_counter() - searching
        encoder.max_length = saved_length
        logger.info("chose the weights %s by mean %s", result.weights, metric)
    encoder.model.load_state_dict(average(states, result.weights))
    save_model_atomically(encoder, target)
    result.seconds = time.perf_counter() - start
    return result
