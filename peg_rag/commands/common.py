"""Arguments and helpers that several subcommands share."""

from __future__ import annotations

import argparse

from peg_rag import core
from peg_rag.core.deprecation import renamed
from peg_rag.core.encoding import BACKENDS, DEFAULT_BATCH_SIZE, DTYPES, POOLING_MODES
from peg_rag.retrieval.settings import HybridSettings

RERANK_TOP_N = HybridSettings().rerank_top_n


def add_runtime_arguments(group: argparse._ArgumentGroup, what: str = "texts") -> None:
    """Where and how fast the encoder runs: --backend, --device, --dtype, --quantize,
    --batch-size."""
    group.add_argument(
        "--backend",
        choices=BACKENDS,
        help="torch, or onnx: ONNX Runtime on the CPU, exported once and cached (default: "
        "the index's, else torch)",
    )
    group.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    group.add_argument("--dtype", choices=DTYPES)
    group.add_argument(
        "--quantize",
        choices=["int8"],
        help="dynamic int8 on the CPU: the Linear layers (torch), the whole graph (onnx)",
    )
    group.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"{what} per forward pass"
    )


def add_encoder_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--model and the PEGEncoder options every encoding command takes."""
    group = parser.add_argument_group("encoder")
    group.add_argument("--model", required=required, help="hub id or local model directory")
    group.add_argument("--pooling", choices=POOLING_MODES, help="default: model files, else cls")
    group.add_argument("--query-prompt", help="query prefix (default: the model's prompt)")
    group.add_argument("--passage-prompt", help="passage prefix (default: the model's prompt)")
    for old in ("--query-instruction", "--passage-instruction"):  # deprecated names
        group.add_argument(old, help=argparse.SUPPRESS)
    group.add_argument("--max-length", type=int, help="max tokens per text (default: model's)")
    add_runtime_arguments(group)
    group.add_argument(
        "--trust-remote-code", action="store_true", help="run code shipped with the model"
    )


def load_encoder(args: argparse.Namespace, model: str | None = None) -> core.PEGEncoder:
    """Build a PEGEncoder from the arguments of add_encoder_arguments."""
    return core.PEGEncoder.from_pretrained(
        model or args.model,
        pooling=args.pooling,
        query_prompt=renamed(
            "--query-instruction", "--query-prompt", args.query_instruction, args.query_prompt
        ),
        passage_prompt=renamed(
            "--passage-instruction",
            "--passage-prompt",
            args.passage_instruction,
            args.passage_prompt,
        ),
        max_length=args.max_length,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        trust_remote_code=args.trust_remote_code,
        quantize=args.quantize,
        backend=args.backend or "torch",
        show_progress_bar=True,
    )


def add_reranker_arguments(parser: argparse.ArgumentParser, help_model: str) -> None:
    """--reranker and --rerank-top-n (runtime: the encoder's --backend, --device, --dtype,
    --quantize)."""
    group = parser.add_argument_group("reranking")
    group.add_argument("--reranker", metavar="MODEL", help=help_model)
    group.add_argument(
        "--rerank-top-n",
        type=int,
        metavar="N",
        help=f"first-stage results to rerank (default: the index's, {RERANK_TOP_N})",
    )


def load_reranker(
    args: argparse.Namespace, *, max_length: int | None = None
) -> core.Reranker | None:
    """The --reranker model, on the encoder's backend, device, dtype and quantization; None if
    unset. ``max_length`` defaults to the model's."""
    if not args.reranker:
        return None
    return core.Reranker.from_pretrained(
        args.reranker,
        max_length=max_length,
        backend=args.backend or "torch",
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        batch_size=args.batch_size,
        show_progress_bar=True,
    )
