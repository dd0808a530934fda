"""Training step time: our cached step vs sentence-transformers' CachedMultipleNegativesRankingLoss.

Both train the same small BERT (4 layers, hidden 256, me5-small-zh tokenizer) on the same real
batches (one shared training source, 1 positive + N hard negatives per query) with the same
global batch, mini-batch, max length, temperature and AdamW. One step = loss + backward +
clipping + optimizer step; tokenization is excluded for both (our trainer does it in a
background thread, sentence-transformers in its data collator). Runs are interleaved
(A B A B ..., order alternating) and the median ratio is reported. A second comparison puts
our cached step against a plain uncached step (sentence-transformers'
MultipleNegativesRankingLoss) at a batch both can hold.

    flock /tmp/peg-cpu.lock python benchmarks/train_step_time.py
    python benchmarks/train_step_time.py --device cuda --batch-size 4096 --mini-batch-size 256 \
        --plain-batch-size 256 --max-length 256       # on a GPU: bf16 autocast for both
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results_file import header, update_section
from train_common import autocast_forward, real_batches, small_bert


def make_ours(model_dir: Path, args, device: torch.device):
    from peg_rag.core.encoder import PEGEncoder
    from peg_rag.trainer.collate import build_inputs
    from peg_rag.trainer.progressive import focal
    from peg_rag.trainer.step import ContrastiveStep

    encoder = PEGEncoder.from_pretrained(
        model_dir, dtype="float32", device=device, max_length=args.max_length
    )
    encoder.model.train()
    if args.bf16:
        autocast_forward(encoder.model, device)
    step = ContrastiveStep(
        encoder,
        mini_batch_size=args.mini_batch_size,
        temperature=args.temperature,
        chunk_size=args.chunk_size,
        weighting=focal,
    )
    optimizer = torch.optim.AdamW(encoder.model.parameters(), lr=1e-5)

    def prepare(batch):
        return build_inputs(batch, encoder.tokenize)

    def run(inputs) -> None:
        optimizer.zero_grad(set_to_none=True)
        step(inputs, gamma=1.0)
        torch.nn.utils.clip_grad_norm_(encoder.model.parameters(), 1.0)
        optimizer.step()

    return prepare, run


def make_peer(model_dir: Path, args, device: torch.device, cached: bool):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    model = SentenceTransformer(str(model_dir), device=str(device))
    model.max_seq_length = args.max_length
    model.train()
    if args.bf16:
        autocast_forward(model[0].auto_model, device)
    scale = 1.0 / args.temperature
    if cached:
        loss = CachedMultipleNegativesRankingLoss(
            model, scale=scale, mini_batch_size=args.mini_batch_size
        )
    else:
        loss = MultipleNegativesRankingLoss(model, scale=scale)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def prepare(batch):
        columns = [batch.queries, batch.positives] + [
            list(c) for c in zip(*batch.negatives, strict=True)
        ]
        return [
            {k: v.to(device) if torch.is_tensor(v) else v for k, v in model.preprocess(c).items()}
            for c in columns
        ]

    def run(features) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(features, None).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return prepare, run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(runners: dict, batches: list, device: torch.device, repeats: int) -> dict:
    """Median seconds per step of each runner, interleaved, after one warm-up step each.

    On CPU the clock is this process's CPU time, which other jobs on a shared machine barely
    disturb (wall time is printed too); on GPU it is wall time after synchronizing.
    """
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    prepared = {name: [prepare(b) for b in batches] for name, (prepare, _) in runners.items()}
    for name, (_, run) in runners.items():
        run(prepared[name][0])
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            inputs = prepared[name][1 + repeat % (len(batches) - 1)]
            synchronize(device)
            start, wall = clock(), time.perf_counter()
            runners[name][1](inputs)
            synchronize(device)
            seconds[name].append(clock() - start)
            print(
                f"repeat {repeat + 1} {name}: {seconds[name][-1]:.2f} s "
                f"(wall {time.perf_counter() - wall:.2f} s)",
                flush=True,
            )
    return {name: statistics.median(s) for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sources",
        nargs="+",
        default=["drcd", "kuake-qtr"],
        help="shared training sources (long and short texts)",
    )
    parser.add_argument("--batch-size", type=int, default=128, help="queries per global batch")
    parser.add_argument("--mini-batch-size", type=int, default=32)
    parser.add_argument("--plain-batch-size", type=int, default=32)
    parser.add_argument("--hard-negatives", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.02)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-dir", type=Path, help="where the small BERT is cached")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.bf16 = device.type == "cuda"
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model_dir = small_bert(
        args.model_dir or Path(tempfile.gettempdir()) / "peg-rag-bench-bert-4x256",
        max_length=args.max_length,
    )
    texts = 2 + args.hard_negatives
    rows = []
    comparisons = [  # (peer, cached peer?, queries, mini-batch label, seed of the batches)
        ("ST CachedMultipleNegativesRankingLoss", True, args.batch_size, args.mini_batch_size, 0),
        (
            "ST MultipleNegativesRankingLoss (plain, uncached)",
            False,
            args.plain_batch_size,
            f"{args.mini_batch_size} / none",
            1,
        ),
    ]
    for source in args.sources:
        for peer, cached, queries, mini, seed in comparisons:
            batches = real_batches(source, 3, queries, args.hard_negatives, seed=seed)
            runners = {
                "ours": make_ours(model_dir, args, device),
                "peer": make_peer(model_dir, args, device, cached=cached),
            }
            rows.append(
                (source, peer, queries, mini, compare(runners, batches, device, args.repeats))
            )

    clock = "wall seconds" if device.type == "cuda" else "CPU seconds"
    lines = [
        header("Training engine (issue 3): step time"),
        f"- Model: random BERT, 4 layers x hidden 256, me5-small-zh tokenizer; device "
        f"{device.type}{' (bf16 autocast)' if args.bf16 else ' (fp32)'}, "
        f"{torch.get_num_threads()} torch threads; times are median {clock} per step",
        f"- Data: shared training sources, 1 positive + {args.hard_negatives} hard negatives "
        f"per query, max_length {args.max_length}, tau {args.temperature}, {args.repeats} "
        "interleaved repeats; one step = loss + backward + clip + AdamW, same texts for both",
        "",
        "| source | peer | global batch: queries (texts) | mini-batch (ours / peer) | "
        "ours s | peer s | ours / peer |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for source, peer, queries, mini, t in rows:
        lines.append(
            f"| {source} | {peer} | {queries} ({queries * texts}) | {mini} | {t['ours']:.2f} | "
            f"{t['peer']:.2f} | {t['ours'] / t['peer']:.2f}x |"
        )
    worst = {
        peer: max(t["ours"] / t["peer"] for _, p, _, _, t in rows if p == peer)
        for peer in {row[1] for row in rows}
    }
    lines += [
        "",
        "Worst ratio over the sources: "
        + "; ".join(f"vs {peer}: {ratio:.2f}x" for peer, ratio in sorted(worst.items()))
        + " (goals: <= 1.0 against the cached peer, <= 1.4 against the plain step).",
    ]
    key = "train_step_time" + ("_gpu" if device.type == "cuda" else "")
    update_section(key, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
