"""What the LlamaIndex and LangChain rerankers share: loading a Reranker and calling it."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from peg_rag.core import Reranker
from peg_rag.core.reranker import DEFAULT_RERANKER

# Reranker.from_pretrained options the wrappers expose as their own fields.
LOAD_OPTIONS = ("max_length", "device", "dtype", "quantize", "backend", "trust_remote_code")


class RerankerOptions(BaseModel):
    """The cross-encoder and Reranker's loading options as fields of a reranking wrapper.

    Options left None follow the model's files and the machine; after loading, every field
    shows the setting actually in use (also when a ready reranker was passed).
    """

    # A misspelt option fails instead of being ignored (LlamaIndex components ignore extras).
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(
        default=DEFAULT_RERANKER, description="Hub id or local directory of a cross-encoder."
    )
    normalize: bool = Field(
        default=False, description="Sigmoid scores in [0, 1] instead of raw logits."
    )
    max_length: int | None = Field(default=None, description="Max tokens per (query, text).")
    device: str | None = Field(default=None, description="cpu, cuda, mps (default: best).")
    dtype: str | None = Field(default=None, description="float32, bfloat16 or float16.")
    quantize: str | None = Field(default=None, description="'int8': dynamic int8 on CPU.")
    backend: str | None = Field(
        default=None, description="'torch' (default) or 'onnx': ONNX Runtime on the CPU."
    )
    trust_remote_code: bool = Field(default=False, description="Run code shipped with the model.")

    _reranker: Reranker = PrivateAttr()
    # Async callers run the model in worker threads; one call at a time keeps concurrent
    # queries from competing for the same cores and model.
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def _start(self, reranker: Reranker | None) -> None:
        """Load the model (or take ``reranker``) and record the settings in use."""
        if reranker is None:
            options = {name: getattr(self, name) for name in LOAD_OPTIONS}
            reranker = Reranker.from_pretrained(
                self.model, **{k: v for k, v in options.items() if v is not None}
            )
        else:
            given = sorted(self.model_fields_set & {"model", *LOAD_OPTIONS})
            if given:
                raise ValueError(
                    "pass either a ready reranker or a model and its loading options, "
                    f"not both (got {given})"
                )
        self._reranker = reranker
        self.model = reranker.name_or_path
        self.max_length = reranker.max_length
        for name, value in reranker.load_options.items():
            setattr(self, name, value)

    @property
    def reranker(self) -> Reranker:
        """The Reranker behind this wrapper."""
        return self._reranker

    def _rerank(self, query: str, texts: Sequence[str], top_n: int) -> list[tuple[int, float]]:
        """``(index into texts, score)`` best first, at most ``top_n``; thread-safe."""
        with self._lock:
            return self._reranker.rerank(query, texts, top_n, normalize=self.normalize)
