"""``peg-rag export``: write a model folder plus its ONNX files, ready to ship."""

from __future__ import annotations

import argparse
from pathlib import Path

from peg_rag import core


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a model folder plus its ONNX files (sentence-transformers layout)",
        description="Write MODEL, an embedding model or a cross-encoder (hub id or directory), "
        "to DIR: the Hugging Face and sentence-transformers files plus onnx/model.onnx "
        "(float32, fused for ONNX Runtime) and, with --quantize int8, "
        "onnx/model_qint8_<isa>.onnx for this CPU. peg-rag's --backend onnx uses these files "
        "as they are, and sentence-transformers loads DIR.",
    )
    parser.add_argument("model", metavar="MODEL", help="hub id or local model directory")
    parser.add_argument("--output", type=Path, required=True, metavar="DIR")
    parser.add_argument("--quantize", choices=["int8"], help="also write int8 weights")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="run code shipped with the model"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = core.export_model(
        args.model,
        args.output,
        quantize=args.quantize,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
    )
    files = ", ".join(str(path.relative_to(args.output)) for path in result.onnx_files)
    print(f"wrote the {result.kind} to {args.output} with {files}")
    return 0
