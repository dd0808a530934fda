"""``peg-rag encode``: embed the texts of a JSONL file into a .npy matrix."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from peg_rag.core.files import atomic_writer
from peg_rag.core.records import read_jsonl, text_field

from .common import add_encoder_arguments, load_encoder


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "encode",
        help="embed a JSONL file's texts into OUT.npy",
        description="Embed one text per JSONL line (field --field) into a float32 .npy "
        "array whose row i is line i's vector.",
    )
    parser.add_argument("input", type=Path, metavar="INPUT.jsonl")
    parser.add_argument("--kind", choices=["query", "passage"], required=True)
    parser.add_argument("--output", type=Path, required=True, metavar="OUT.npy")
    parser.add_argument("--field", default="text", help="JSON field holding the text")
    add_encoder_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    texts = list(read_jsonl(args.input, lambda record, at: text_field(record, args.field, at)))
    vectors = load_encoder(args).encode(texts, args.kind)
    with atomic_writer(args.output, "wb") as handle:  # a handle: np.save adds no ".npy"
        np.save(handle, vectors)
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} vectors to {args.output}")
    return 0
