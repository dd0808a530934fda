"""CPU encoding speed: PEGEncoder's torch and ONNX Runtime backends against sentence-transformers,
its ONNX backend and fastembed, on the same model and texts.

- Throughput: every encoder runs in turn on each slice of the same 2,000 shuffled passages
  (1,000 kuake-qtr-dev, 1,000 cmrc2018-dev), same batch size and max length; median texts/s
  over the repeats, and the ratio to sentence-transformers (torch, fp32).
- Latency: one short query (kuake-qtr-dev) at a time, each encoder on all of them in turn;
  p50 and p95.
- Quality: nDCG@10 on kuake-qtr-dev and cmedir-dev (dense, full corpus) for every row that
  changes the numbers (bf16, int8, sentence-transformers' O3 with approximate GELU), and for
  PEGEncoder torch fp32 as the reference.
- Export: sentence-transformers backend="onnx" loads the folder ``peg-rag export`` writes;
  the cosine of its vectors to PEGEncoder's is reported.

The peers pin other versions (optimum-onnx pins an older transformers), so they run from
their own virtual environments through ``peer_encoders.py``, made with:

    python3.11 -m venv /work/venvs/st-onnx
    /work/venvs/st-onnx/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu \
        "sentence-transformers[onnx]"
    python3.11 -m venv /work/venvs/fastembed
    /work/venvs/fastembed/bin/pip install fastembed

sentence-transformers' ONNX files are its own exports (plain, O3, int8 for this CPU), made
once in that environment; fastembed runs the plain one (threads=2, prompts prefixed by hand).
A peer that is missing or fails keeps its row, with the reason.

    python benchmarks/encode_throughput.py [--model DIR]
    python benchmarks/encode_throughput.py --smoke   # 20 texts, small eval subsets, no write
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peer_encoders import st_quantized_file
from results_file import header, update_section

REPO = Path(__file__).resolve().parents[1]
VENVS = REPO.parent / "venvs"
QUALITY_SETS = ("kuake-qtr-dev", "cmedir-dev")
REFERENCE = "sentence-transformers fp32"


def passages(eval_dir: Path, per_set: int) -> list[str]:
    """The first ``per_set`` documents of kuake-qtr-dev (short) and cmrc2018-dev (long)."""
    texts = []
    for name in ("kuake-qtr-dev", "cmrc2018-dev"):
        with open(eval_dir / name / "corpus.jsonl", encoding="utf-8") as handle:
            for line in itertools.islice(handle, per_set):
                record = json.loads(line)
                texts.append(f"{record.get('title', '')} {record['text']}".strip())
    return texts


def short_queries(eval_dir: Path, count: int) -> list[str]:
    with open(eval_dir / "kuake-qtr-dev" / "queries.jsonl", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in itertools.islice(handle, count)]


def subset(folder: Path, queries: int, target: Path) -> Path:
    """A small BEIR set for --smoke: the first judged queries, their documents and 50 more."""
    from peg_rag.core.beir import load_beir

    data = load_beir(folder)
    kept = sorted(data.qrels)[:queries]
    docs = {d for q in kept for d in data.qrels[q]} | set(itertools.islice(data.corpus, 50))
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"_id": d, "text": data.corpus[d]}, ensure_ascii=False) for d in docs]
    (target / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    lines = [json.dumps({"_id": q, "text": data.queries[q]}, ensure_ascii=False) for q in kept]
    (target / "queries.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    qrels = [f"{q}\t{d}\t{g}" for q in kept for d, g in data.qrels[q].items()]
    (target / "qrels" / "test.tsv").write_text("\n".join(["query-id\tcorpus-id\tscore", *qrels]))
    return target


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


class PeerError(RuntimeError):
    """A peer that could not be installed, loaded or run; the message says why."""


class Peer:
    """An encoder served by peer_encoders.py from another virtual environment."""

    def __init__(self, python: Path, arguments: list[str], log: Path, batch_size: int) -> None:
        if not python.is_file():
            raise PeerError(f"not installed: {python} is missing (see this script's docstring)")
        self.log, self.batch_size = log, batch_size
        script = Path(__file__).with_name("peer_encoders.py")
        self.process = subprocess.Popen(
            [str(python), str(script), "serve", *arguments],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
        )
        self._read()  # {"ready": true} once loaded

    def _read(self) -> dict:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise PeerError(f"failed to load or run: {' / '.join(tail) or 'no output'}")
        return json.loads(line)

    def call(self, **request: Any) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request, ensure_ascii=False) + "\n")
        self.process.stdin.flush()
        return float(self._read()["seconds"])

    def encode(self, texts: list[str], kind: str | None = None, **_: Any) -> np.ndarray:
        """Vectors (for nDCG): the texts are sent, the vectors come back in a .npy file."""
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/vectors.npy"
            self.call(
                op="encode", texts=list(texts), kind=kind, batch_size=self.batch_size, save=out
            )
            return np.load(out)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@dataclass
class Row:
    """One encoder: how it encodes a slice of passages and one query (seconds each), the
    object that evaluate_folder encodes with, and whether its quality is measured."""

    name: str
    throughput: Callable[[list[str]], float] | None = None
    latency: Callable[[str], float] | None = None
    encoder: Any = None
    quality: bool = False
    reason: str = ""
    seconds: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    ndcg: dict[str, float] = field(default_factory=dict)


def ours(name: str, encoder: Any, batch_size: int, quality: bool) -> Row:
    return Row(
        name,
        throughput=lambda part: timed(encoder.encode_passages, part, batch_size=batch_size),
        latency=lambda text: timed(encoder.encode_queries, [text]),
        encoder=encoder,
        quality=quality,
    )


def peer_rows(args: argparse.Namespace, reference: Any, isa: str, work: Path) -> list[Row]:
    """sentence-transformers' ONNX rows and fastembed's, each with its reason if it fails."""
    st_python = args.venvs / "st-onnx" / "bin" / "python"
    st_dir = work / "st-onnx"
    files = {  # name: (file, whether its numbers differ from fp32)
        "sentence-transformers ONNX fp32": ("onnx/model.onnx", False),
        "sentence-transformers ONNX O3": ("onnx/model_O3.onnx", True),
        f"sentence-transformers ONNX int8 ({isa})": (st_quantized_file(isa), True),
    }
    rows = [Row(name) for name in files]
    prepared = ""
    if not st_python.is_file():
        prepared = f"not installed: {st_python} is missing (see this script's docstring)"
    else:
        script = str(Path(__file__).with_name("peer_encoders.py"))
        result = subprocess.run(
            [str(st_python), script, "prepare", str(args.model), str(st_dir), isa],
            capture_output=True,
            text=True,
        )
        if result.returncode:
            prepared = "export failed: " + " / ".join(result.stderr.strip().splitlines()[-2:])
    for row, (file, quality) in zip(rows, files.values(), strict=True):
        row.reason = prepared
        if not prepared:
            start(row, st_python, ["st-onnx", str(st_dir), file], work, args.batch_size, quality)
    row = Row("fastembed fp32")
    prompts = {"query": reference.query_prompt, "passage": reference.passage_prompt}
    arguments = ["fastembed", str(st_dir), "onnx/model.onnx", "--pooling", reference.pooling]
    arguments += ["--dim", str(reference.dim), "--prompts", json.dumps(prompts)]
    if prepared:
        row.reason = f"needs sentence-transformers' plain ONNX export, unavailable: {prepared}"
    else:
        python = args.venvs / "fastembed" / "bin" / "python"
        start(row, python, arguments, work, args.batch_size, quality=False)
    return [*rows, row]


def start(
    row: Row, python: Path, arguments: list[str], work: Path, batch_size: int, quality: bool
) -> None:
    """Start ``row``'s peer process, or record why it does not run."""
    try:
        log = work / f"{row.name.replace(' ', '_')}.log"
        peer = Peer(python, arguments, log, batch_size)
    except PeerError as exc:
        row.reason = str(exc)
        return
    row.throughput = lambda part: peer.call(
        op="encode", texts=part, kind="passage", batch_size=batch_size
    )
    row.latency = lambda text: peer.call(op="latency", text=text)
    row.encoder, row.quality = peer, quality


