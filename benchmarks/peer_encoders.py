"""Peer encoders for encode_throughput.py, each run inside its own virtual environment.

    VENV/bin/python peer_encoders.py prepare MODEL WORK ISA
    VENV/bin/python peer_encoders.py serve st-onnx FOLDER FILE
    VENV/bin/python peer_encoders.py serve fastembed FOLDER FILE --pooling mean --dim 384 \
        --prompts '{"query": "query: ", "passage": "passage: "}'

``prepare`` (sentence-transformers' environment) writes MODEL's folder to WORK with the ONNX
files sentence-transformers' own exporters make: ``onnx/model.onnx``, ``onnx/model_O3.onnx``
and its int8 export (``st_quantized_file``). ``serve`` loads one encoder from FOLDER/FILE,
prints one JSON line (``{"ready": true}``) and then answers JSON lines on stdin:

- ``{"op": "encode", "texts": [...], "kind": "query"|"passage", "batch_size": 32}`` ->
  ``{"seconds": s}``; with ``"save": "x.npy"`` the vectors are written there too;
- ``{"op": "latency", "text": "..."}`` -> ``{"seconds": s}`` for that one query alone.

Seconds are measured here, around the encode call only. Nothing from peg-rag is imported:
these environments do not have it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def st_quantized_file(isa: str) -> str:
    """sentence-transformers' name for its int8 export for ``isa``: unsigned weights for
    avx2 (``onnx/model_quint8_avx2.onnx``), signed for avx512, avx512_vnni and arm64."""
    return f"onnx/model_{'quint8' if isa == 'avx2' else 'qint8'}_{isa}.onnx"


def prepare(model: str, work: Path, isa: str) -> None:
    from sentence_transformers import (
        SentenceTransformer,
        export_dynamic_quantized_onnx_model,
        export_optimized_onnx_model,
    )

    if (work / st_quantized_file(isa)).is_file():
        return
    st = SentenceTransformer(model, backend="onnx", device="cpu")  # exported by optimum
    st.save_pretrained(str(work))
    export_optimized_onnx_model(st, "O3", str(work))  # O4 is O3 plus fp16: GPU only
    export_dynamic_quantized_onnx_model(st, isa, str(work))


class STOnnx:
    """sentence-transformers with backend="onnx" on one of the folder's ONNX files."""

    def __init__(self, folder: str, file: str) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(
            folder, backend="onnx", device="cpu", model_kwargs={"file_name": file}
        )

    def encode(self, texts: list[str], kind: str, batch_size: int) -> np.ndarray:
        return self.model.encode(
            texts, prompt_name=kind, batch_size=batch_size, normalize_embeddings=True
        )


class FastEmbed:
    """fastembed with the folder added as a custom model; it adds no prompts, so we do."""

    def __init__(self, folder: str, file: str, pooling: str, dim: int, prompts: dict) -> None:
        from fastembed import TextEmbedding
        from fastembed.common.model_description import ModelSource, PoolingType

        name = f"peg-rag-bench/{Path(folder).name}"
        TextEmbedding.add_custom_model(
            model=name,
            pooling=PoolingType.MEAN if pooling == "mean" else PoolingType.CLS,
            normalization=True,
            sources=ModelSource(hf=name),
            dim=dim,
            model_file=file,
        )
        self.model = TextEmbedding(model_name=name, specific_model_path=folder, threads=2)
        self.prompts = prompts

    def encode(self, texts: list[str], kind: str, batch_size: int) -> np.ndarray:
        prefix = self.prompts.get(kind) or ""
        return np.stack(list(self.model.embed([prefix + t for t in texts], batch_size=batch_size)))


def serve(args: argparse.Namespace) -> None:
    replies = os.fdopen(os.dup(1), "w")  # the protocol; library output goes to stderr
    os.dup2(2, 1)
    if args.kind == "st-onnx":
        encoder: STOnnx | FastEmbed = STOnnx(args.folder, args.file)
    else:
        prompts = json.loads(args.prompts)
        encoder = FastEmbed(args.folder, args.file, args.pooling, args.dim, prompts)
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        if request["op"] == "latency":
            encoder.encode([request["text"]], "query", 1)
        else:
            vectors = encoder.encode(request["texts"], request["kind"], request["batch_size"])
        seconds = time.perf_counter() - start
        if request.get("save"):
            np.save(request["save"], np.asarray(vectors, dtype=np.float32))
        replies.write(json.dumps({"seconds": seconds}) + "\n")
        replies.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare")
    prep.add_argument("model")
    prep.add_argument("work", type=Path)
    prep.add_argument("isa", choices=["arm64", "avx2", "avx512", "avx512_vnni"])
    run = commands.add_parser("serve")
    run.add_argument("kind", choices=["st-onnx", "fastembed"])
    run.add_argument("folder")
    run.add_argument("file")
    run.add_argument("--pooling", default="mean")
    run.add_argument("--dim", type=int, default=0)
    run.add_argument("--prompts", default="{}")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.model, args.work, args.isa)
    else:
        serve(args)


if __name__ == "__main__":
    main()
