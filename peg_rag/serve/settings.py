"""Settings of ``peg-rag serve``: one dataclass, filled from ``PEG_RAG_*`` variables and flags.

Every field ``foo_bar`` is also the variable ``PEG_RAG_FOO_BAR`` (so the chat examples'
``PEG_RAG_LLM_MODEL``, ``PEG_RAG_LLM_BASE_URL`` and ``PEG_RAG_LLM_API_KEY`` apply here too);
a flag wins over its variable. Light on purpose: ``peg-rag --help`` imports this module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from peg_rag.core.encoding import check_runtime

ENV_PREFIX = "PEG_RAG_"
# Index names are model ids for the chat route and appear in URLs: no ':' (the model
# aliases use it), no '/' and nothing a shell or a URL would need to escape.
INDEX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def env_name(name: str) -> str:
    """The variable that sets field ``name``: ``max_inputs`` -> ``PEG_RAG_MAX_INPUTS``."""
    return ENV_PREFIX + name.upper()


def served_name(model: str) -> str:
    """How clients name a model: a local folder's name, else the hub id as given."""
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def parse_indexes(specs: list[str] | str) -> dict[str, Path]:
    """``NAME=DIR`` specs (a list, or one comma-separated string) as ``{name: dir}``."""
    if isinstance(specs, str):
        specs = [s for s in (part.strip() for part in specs.split(",")) if s]
    found: dict[str, Path] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not directory:
            raise ValueError(f"an index is NAME=DIR, got {spec!r}")
        if not INDEX_NAME.fullmatch(name):
            raise ValueError(
                f"index name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)"
            )
        if name in found:
            raise ValueError(f"index name {name!r} is given twice")
        found[name] = Path(directory)
    return found


@dataclass
class ServeSettings:
    """What the server serves and how; see ``peg-rag serve --help`` for each field."""

    model: str = ""
    reranker: str | None = None
    indexes: dict[str, Path] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cors_origin: list[str] = field(default_factory=list)
    served_model_name: str | None = None
    truncate: bool = False
    max_inputs: int = 2048
    max_chars: int = 500_000
    max_batch_tokens: int = 16_384
    max_wait_ms: float = 5.0
    no_batching: bool = False
    backend: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    llm_model: str | None = None
    llm_base_url: str | None = None
    llm_api_key: str | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError(f"give --model (or {env_name('model')}): the embedding model")
        for name in ("max_inputs", "max_chars", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty; give one or leave it unset")
        check_runtime(self.backend or "torch", self.quantize)
        if self.name in self.indexes:
            raise ValueError(f"index name {self.name!r} is the embedding model's served name")

    @property
    def name(self) -> str:
        """The model name clients send: --served-model-name, else the folder's name for a
        local model, else the hub id."""
        return self.served_model_name or served_name(self.model)

    @property
    def runtime(self) -> dict[str, Any]:
        """Backend, device, dtype and quantization for every model the server loads: only
        those given, so that an index's own recorded runtime applies otherwise."""
        given = {
            "backend": self.backend,
            "device": self.device,
            "dtype": self.dtype,
            "quantize": self.quantize,
        }
        return {k: v for k, v in given.items() if v is not None}


_KINDS = {f.name: f.type for f in fields(ServeSettings)}


def _convert(name: str, raw: str) -> Any:
    kind = str(_KINDS[name])
    if name == "indexes":
        return parse_indexes(raw)
    if name == "cors_origin":
        return [o.strip() for o in raw.split(",") if o.strip()]
    if kind == "bool":
        if raw.strip().lower() not in _TRUE + _FALSE:
            raise ValueError(f"{env_name(name)}={raw!r}: use 1/0, true/false, yes/no or on/off")
        return raw.strip().lower() in _TRUE
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    return raw or None if "None" in kind else raw


def from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The fields that ``PEG_RAG_*`` variables set (``PEG_RAG_INDEXES="a=dir1,b=dir2"``)."""
    env = os.environ if environ is None else environ
    values = {}
    for name in _KINDS:
        if env_name(name) in env:
            try:
                values[name] = _convert(name, env[env_name(name)])
            except ValueError as exc:
                raise ValueError(f"{env_name(name)}: {exc}") from None
    return values
