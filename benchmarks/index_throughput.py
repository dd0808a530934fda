"""End-to-end ``peg-rag index`` on the 100k-chunk corpus, vectors computed (issue 13).

retrieval_latency.py's 100k corpus (every document of the shared eval sets, then distinct
texts of the shared training files, taken in order until the default chunker makes 100,000
chunks) is written as one JSONL file; then each set-up runs ``peg-rag index`` on it in a
fresh process, into a fresh index folder, and the wall clock is taken: reading, chunking,
encoding every chunk, Chroma, BM25 (the default tokenizer) and the commit. The ONNX files
are exported (and cached) before any timing: that one-off cost is reported on its own.

Set-ups are ``BACKEND[-int8]`` (``torch``, ``torch-int8``, ``onnx``, ``onnx-int8``); the
default is ``onnx-int8`` alone, since torch fp32 takes about 20 minutes here. Its rate on
2026-11-27 (RESULTS.md, "Hybrid index build"): 119.2 s with cached vectors plus 98 chunks/s
to compute the vectors.

    python benchmarks/index_throughput.py [--setups onnx-int8 torch] [--write]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from results_file import publish
from retrieval_common import MODEL, bench_dir
from retrieval_latency import DEFAULTS, corpus_and_queries, take_chunks

from peg_rag import PEGEncoder
from peg_rag.retrieval.chunker import Chunker

CHUNKS = 100_000
# 2026-11-27: build with cached vectors, and me5-small-zh fp32 encoding on the 100k sample.
BASELINE_BUILD_S, BASELINE_ENCODE_RATE = 119.2, 98.0


def write_corpus(model: str, path: Path) -> int:
    """The 100k corpus as JSONL (``id``, ``text``); returns the number of documents."""
    encoder = PEGEncoder.from_pretrained(model, device="cpu")
    chunker = Chunker(DEFAULTS.chunk_size, DEFAULTS.chunk_overlap, tokenizer=encoder.tokenizer)
    docs = take_chunks(corpus_and_queries()[0], chunker, CHUNKS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n")
    return len(docs)


def runtime_flags(setup: str) -> list[str]:
    backend, _, quantize = setup.partition("-")
    return ["--backend", backend] + (["--quantize", quantize] if quantize else [])


def export_once(model: str, setup: str) -> float:
    """Load the set-up once so its ONNX files are in the cache; seconds taken."""
    backend, _, quantize = setup.partition("-")
    start = time.perf_counter()
    PEGEncoder.from_pretrained(model, backend=backend, quantize=quantize or None)
    return time.perf_counter() - start


def index_once(model: str, setup: str, corpus: Path, work: Path) -> dict:
    """Run ``peg-rag index`` in a fresh process: wall seconds and the index's chunk count."""
    target = work / f"index-{setup}"
    shutil.rmtree(target, ignore_errors=True)
    command = [sys.executable, "-m", "peg_rag.cli", "index", str(corpus), "--index-dir"]
    command += [str(target), "--model", model, *runtime_flags(setup)]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    (state,) = target.glob("state-*")  # one commit: its chunks.jsonl lists every chunk
    chunks = sum(1 for _ in open(state / "chunks.jsonl", encoding="utf-8"))
    shutil.rmtree(target)
    return {"seconds": seconds, "chunks": chunks}


def render(results: dict) -> str:
    baseline_s = BASELINE_BUILD_S + CHUNKS / BASELINE_ENCODE_RATE
    chunks = next(iter(results["runs"].values()))["chunks"]
    lines = [
        f"- Corpus: {results['documents']:,} documents of retrieval_latency.py's 100k corpus "
        f"({chunks:,} chunks of at most {DEFAULTS.chunk_size} tokens, mostly short), one "
        "JSONL file; encoder `../shared/models/me5-small-zh`; BM25 tokenizer: the default",
        "- Each set-up: `peg-rag index FILE --index-dir NEW --model M --backend B [--quantize "
        "int8]` in a fresh process, ONNX files already exported and cached",
        "",
        "| set-up | wall time | chunks/s | vs 2026-11-27 torch fp32 |",
        "| --- | ---: | ---: | ---: |",
        f"| torch fp32, 2026-11-27 ({BASELINE_BUILD_S} s build + {CHUNKS:,} chunks at "
        f"{BASELINE_ENCODE_RATE:.0f}/s) | {baseline_s:,.0f} s | {CHUNKS / baseline_s:,.0f} | "
        "1.00x |",
    ]
    for setup, run in results["runs"].items():
        rate = run["chunks"] / run["seconds"]
        lines.append(
            f"| {setup} (this run) | {run['seconds']:,.0f} s | {rate:,.0f} | "
            f"{baseline_s / run['seconds']:.2f}x |"
        )
    lines.append("")
    exports = ", ".join(f"{s}: {t:.0f} s" for s, t in results["export_s"].items())
    lines.append(f"One-off ONNX export, fusion and quantization before the timing ({exports}).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--setups", nargs="+", default=["onnx-int8"])
    parser.add_argument("--work", type=Path, default=bench_dir() / "index-throughput")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    corpus = args.work / "corpus-100k.jsonl"
    documents = write_corpus(args.model, corpus)
    export_s = {s: export_once(args.model, s) for s in args.setups if s.startswith("onnx")}
    runs = {setup: index_once(args.model, setup, corpus, args.work) for setup in args.setups}
    results = {"documents": documents, "runs": runs, "export_s": export_s}
    title = "Indexing 100k chunks end to end (issue 13)"
    publish("index-throughput", title, render(results), results, args)


if __name__ == "__main__":
    main()
