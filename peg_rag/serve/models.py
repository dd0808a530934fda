"""What the server computes with: the models and indexes it loads once, and the functions
its batches run.

Each index retrieves with the encoder its manifest records; encoders (and rerankers) are
loaded once per model and settings, so an index built with ``--model`` shares that one.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peg_rag.core.encoder import PEGEncoder
from peg_rag.core.encoding import Encoder, Kind
from peg_rag.core.reranker import Reranker
from peg_rag.retrieval.hybrid import HybridRetriever
from peg_rag.retrieval.index_files import encoder_record, read_manifest

from .settings import ServeSettings

logger = logging.getLogger("peg_rag")


# What decides an encoder's vectors; how it runs (device, dtype, quantization, backend) is
# the server's choice, so indexes share one encoder whatever they were built with.
_VECTOR_KEYS = ("model", "pooling", "normalize", "query_prompt", "passage_prompt", "max_length")


def _encoder_key(record: Mapping[str, Any]) -> str:
    """Encoders with equal keys make the same vectors (the index's probe check confirms it)."""
    settings = {k: record.get(k) for k in _VECTOR_KEYS}
    for prompt in ("query_prompt", "passage_prompt"):
        settings[prompt] = settings[prompt] or None
    return json.dumps(settings, sort_keys=True)


@dataclass
class Index:
    """A served index: its retriever, and the reranker a request with ``rerank: true`` gets
    when the index records none (the server's ``--reranker``)."""

    retriever: HybridRetriever
    fallback_reranker: Reranker | None

    def describe(self) -> dict[str, Any]:
        reranker = self.retriever.reranker or self.fallback_reranker
        return {
            "chunks": len(self.retriever),
            "documents": len(self.retriever.doc_ids()),
            "encoder": self.retriever.encoder_settings["model"],
            "reranker": reranker.name_or_path if reranker else None,
            "reranks_by_default": self.retriever.reranker is not None,
        }


@dataclass
class Models:
    """The embedding model served at /v1/embeddings, the reranker, and the indexes."""

    encoder: Encoder
    reranker: Reranker | None
    indexes: dict[str, Index]


def load_models(settings: ServeSettings) -> Models:
    """Load --model, --reranker and every --index, sharing models between them."""
    runtime = settings.runtime
    encoder = PEGEncoder.from_pretrained(settings.model, **runtime)
    encoders: dict[str, Encoder] = {_encoder_key(encoder_record(encoder)): encoder}
    reranker = Reranker.from_pretrained(settings.reranker, **runtime) if settings.reranker else None
    rerankers = {reranker.name_or_path: reranker} if reranker else {}
    indexes = {}
    for name, directory in settings.indexes.items():
        manifest = read_manifest(Path(directory))
        shared = encoders.get(_encoder_key(manifest["encoder"]))
        recorded = manifest.get("reranker", {}).get("model")
        retriever = HybridRetriever.load(
            directory,
            encoder=shared,
            reranker=rerankers.get(recorded) if recorded else False,
            **runtime,
        )
        if recorded and retriever.reranker is not None:  # shared with later indexes
            rerankers[recorded] = retriever.reranker
        encoders.setdefault(_encoder_key(manifest["encoder"]), retriever.encoder)
        indexes[name] = Index(retriever, reranker)
        logger.info("index %s: %d chunks from %s", name, len(retriever), directory)
    return Models(encoder, reranker, indexes)


class TokenCounter:
    """Token counts of texts or pairs, for validation, usage and batch budgets.

    It works on its own copy of the tokenizer: a Hugging Face fast tokenizer changes its
    truncation state on each call, so one shared with the forward passes' thread fails
    ("Already borrowed") when both run at once.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self._tokenizer = copy.deepcopy(tokenizer)
        self.max_length = max_length

    def texts(self, texts: Sequence[str], prompt: str | None) -> list[int]:
        """Tokens of each text with its prompt and special tokens; a text over max_length
        counts max_length + 1."""
        prefixed = [(prompt or "") + t for t in texts]
        found = self._tokenizer(prefixed, truncation=True, max_length=self.max_length + 1)
        return [len(ids) for ids in found["input_ids"]]

    def pairs(self, query: str, documents: Sequence[str]) -> list[int]:
        """Tokens of each (query, document) pair as the reranker reads it (truncated)."""
        found = self._tokenizer(
            [query] * len(documents),
            list(documents),
            truncation="longest_first",
            max_length=self.max_length,
        )
        return [len(ids) for ids in found["input_ids"]]


def embed(encoder: Encoder, items: Sequence[tuple[str, Kind]]) -> np.ndarray:
    """Vectors of (text, kind) items, each kind in one forward pass."""
    out = np.empty((len(items), encoder.dim), dtype=np.float32)
    for kind in ("query", "passage"):
        index = [i for i, (_, k) in enumerate(items) if k == kind]
        if index:
            texts = [items[i][0] for i in index]
            out[index] = encoder.encode(texts, kind, batch_size=len(texts), show_progress_bar=False)
    return out


def score(reranker: Reranker, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """Reranker logits of (query, document) pairs, in one forward pass."""
    return reranker.score_pairs(list(pairs), batch_size=len(pairs), show_progress_bar=False)
