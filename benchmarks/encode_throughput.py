"""PEGEncoder vs sentence-transformers: encoding throughput on the same model and texts.

Runs interleaved (A B A B ...) in one process on the same 2,000 Chinese passages, with the
same batch size and max length in fp32, and reports median texts/s and the ratio. Also
measures quantize="int8" and its nDCG@10 on kuake-qtr-dev against fp32.

    python benchmarks/encode_throughput.py --model ../shared/models/me5-small-zh
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import statistics
import time
from pathlib import Path

import torch
from results_file import header, update_section

REPO = Path(__file__).resolve().parents[1]


def passages(eval_dir: Path, per_set: int) -> list[str]:
    """The first ``per_set`` documents of kuake-qtr-dev (short) and cmrc2018-dev (long)."""
    texts = []
    for name in ("kuake-qtr-dev", "cmrc2018-dev"):
        with open(eval_dir / name / "corpus.jsonl", encoding="utf-8") as handle:
            for line in itertools.islice(handle, per_set):
                record = json.loads(line)
                texts.append(f"{record.get('title', '')} {record['text']}".strip())
    return texts


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO.parent / "shared/models/me5-small-zh"))
    parser.add_argument("--eval-dir", default=str(REPO.parent / "shared/data/eval"), type=Path)
    parser.add_argument("--per-set", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slice", type=int, default=250, help="texts per interleaved slice")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--skip-ndcg", action="store_true", help="throughput only")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    from peg_rag import PEGEncoder

    logging.getLogger("peg_rag").setLevel(logging.ERROR)  # truncation is expected here
    texts = passages(args.eval_dir, args.per_set)
    random.Random(0).shuffle(texts)  # every slice mixes short and long texts
    ours = PEGEncoder.from_pretrained(args.model, device="cpu", max_length=args.max_length)
    int8 = PEGEncoder.from_pretrained(
        args.model, device="cpu", max_length=args.max_length, quantize="int8"
    )
    peer = SentenceTransformer(args.model, device="cpu")
    peer.max_seq_length = args.max_length
    runs = {
        "sentence-transformers": lambda part: peer.encode(
            part, batch_size=args.batch_size, prompt_name="passage", normalize_embeddings=True
        ),
        "PEGEncoder fp32": lambda part: ours.encode_passages(part, batch_size=args.batch_size),
        "PEGEncoder int8": lambda part: int8.encode_passages(part, batch_size=args.batch_size),
    }
    # Warm-up: allocator, thread pools and lazy initialization.
    ours.encode_passages(texts[:64]), int8.encode_passages(texts[:64])
    peer.encode(texts[:64], prompt_name="passage")
    # Interleave finely (A B C on each slice of texts) so that load from other processes
    # hits every encoder alike; each repeat's time is the sum over its slices.
    slices = [texts[i : i + args.slice] for i in range(0, len(texts), args.slice)]
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        totals = dict.fromkeys(runs, 0.0)
        for part in slices:
            for name, fn in runs.items():
                totals[name] += timed(fn, part)
        for name, total in totals.items():
            seconds[name].append(total)
            print(f"repeat {repeat + 1} {name}: {len(texts) / total:.1f} texts/s", flush=True)
    speed = {name: len(texts) / statistics.median(s) for name, s in seconds.items()}
    base = speed["sentence-transformers"]

    lines = [
        header("Encoding throughput (issue 2)"),
        f"- Texts: {len(texts)} passages ({args.per_set} from kuake-qtr-dev, {args.per_set} from "
        f"cmrc2018-dev), batch size {args.batch_size}, max_length {args.max_length}, fp32 "
        f"unless noted, {args.repeats} repeats, each encoder run in turn on every slice of "
        f"{args.slice} shuffled texts, {torch.get_num_threads()} torch threads\n",
        "| encoder | median texts/s | ratio vs sentence-transformers |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {s:.1f} | {s / base:.2f}x |" for name, s in speed.items()]
    if not args.skip_ndcg:
        from peg_rag.retrieval.evaluate import evaluate_folder

        folder = args.eval_dir / "kuake-qtr-dev"
        quality = {"fp32": evaluate_folder(ours, folder), "int8": evaluate_folder(int8, folder)}
        lines += [
            "",
            "nDCG@10 on kuake-qtr-dev (dense, full corpus):",
            "",
            "| encoder | nDCG@10 |",
            "| --- | ---: |",
        ]
        lines += [f"| PEGEncoder {k} | {100 * v['ndcg@10']:.2f} |" for k, v in quality.items()]
    update_section("encode_throughput", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
