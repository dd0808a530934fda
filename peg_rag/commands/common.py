"""Arguments and helpers that several subcommands share."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_encoder_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--model and the PEGEncoder options every encoding command takes."""
    group = parser.add_argument_group("encoder")
    group.add_argument("--model", required=required, help="hub id or local model directory")
    group.add_argument("--pooling", choices=["cls", "mean"], help="default: model files, else cls")
    group.add_argument("--query-instruction", help="query prefix (default: the model's prompt)")
    group.add_argument("--passage-instruction", help="passage prefix (default: model's prompt)")
    group.add_argument("--max-length", type=int, help="max tokens per text (default: model's)")
    group.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    group.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    group.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    group.add_argument("--quantize", choices=["int8"], help="dynamic int8 Linear layers (CPU)")
    group.add_argument(
        "--trust-remote-code", action="store_true", help="run code shipped with the model"
    )


def load_encoder(args: argparse.Namespace, model: str | None = None):
    """Build a PEGEncoder from the arguments of add_encoder_arguments."""
    from peg_rag.encoder import PEGEncoder

    return PEGEncoder.from_pretrained(
        model or args.model,
        pooling=args.pooling,
        query_instruction=args.query_instruction,
        passage_instruction=args.passage_instruction,
        max_length=args.max_length,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        trust_remote_code=args.trust_remote_code,
        quantize=args.quantize,
        show_progress_bar=True,
    )


def atomic_path(target: Path) -> Path:
    """A temporary sibling of ``target``; os.replace it onto target once fully written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")
