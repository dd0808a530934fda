"""``peg-rag serve``: the OpenAI-compatible embedding, rerank and retrieval server."""

from __future__ import annotations

import argparse
from typing import Any

from peg_rag import serve
from peg_rag.core.encoding import BACKENDS, DTYPES
from peg_rag.serve.settings import ServeSettings, env_name, from_env, parse_indexes

# Each field's default (the model has none), for the help and to know which flags exist.
DEFAULTS = {**vars(ServeSettings(model="-")), "model": None}


def _add(group: Any, flag: str, dest: str, help_text: str, **options: Any) -> None:
    """A flag whose value, when not given, comes from PEG_RAG_<DEST> or the default."""
    default = DEFAULTS[dest]
    shown = f"default {default}; " if default not in (None, False, [], {}, "") else ""
    group.add_argument(
        flag, dest=dest, default=None, help=f"{help_text} ({shown}env {env_name(dest)})", **options
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve embeddings, reranking, retrieval and a search page over HTTP",
        description="An OpenAI-compatible server: POST /v1/embeddings (OpenAI's schema), "
        "/v1/rerank (Cohere's and Jina's), /v1/retrieve and /v1/chat/completions over the "
        "indexes, GET /v1/models, /health, /metrics, and a search-and-chat page at /. "
        "Concurrent requests share forward passes (dynamic batching). Every flag can also be "
        "set with the PEG_RAG_* variable shown; a flag wins. Needs the serve extra: "
        'pip install "peg-rag[serve]".',
    )
    models = parser.add_argument_group("what to serve")
    _add(
        models,
        "--model",
        "model",
        "embedding model for /v1/embeddings: hub id or directory",
    )
    _add(models, "--reranker", "reranker", "cross-encoder served at /v1/rerank", metavar="MODEL")
    _add(
        models,
        "--index",
        "indexes",
        "serve a `peg-rag index` directory under NAME; repeat for more (env: comma-separated)",
        metavar="NAME=DIR",
        action="append",
    )
    _add(
        models,
        "--served-model-name",
        "served_model_name",
        "the model name clients send (default: the model folder's name, or the hub id)",
    )
    network = parser.add_argument_group("network and security")
    _add(network, "--host", "host", "address to listen on")
    _add(network, "--port", "port", "port to listen on", type=int)
    _add(network, "--api-key", "api_key", "require 'Authorization: Bearer KEY' (prefer the env)")
    _add(
        network,
        "--cors-origin",
        "cors_origin",
        "allow browser calls from this origin; repeat for more (env: comma-separated)",
        action="append",
        metavar="ORIGIN",
    )
    limits = parser.add_argument_group("limits and batching")
    _add(
        limits,
        "--truncate",
        "truncate",
        "truncate texts over the model's max tokens instead of answering 400",
        action="store_const",
        const=True,
    )
    _add(limits, "--max-inputs", "max_inputs", "texts per request, else 413", type=int)
    _add(limits, "--max-chars", "max_chars", "characters per request, else 413", type=int)
    _add(
        limits,
        "--max-batch-tokens",
        "max_batch_tokens",
        "padded tokens per forward pass (texts x the longest)",
        type=int,
    )
    _add(
        limits,
        "--max-wait-ms",
        "max_wait_ms",
        "under concurrent load, wait this long at most for a batch to fill",
        type=float,
    )
    _add(
        limits,
        "--no-batching",
        "no_batching",
        "one request per forward pass (to measure what batching gains)",
        action="store_const",
        const=True,
    )
    runtime = parser.add_argument_group("model runtime")
    _add(
        runtime,
        "--backend",
        "backend",
        "torch, or onnx: ONNX Runtime on the CPU, exported once and cached (default: torch)",
        choices=BACKENDS,
    )
    _add(runtime, "--device", "device", "cpu, cuda, cuda:1, mps (default: best available)")
    _add(runtime, "--dtype", "dtype", "model dtype", choices=DTYPES)
    _add(
        runtime,
        "--quantize",
        "quantize",
        "dynamic int8 on the CPU: the Linear layers (torch), the whole graph (onnx)",
        choices=["int8"],
    )
    chat = parser.add_argument_group("chat (any OpenAI-compatible LLM; key: PEG_RAG_LLM_API_KEY)")
    _add(chat, "--llm-model", "llm_model", "chat model; unset: extractive answers")
    _add(chat, "--llm-base-url", "llm_base_url", "its endpoint, e.g. http://localhost:11434/v1")
    _add(
        parser,
        "--log-level",
        "log_level",
        "uvicorn's log level",
        choices=["critical", "error", "warning", "info", "debug"],
    )
    parser.set_defaults(run=run)


def settings_from(args: argparse.Namespace, environ: Any = None) -> ServeSettings:
    """The settings: defaults, then PEG_RAG_* variables, then the flags given."""
    values = from_env(environ)
    given = {k: v for k, v in vars(args).items() if v is not None and k in DEFAULTS}
    if "indexes" in given:
        given["indexes"] = parse_indexes(given["indexes"])
    return ServeSettings(**{**values, **given})


def run(args: argparse.Namespace) -> int:
    return serve.run_server(settings_from(args))
