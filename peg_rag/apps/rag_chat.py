"""What the RAG chat examples share: the LLM settings, the prompt, and the no-LLM answer.

Any OpenAI-compatible chat endpoint works (OpenAI, a local Ollama or vLLM server...):

- ``PEG_RAG_LLM_MODEL``: the model name, e.g. ``qwen2.5:7b``. Unset: no LLM, answers are
  extractive (the top passages with citations) and say so.
- ``PEG_RAG_LLM_BASE_URL``: the endpoint, e.g. ``http://localhost:11434/v1`` for Ollama or
  ``http://localhost:8000/v1`` for vLLM (default: OpenAI's).
- ``PEG_RAG_LLM_API_KEY``: the key, if the server wants one (default: ``not-needed``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peg_rag.core.cache import cache_dir
from peg_rag.core.documents import Document
from peg_rag.core.documents import read_inputs as read_files
from peg_rag.core.encoder import PEGEncoder
from peg_rag.core.encoding import Encoder
from peg_rag.core.reranker import Reranker

from .kb_model import Recipe
from .model_choice import resolve_model
from .sample_data import kb_documents

ENV_MODEL = "PEG_RAG_LLM_MODEL"
ENV_BASE_URL = "PEG_RAG_LLM_BASE_URL"
ENV_API_KEY = "PEG_RAG_LLM_API_KEY"

SYSTEM_PROMPT = (
    "你是一个严谨的中文问答助手。请只根据下面编号的参考资料回答用户的问题，"
    "在用到某条资料的句子末尾用方括号标注它的编号，例如[1]。"
    "如果资料中没有答案，请直接说明资料中没有相关信息，不要编造。"
)
NO_LLM_NOTICE = (
    f"No LLM configured (set {ENV_MODEL}, and {ENV_BASE_URL} for a local server, to use one): "
    "answering extractively with the top passages."
)


@dataclass(frozen=True)
class LLMSettings:
    """Where the chat model is: any OpenAI-compatible endpoint."""

    model: str
    base_url: str | None = None
    api_key: str = "not-needed"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LLMSettings | None:
        """The settings in the environment, or None when no model is configured."""
        env = os.environ if environ is None else environ
        model = env.get(ENV_MODEL, "").strip()
        if not model:
            if env.get(ENV_BASE_URL, "").strip():
                raise ValueError(f"{ENV_BASE_URL} is set but {ENV_MODEL} is not: name the model")
            return None
        return cls(
            model=model,
            base_url=env.get(ENV_BASE_URL, "").strip() or None,
            api_key=env.get(ENV_API_KEY, "").strip() or "not-needed",
        )


@dataclass(frozen=True)
class Source:
    """A retrieved passage as the chat shows and cites it."""

    id: str
    text: str
    score: float
    title: str = ""


def context_block(sources: Sequence[Source]) -> str:
    """The numbered reference passages put into the prompt: ``[1] title\\ntext``."""
    return "\n\n".join(
        f"[{n}] {s.title}\n{s.text}" if s.title else f"[{n}] {s.text}"
        for n, s in enumerate(sources, start=1)
    )


def citation_lines(sources: Sequence[Source]) -> list[str]:
    """One line per source: ``[n] id  title  (score)``."""
    return [
        "  ".join(filter(None, [f"[{n}] {s.id}", s.title, f"(score {s.score:.4f})"]))
        for n, s in enumerate(sources, start=1)
    ]


def extractive_answer(sources: Sequence[Source], max_passages: int = 3) -> str:
    """The answer without an LLM: the top passages verbatim, each with its citation."""
    if not sources:
        return "没有检索到相关资料。(No passage matched the question.)"
    return "\n".join(f"[{n}] {s.text}" for n, s in enumerate(sources[:max_passages], start=1))


def chat_arguments(description: str) -> argparse.ArgumentParser:
    """The command line both examples take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "paths",
        nargs="*",
        type=Path,
        metavar="PATH",
        help=".txt/.md/.jsonl files or folders to chat over (default: the bundled sample KB)",
    )
    parser.add_argument("-q", "--question", help="ask this one question and exit")
    parser.add_argument("-k", type=int, default=4, help="passages per answer (default 4)")
    parser.add_argument(
        "--model", help="embedding model (default: $PEG_RAG_MODEL, TownsWu/PEG, or the fallback)"
    )
    parser.add_argument(
        "--reranker",
        metavar="MODEL",
        help="cross-encoder that reorders the retrieved passages (e.g. BAAI/bge-reranker-base)",
    )
    parser.add_argument("--index-dir", type=Path, help="keep the index here (default: in memory)")
    parser.add_argument(
        "--chunk-size",
        type=int,
        help="tokens per chunk; 0 keeps documents whole (default: 256, less if the model's "
        "max length is smaller)",
    )
    return parser


def chunk_size_for(encoder: Encoder, requested: int | None) -> int:
    """The chunk size asked for, else 256 tokens or what fits the model with its prompt."""
    return requested if requested is not None else min(256, encoder.max_length - 16)


def load_chat_encoder(model: str | None) -> PEGEncoder:
    """The embedding model, found as ``peg-rag demo`` finds it (fallback included)."""
    name, how = resolve_model(model, cache=cache_dir(), recipe=Recipe(), out=print)
    print(f"Embedding model: {name} ({how})")
    return PEGEncoder.from_pretrained(name)


def load_chat_reranker(model: str | None) -> Reranker | None:
    """The --reranker cross-encoder, None without one."""
    if model is None:
        return None
    reranker = Reranker.from_pretrained(model)
    print(f"Reranker: {reranker.name_or_path} (sources are in its order, with its scores)")
    return reranker


def read_inputs(paths: Sequence[Path]) -> list[Document]:
    """HybridRetriever documents from files and folders (as ``peg-rag index`` reads them),
    or the bundled sample knowledge base when no path is given."""
    if not paths:
        return kb_documents()
    documents = read_files(list(paths))
    if not documents:
        raise ValueError(f"no .txt, .md or .jsonl documents in {', '.join(map(str, paths))}")
    return documents


def typed_questions(one: str | None) -> Iterator[str]:
    """The one question given, or questions typed until EOF, an empty line or 'exit'."""
    if one is not None:
        yield one
        return
    print("Ask a question (empty line or 'exit' to quit).")
    while True:
        try:
            line = input("\n问题> ").strip()
        except EOFError:
            return
        if line.lower() in ("", "exit", "quit"):
            return
        yield line


def llm_from_env(make: Callable[[LLMSettings], Any], extra: str) -> Any:
    """Build the chat model from the environment, None when none is configured.

    A configured LLM whose client package is missing stops with the install command.
    """
    settings = LLMSettings.from_env()
    if settings is None:
        return None
    try:
        return make(settings)
    except ImportError as exc:
        message = f"{exc}\nThe LLM client is an extra: pip install 'peg-rag[{extra}]'"
        raise SystemExit(message) from None
