"""What the LlamaIndex and LangChain embedding classes share: loading and calling an encoder."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from peg_rag.core import Encoder, PEGEncoder, vector_settings
from peg_rag.core.deprecation import renamed

DEFAULT_MODEL = "TownsWu/PEG"

# PEGEncoder.from_pretrained options the wrappers expose as their own fields.
LOAD_OPTIONS = (
    "pooling",
    "normalize",
    "query_prompt",
    "passage_prompt",
    "max_length",
    "device",
    "dtype",
    "trust_remote_code",
    "quantize",
    "backend",
)
# Field names of peg-rag 0.1, accepted with a warning until 0.3.
RENAMED = {"query_instruction": "query_prompt", "passage_instruction": "passage_prompt"}


def load_encoder(model_name: str, encoder: Encoder | None, options: dict[str, Any]) -> Encoder:
    """Load ``model_name`` with ``options``, or take a ready ``encoder`` (then no options)."""
    # None means "as the model files say"; trust_remote_code=False is the default too.
    given = {
        k: v
        for k, v in options.items()
        if v is not None and not (k == "trust_remote_code" and v is False)
    }
    if encoder is None:
        return PEGEncoder.from_pretrained(model_name, **given)
    if given:
        raise ValueError(
            f"pass either a ready encoder or loading options, not both (got {sorted(given)})"
        )
    return encoder


def encoder_options(encoder: Encoder) -> dict[str, Any]:
    """The loading options that reproduce a loaded encoder, for the wrappers' fields."""
    return {**vector_settings(encoder), **encoder.load_options}


class EncoderRunner:
    """Calls one encoder from any thread, one batch at a time.

    Async callers run these methods in worker threads; the lock keeps concurrent
    batches from competing for the same cores and model.
    """

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self._lock = threading.Lock()

    def queries(self, texts: Sequence[str], **options: Any) -> list[list[float]]:
        """Query vectors as lists; ``options`` go to the encoder's ``encode``."""
        with self._lock:
            return self.encoder.encode_queries(texts, **options).tolist()

    def passages(self, texts: Sequence[str], **options: Any) -> list[list[float]]:
        """Passage vectors as lists; ``options`` go to the encoder's ``encode``."""
        with self._lock:
            return self.encoder.encode_passages(texts, **options).tolist()


class EncoderOptions(BaseModel):
    """The model and PEGEncoder's loading options as fields of an embedding wrapper.

    Options left None follow the model's files; after loading, every field shows the
    setting actually in use (also when a ready encoder was passed).
    """

    model_config = ConfigDict(protected_namespaces=())

    model_name: str = Field(default=DEFAULT_MODEL, description="Hub id or local model directory.")
    pooling: str | None = Field(default=None, description="'cls' or 'mean'.")
    normalize: bool | None = Field(default=None, description="L2-normalize vectors.")
    query_prompt: str | None = Field(default=None, description="Prefix for queries.")
    passage_prompt: str | None = Field(default=None, description="Prefix for passages.")
    max_length: int | None = Field(default=None, description="Max tokens per text.")
    device: str | None = Field(default=None, description="cpu, cuda, mps (default: best).")
    dtype: str | None = Field(default=None, description="float32, bfloat16 or float16.")
    quantize: str | None = Field(default=None, description="'int8': dynamic int8 on CPU.")
    backend: str | None = Field(
        default=None, description="'torch' (default) or 'onnx': ONNX Runtime on the CPU."
    )
    trust_remote_code: bool = Field(default=False, description="Run code shipped with the model.")

    _runner: EncoderRunner = PrivateAttr()

    @model_validator(mode="before")
    @classmethod
    def _renamed_fields(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for old, new in RENAMED.items():
                if old in values:
                    values[new] = renamed(old, new, values.pop(old), values.get(new), stacklevel=6)
        return values

    def _start(self, encoder: Encoder | None) -> None:
        """Load the model (or take ``encoder``) and record the settings in use."""
        options = {name: getattr(self, name) for name in LOAD_OPTIONS}
        self._runner = EncoderRunner(load_encoder(self.model_name, encoder, options))
        for name, value in encoder_options(self._runner.encoder).items():
            setattr(self, name, value)

    @property
    def encoder(self) -> Encoder:
        """The encoder behind these embeddings."""
        return self._runner.encoder


def wrapper_name(model_name: str | None, encoder: Encoder | None) -> str:
    """``model_name``, else where a given encoder came from, else the default model."""
    return model_name or (encoder.name_or_path if encoder is not None else "") or DEFAULT_MODEL
