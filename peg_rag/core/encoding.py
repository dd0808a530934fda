"""The ``Encoder`` protocol: what retrieval, mining, evaluation and the integrations need
from an embedding model. :class:`peg_rag.PEGEncoder` implements it; so can any other.

Light on purpose (no torch): modules that only type against an encoder import this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

Kind = Literal["query", "passage"]
DEFAULT_BATCH_SIZE = 32  # texts per forward pass
DTYPES = ("float32", "bfloat16", "float16")
POOLING_MODES = ("cls", "mean")
BACKENDS = ("torch", "onnx")  # what runs the model: torch, or ONNX Runtime on the CPU
QUANTIZE = (None, "int8")


def check_runtime(backend: str, quantize: str | None) -> None:
    """Reject an unknown backend or quantization, naming the choices."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")


def check_texts(texts: Sequence[str]) -> None:
    """Reject anything that is not a non-empty string, naming its index."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a single string; wrap it in a list")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected a non-empty str")
        if not text.strip():
            raise ValueError(f"texts[{i}] is empty or whitespace-only: {text!r}")


@runtime_checkable
class Encoder(Protocol):
    """An embedding model with sentence-transformers-style settings.

    ``name_or_path`` is how it was loaded (a hub id, or a local directory's absolute path)
    and ``load_options`` the runtime options it was loaded with (``backend``, ``device``,
    ``dtype``, ``quantize``, ``trust_remote_code``), so that the same encoder can be loaded
    again.
    ``query_prompt`` / ``passage_prompt`` are the prefixes added to each kind of text.
    ``tokenizer`` is a Hugging Face fast tokenizer (the chunker counts its tokens).
    """

    name_or_path: str
    load_options: dict[str, Any]
    pooling: str
    normalize: bool
    query_prompt: str | None
    passage_prompt: str | None
    max_length: int
    tokenizer: Any

    @property
    def dim(self) -> int:
        """Size of the vectors."""
        ...

    def tokenize(
        self, texts: Sequence[str], kind: Kind | None = None
    ) -> tuple[list[list[int]], int]:
        """Token ids (prompt included, truncated to max_length) and how many were cut."""
        ...

    def encode(
        self,
        texts: Sequence[str],
        kind: Kind | None = None,
        *,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """A float32 array (len(texts), dim); ``kind`` picks the prompt."""
        ...

    def encode_queries(self, texts: Sequence[str], **kwargs: Any) -> np.ndarray: ...

    def encode_passages(self, texts: Sequence[str], **kwargs: Any) -> np.ndarray: ...


def vector_settings(encoder: Encoder) -> dict[str, Any]:
    """The settings that decide an encoder's vectors (with its model): saved with an index,
    shown by the framework wrappers."""
    return {
        "pooling": encoder.pooling,
        "normalize": encoder.normalize,
        "query_prompt": encoder.query_prompt,
        "passage_prompt": encoder.passage_prompt,
        "max_length": encoder.max_length,
    }