def check_export(args: argparse.Namespace, isa: str, work: Path) -> list[str]:
    """Lines saying whether sentence-transformers (ONNX) loads ``peg-rag export``'s folder."""
    from peg_rag import PEGEncoder
    from peg_rag.core import export_model

    folder = work / "peg-rag-export"
    export_model(args.model, folder, quantize="int8", overwrite=True)
    texts = passages(args.eval_dir, 8)
    lines = []
    for file, quantize in (("onnx/model.onnx", None), (f"onnx/model_qint8_{isa}.onnx", "int8")):
        ours_vectors = PEGEncoder.from_pretrained(
            folder, backend="onnx", quantize=quantize, max_length=args.max_length
        ).encode_passages(texts)
        python = args.venvs / "st-onnx" / "bin" / "python"
        try:
            log = work / "export-check.log"
            peer = Peer(python, ["st-onnx", str(folder), file], log, args.batch_size)
        except PeerError as exc:
            lines.append(f"- sentence-transformers ONNX on peg-rag export's {file}: {exc}")
            continue
        theirs = peer.encode(texts, "passage")
        peer.close()
        cosine = float((ours_vectors * theirs).sum(axis=1).min())
        lines.append(
            f"- sentence-transformers backend='onnx' loads peg-rag export's {file}: "
            f"min cosine {cosine:.5f} to PEGEncoder backend='onnx' on {len(texts)} passages"
        )
    return lines


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    return set(next(line for line in text.splitlines() if line.startswith("flags")).split())


