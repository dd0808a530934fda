"""Request bodies of the API and their validation into clear 400 errors.

The embeddings request is OpenAI's, the rerank request Cohere's and Jina's (``query``,
``documents``, ``top_n``, ``return_documents``), the chat request OpenAI's. Fields other
APIs define and we do not use (``user``...) are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from peg_rag.core.encoding import Kind
from peg_rag.retrieval.settings import Fusion, Method

from .errors import APIError

INPUT_TYPES = ("query", "passage")
ENCODING_FORMATS = ("float", "base64")
Body = TypeVar("Body", bound=BaseModel)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EmbeddingRequest(_Request):
    input: Any = None  # checked by texts_of, for messages that say what is wrong
    model: str | None = None
    encoding_format: str = "float"
    input_type: str | None = None
    dimensions: int | None = None


class RerankRequest(_Request):
    query: str
    documents: list[Any]
    model: str | None = None
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    raw_scores: bool = False


class RetrieveRequest(_Request):
    index: str
    query: str
    k: int = Field(5, ge=1, le=1000)
    filters: dict[str, Any] | None = None
    method: Method = "hybrid"
    fusion: Fusion | None = None
    weights: dict[str, float] | None = None
    candidates: int | None = Field(None, ge=1, le=10_000)
    rerank: bool | None = None
    rerank_top_n: int | None = Field(None, ge=1, le=1000)


class Message(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content as text (the text parts of a multi-part content)."""
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Request):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    k: int = Field(4, ge=1, le=50)
    filters: dict[str, Any] | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = Field(None, ge=1)


def parse(kind: type[Body], data: Any) -> Body:
    """``data`` validated as ``kind``, or a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise APIError(400, f"{where}: {first['msg']}", param=where) from None


def texts_of(value: Any, field: str) -> list[str]:
    """A string or a list of strings as a list; 400 for anything else, naming the item."""
    single = isinstance(value, str)
    if single:
        value = [value]
    if not isinstance(value, list):
        raise APIError(
            400,
            f"'{field}' must be a string or a list of strings, got {type(value).__name__}",
            param=field,
        )
    if not value:
        raise APIError(400, f"'{field}' is an empty list", param=field)
    for i, text in enumerate(value):
        name = field if single else f"{field}[{i}]"
        if isinstance(text, (int, list)) and not isinstance(text, bool):
            raise APIError(
                400,
                f"'{field}' holds token ids at [{i}]: this server takes text only",
                param=field,
            )
        if not isinstance(text, str):
            raise APIError(
                400, f"'{name}' is {type(text).__name__}, expected a string", param=field
            )
        if not text.strip():
            raise APIError(400, f"'{name}' is empty or whitespace-only", param=field)
    return value


def document_texts(documents: list[Any]) -> list[str]:
    """Rerank documents given as strings or ``{"text": ...}`` objects, as texts."""
    texts = [d.get("text") if isinstance(d, dict) else d for d in documents]
    return texts_of(texts, "documents")


def embedding_kind(body: EmbeddingRequest, name: str) -> Kind:
    """Query or passage: ``input_type``, or the kind a ``NAME:query`` / ``NAME:passage``
    model names (for clients that cannot send extra fields); passage by default.
    404 for a model other than ``name`` and its aliases."""
    named: str | None = None
    if body.model is not None and body.model != name:
        base, _, suffix = body.model.rpartition(":")
        if base != name or suffix not in INPUT_TYPES:
            raise APIError(
                404,
                f"model {body.model!r} is not served here; use {name!r}, '{name}:query' or "
                f"'{name}:passage'",
                code="model_not_found",
                param="model",
            )
        named = suffix
    given = body.input_type
    if given is not None and given not in INPUT_TYPES:
        raise APIError(
            400,
            f"input_type must be 'query' or 'passage', got {given!r}",
            code="invalid_input_type",
            param="input_type",
        )
    if named and given and named != given:
        raise APIError(
            400,
            f"model {body.model!r} says {named!r} but input_type says {given!r}",
            param="input_type",
        )
    return "query" if "query" in (named, given) else "passage"
