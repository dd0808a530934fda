"""Reranker: score (query, passage) pairs with a cross-encoder.

A cross-encoder reads the query and the passage together and returns one relevance logit,
so it sees their interaction, which a bi-encoder cannot; it is too slow to search a whole
corpus, and the usual second stage over the first stage's top few dozen. Any Hugging Face
``AutoModelForSequenceClassification`` with one output loads: BAAI/bge-reranker-base,
-large and -v2-m3, sentence-transformers ``CrossEncoder`` folders, and the rerankers that
``peg-rag train-reranker`` writes.

**Scores.** By default :meth:`score` returns raw logits. ``normalize=True`` applies a
sigmoid, giving values in [0, 1] that can be compared with a fixed threshold. For a model
trained pointwise with binary cross-entropy the sigmoid estimates the probability of
relevance; for one trained listwise (softmax over a query's candidates, as FlagEmbedding
and ``peg-rag train-reranker`` do by default) only differences between a query's scores are
trained, so the sigmoid is a monotone rescaling whose absolute level is not calibrated:
pick a threshold on held-out queries of your own data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from . import torch_backend
from .encoding import DEFAULT_BATCH_SIZE, check_runtime
from .files import read_json, write_json
from .model_files import model_name, resolve_model_dir

DEFAULT_RERANKER = "BAAI/bge-reranker-base"  # what the demo and the framework wrappers use
DEFAULT_MAX_LENGTH = 512  # the cap when neither the caller nor the model's settings say less
ST_SETTINGS = "sentence_bert_config.json"
SIGMOID = "torch.nn.modules.activation.Sigmoid"
SUPPORTED = (
    "peg-rag's Reranker loads cross-encoders: Hugging Face AutoModelForSequenceClassification "
    "models with one output (num_labels=1), such as BAAI/bge-reranker-base, "
    "bge-reranker-large, bge-reranker-v2-m3 and sentence-transformers CrossEncoder folders"
)

Pair = tuple[str, str]


class NotACrossEncoderError(ValueError):
    """The model is not a one-logit sequence classifier; the message says what is supported."""


def check_pairs(pairs: Sequence[Pair]) -> None:
    """Reject anything that is not a pair of non-empty strings, naming its index."""
    if isinstance(pairs, (str, tuple)) and len(pairs) == 2 and isinstance(pairs[0], str):
        raise TypeError("pairs must be a list of (query, passage) pairs; wrap the pair in a list")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"pairs[{i}] must be a (query, passage) pair, got {pair!r}")
        for j, text in enumerate(pair):
            if not isinstance(text, str):
                raise TypeError(f"pairs[{i}][{j}] is {type(text).__name__}, expected a str")
            if not text.strip():
                raise ValueError(f"pairs[{i}][{j}] is empty or whitespace-only: {text!r}")


def check_cross_encoder(config: Any, name: str) -> None:
    """Raise NotACrossEncoderError unless ``config`` describes a one-logit classifier."""
    architectures = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in architectures):
        raise NotACrossEncoderError(
            f"{name} is a generative model ({', '.join(architectures)}); LLM-based rerankers "
            f"are not supported. {SUPPORTED}."
        )
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise NotACrossEncoderError(
            f"{name} has no sequence-classification head (architectures: "
            f"{', '.join(architectures) or 'none'}). {SUPPORTED}. To train a reranker from an "
            "embedding model, use peg-rag train-reranker (it adds a new one-logit head)."
        )
    if config.num_labels != 1:
        raise NotACrossEncoderError(
            f"{name} has {config.num_labels} outputs, not one relevance logit. {SUPPORTED}."
        )


def reset_blank_pooler(model: Any) -> bool:
    """Give an all-zero pooler a fresh initialization; True if it had one.

    Embedding checkpoints trained without the pooler often ship it as zeros
    (multilingual-e5 does). In front of a new head, tanh(0 x + 0) = 0 for every pair: all
    logits are equal and no gradient reaches the encoder until the pooler has grown, which a
    short run never lets it do (issue 11's first run: pooler weights still under 0.004).
    """
    dense = getattr(getattr(model.base_model, "pooler", None), "dense", None)
    if dense is None or bool(dense.weight.detach().any()):
        return False
    with torch.no_grad():  # as transformers initializes a new Linear
        torch.nn.init.normal_(dense.weight, std=model.config.initializer_range)
        torch.nn.init.zeros_(dense.bias)
    return True


def _settings_max_length(model_dir: Path) -> int | None:
    path = model_dir / ST_SETTINGS
    return read_json(path).get("max_seq_length") if path.is_file() else None


class Reranker(torch_backend.TorchModel):
    """Score (query, passage) pairs with a cross-encoder; build one with :meth:`from_pretrained`.

    Pairs are tokenized together and truncated longest-first to ``max_length`` tokens, as
    sentence-transformers does, so long pairs score the same in both; each call that
    truncates logs how many pairs it cut.
    """

    def __init__(
        self,
        model: torch_backend.Model,
        tokenizer: Any,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = DEFAULT_BATCH_SIZE,
        show_progress_bar: bool = False,
        quantized: bool = False,
        name_or_path: str = "",
        load_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            model,
            tokenizer,
            max_length=max_length,
            batch_size=batch_size,
            show_progress_bar=show_progress_bar,
            quantized=quantized,
            name_or_path=name_or_path,
            load_options=load_options,
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        max_length: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        trust_remote_code: bool = False,
        quantize: Literal["int8"] | None = None,
        backend: Literal["torch", "onnx"] = "torch",
        show_progress_bar: bool = False,
        new_head: bool = False,
    ) -> Reranker:
        """Load a cross-encoder from a hub id (``BAAI/bge-reranker-base``) or a directory.

        ``max_length`` defaults to the model's settings (``sentence_bert_config.json``, else
        its tokenizer), capped at 512; an explicit value may go up to the position limit.
        ``device``, ``dtype``, ``quantize="int8"`` and ``backend`` work as for PEGEncoder.
        With ``new_head=True`` an embedding model without a classification head gets a
        freshly initialized one-logit head (for training, see ``peg-rag train-reranker``).
        """
        check_runtime(backend, quantize)
        if new_head and backend == "onnx":
            raise ValueError("new_head=True is for training; backend='onnx' is inference-only")
        model_dir = resolve_model_dir(name_or_path)
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        fresh = new_head and not any(
            a.endswith("ForSequenceClassification") for a in config.architectures or []
        )
        if fresh:
            config.num_labels = 1
        else:
            check_cross_encoder(config, str(name_or_path))
        model, tokenizer, load_options = torch_backend.load_model(
            backend,
            model_dir,
            AutoModelForSequenceClassification,
            device=device,
            dtype=dtype,
            quantize=quantize,
            trust_remote_code=trust_remote_code,
            config=config,
        )
        if fresh:
            reset_blank_pooler(model)
        limit = torch_backend.position_limit(model, tokenizer)
        length = max_length or min(_settings_max_length(model_dir) or limit, DEFAULT_MAX_LENGTH)
        if length > limit:
            raise ValueError(f"max_length={length} exceeds the model's limit of {limit} tokens")
        return cls(
            model,
            tokenizer,
            max_length=length,
            batch_size=batch_size,
            show_progress_bar=show_progress_bar,
            quantized=quantize is not None,
            name_or_path=model_name(name_or_path),
            load_options=load_options,
        )

    def tokenize(
        self, pairs: Sequence[Pair]
    ) -> tuple[list[list[int]], list[list[int]] | None, int]:
        """Token ids of each pair, their token types (None when the model has none), and how
        many pairs were truncated."""
        check_pairs(pairs)
        if not pairs:
            return [], None, 0
        queries, passages = [q for q, _ in pairs], [p for _, p in pairs]

        def encode(a: list[str], b: list[str], limit: int) -> dict[str, Any]:
            return self.tokenizer(a, b, truncation="longest_first", max_length=limit)

        # One extra token tells which pairs are too long; only those are tokenized again.
        found = encode(queries, passages, self.max_length + 1)
        ids = found["input_ids"]
        types = found.get("token_type_ids")
        long = [i for i, row in enumerate(ids) if len(row) > self.max_length]
        if long:
            cut = encode([queries[i] for i in long], [passages[i] for i in long], self.max_length)
            for n, i in enumerate(long):
                ids[i] = cut["input_ids"][n]
                if types is not None:
                    types[i] = cut["token_type_ids"][n]
        return ids, types, len(long)

    def logits(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Differentiable forward: one float32 logit per pair of a padded batch."""
        return self.model(**features).logits[:, 0].float()

    def score_pairs(
        self,
        pairs: Sequence[Pair],
        *,
        normalize: bool = False,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """One score per (query, passage) pair: logits, or sigmoids with ``normalize``."""
        ids, types, truncated = self.tokenize(pairs)
        torch_backend.warn_truncated(truncated, len(ids), self.max_length, "pairs")
        out = np.empty(len(ids), dtype=np.float32)
        if not ids:
            return out
        pad = self.tokenizer.pad_token_id

        def forward(index: np.ndarray) -> torch.Tensor:
            rows = [ids[i] for i in index]
            kinds = [types[i] for i in index] if types is not None else None
            return self.logits(torch_backend.collate(rows, pad, self.device, kinds))

        torch_backend.run_sorted(
            self.model,
            [len(row) for row in ids],
            batch_size or self.batch_size,
            forward,
            out,
            desc="Reranking",
            show_progress_bar=(
                self.show_progress_bar if show_progress_bar is None else show_progress_bar
            ),
        )
        return 1.0 / (1.0 + np.exp(-out)) if normalize else out

    def score(self, query: str, passages: Sequence[str], **options: Any) -> np.ndarray:
        """Scores of ``passages`` for one query (options as for :meth:`score_pairs`)."""
        if isinstance(passages, str):
            raise TypeError("passages must be a list of strings; wrap the passage in a list")
        return self.score_pairs([(query, p) for p in passages], **options)

    def rerank(
        self, query: str, passages: Sequence[str], top_n: int | None = None, **options: Any
    ) -> list[tuple[int, float]]:
        """``(index into passages, score)`` best first, at most ``top_n`` of them."""
        if top_n is not None and top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        scores = self.score(query, passages, **options)
        order = np.argsort(-scores, kind="stable")[:top_n]
        return [(int(i), float(scores[i])) for i in order]

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write the model, its tokenizer and the settings sentence-transformers reads, so that
        ``sentence_transformers.CrossEncoder(directory)`` gives the same logits."""
        # CrossEncoder applies this activation in predict(); our default is raw logits.
        self.model.config.sentence_transformers = {"activation_fn": SIGMOID}
        self.tokenizer.model_max_length = self.max_length
        path = self.save_model(directory, "reranker")
        write_json(path / ST_SETTINGS, {"max_seq_length": self.max_length}, indent=2)

    def describe(self) -> dict[str, Any]:
        """How to load this reranker again (recorded in an index's manifest)."""
        return {"model": self.name_or_path, "max_length": self.max_length}

    def __repr__(self) -> str:
        return f"Reranker({json.dumps(self.describe(), ensure_ascii=False)})"