def describe(flags: set[str]) -> str:
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    missing = [
        name for name, flag in (("AVX-512", "avx512f"), ("AMX", "amx_tile")) if flag not in flags
    ]
    note = f" (no {' or '.join(missing)} flags exposed)" if missing else ""
    return ", ".join(f for f in wanted if f in flags) + note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO.parent / "shared/models/me5-small-zh")
    parser.add_argument("--eval-dir", default=REPO.parent / "shared/data/eval", type=Path)
    parser.add_argument("--venvs", type=Path, default=VENVS, help="holds st-onnx/, fastembed/")
    parser.add_argument("--per-set", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slice", type=int, default=250, help="texts per interleaved slice")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--skip-ndcg", action="store_true", help="speed only")
    parser.add_argument("--smoke", action="store_true", help="smallest run; RESULTS.md untouched")
    args = parser.parse_args()
    if args.smoke:
        args.per_set, args.repeats, args.slice, args.latency_queries = 10, 1, 20, 5

    from sentence_transformers import SentenceTransformer

    from peg_rag import PEGEncoder
    from peg_rag.core.cache import cache_dir
    from peg_rag.core.onnx_backend import cpu_isa
    from peg_rag.retrieval.evaluate import evaluate_folder

    logging.getLogger("peg_rag").setLevel(logging.ERROR)  # truncation is expected here
    isa = cpu_isa()[0]
    work = cache_dir() / "bench" / "encode" / args.model.name
    work.mkdir(parents=True, exist_ok=True)
    texts = passages(args.eval_dir, args.per_set)
    random.Random(0).shuffle(texts)  # every slice mixes short and long texts
    common = {"max_length": args.max_length, "batch_size": args.batch_size}
    variants = {
        "PEGEncoder torch fp32": ({"device": "cpu"}, True),
        "PEGEncoder torch bf16": ({"device": "cpu", "dtype": "bfloat16"}, True),
        "PEGEncoder torch int8": ({"device": "cpu", "quantize": "int8"}, True),
        "PEGEncoder onnx fp32": ({"backend": "onnx"}, False),
        "PEGEncoder onnx int8": ({"backend": "onnx", "quantize": "int8"}, True),
    }
    skipped = {}
    flags = cpu_flags()
    if not {"avx512_bf16", "amx_bf16"} & flags:
        # Without these instructions torch emulates bf16 matmuls in fp32, slower than fp32:
        # the row would measure the emulation, and its nDCG pass alone takes longer than the
        # whole rest of this benchmark on 2 cores.
        skipped["PEGEncoder torch bf16"] = "not run: this CPU has no avx512_bf16 or amx_bf16"
    encoders = {
        name: PEGEncoder.from_pretrained(args.model, **options, **common)
        for name, (options, _) in variants.items()
        if name not in skipped
    }
    reference = SentenceTransformer(str(args.model), device="cpu")
    reference.max_seq_length = args.max_length
    rows = [
        Row(
            REFERENCE,
            throughput=lambda part: timed(
                reference.encode,
                part,
                batch_size=args.batch_size,
                prompt_name="passage",
                normalize_embeddings=True,
            ),
            latency=lambda text: timed(reference.encode, [text], prompt_name="query"),
        ),
        *peer_rows(args, encoders["PEGEncoder torch fp32"], isa, work),
        *(
            ours(name, encoders[name], args.batch_size, variants[name][1])
            if name in encoders
            else Row(name, reason=skipped[name])
            for name in variants
        ),
    ]
    running = [row for row in rows if row.throughput is not None]
    for row in running:  # warm-up: allocator, thread pools, lazy initialization
        assert row.throughput is not None
        row.throughput(texts[:64])
    # Interleave finely (each encoder on each slice in turn) so that load from other
    # processes hits every encoder alike; each repeat's time is the sum over its slices.
    slices = [texts[i : i + args.slice] for i in range(0, len(texts), args.slice)]
    for repeat in range(args.repeats):
        totals = dict.fromkeys((row.name for row in running), 0.0)
        for part in slices:
            for row in running:
                assert row.throughput is not None
                totals[row.name] += row.throughput(part)
        for row in running:
            row.seconds.append(totals[row.name])
            print(f"repeat {repeat + 1} {row.name}: {len(texts) / totals[row.name]:.1f} texts/s")
    # Latency runs each encoder on all the queries in a block: interleaved per query, ONNX
    # Runtime's threads of one encoder (in this process or a peer's) spin on after each call
    # and take the cores from the next encoder.
    queries = short_queries(args.eval_dir, args.latency_queries)
    for row in running:
        assert row.latency is not None
        row.latencies = [row.latency(query) for query in queries]
    if not args.skip_ndcg:
        with tempfile.TemporaryDirectory() as tmp:
            folders = {
                name: subset(args.eval_dir / name, 10, Path(tmp) / name)
                if args.smoke
                else args.eval_dir / name
                for name in QUALITY_SETS
            }
            for row in running:
                if row.quality:
                    for name, folder in folders.items():
                        row.ndcg[name] = evaluate_folder(row.encoder, folder)["ndcg@10"]
                        print(f"{row.name} {name} nDCG@10 {100 * row.ndcg[name]:.2f}")
    export_lines = check_export(args, isa, work)
    for row in running:
        if isinstance(row.encoder, Peer):
            row.encoder.close()

    base = len(texts) / statistics.median(rows[0].seconds)
    lines = [
        header("Encoding throughput on CPU (issues 2 and 13)"),
        f"- Model: {args.model.name}; texts: {len(texts)} passages ({args.per_set} "
        f"kuake-qtr-dev, {args.per_set} cmrc2018-dev), batch size {args.batch_size}, "
        f"max_length {args.max_length}, {args.repeats} repeats, each encoder in turn on "
        f"every slice of {args.slice} shuffled texts; {torch.get_num_threads()} torch threads, "
        "ONNX Runtime with as many (fastembed: threads=2)",
        f"- CPU flags: {describe(flags)}; int8 files for {isa}",
        f"- Latency: {args.latency_queries} short kuake-qtr-dev queries, one at a time, each "
        "encoder on all of them in turn",
        *export_lines,
        "",
        "| encoder | median texts/s | ratio vs sentence-transformers fp32 | query p50 ms "
        "| query p95 ms | " + " | ".join(f"nDCG@10 {name}" for name in QUALITY_SETS) + " |",
        "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in QUALITY_SETS) + " |",
    ]
    for row in rows:
        if not row.seconds:
            cells = [row.name, row.reason, *[""] * (3 + len(QUALITY_SETS))]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        speed = len(texts) / statistics.median(row.seconds)
        p50, p95 = np.percentile(np.array(row.latencies) * 1000, [50, 95])
        quality = [f"{100 * row.ndcg[n]:.2f}" if n in row.ndcg else "" for n in QUALITY_SETS]
        lines.append(
            f"| {row.name} | {speed:.1f} | {speed / base:.2f}x | {p50:.1f} | {p95:.1f} | "
            + " | ".join(quality)
            + " |"
        )
    print("\n".join(lines))
    if not args.smoke:
        update_section("encode_throughput", "\n".join(lines))


if __name__ == "__main__":
    main()
