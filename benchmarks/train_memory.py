"""Peak memory of one training step against the number of in-batch negatives.

One full step (gradient-cache step + clipping + AdamW) of a small BERT (4 layers, hidden 256,
me5-small-zh tokenizer) on a batch of pairwise-distinct real Chinese texts (see
train_common.distinct_batch), 1 positive + 5 hard negatives per query, at a fixed
mini-batch. Each size runs in its own process, so each peak is its own. The goal: activation
memory stays flat (it depends on the mini-batch only) and growth comes from the O(N x d)
embedding cache and the (chunk x candidates) logits buffer.

    flock /tmp/peg-cpu.lock python benchmarks/train_memory.py
    python benchmarks/train_memory.py --device cuda --mini-batch-size 256   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from results_file import header, update_section
from train_common import autocast_forward, distinct_batch, peak_rss_gib, rss_gib, small_bert


def child(args, negatives: int) -> dict:
    """Run one step at ``negatives`` in-batch negatives; report memory and time."""
    from peg_rag.core.encoder import PEGEncoder
    from peg_rag.trainer.collate import build_inputs
    from peg_rag.trainer.progressive import focal
    from peg_rag.trainer.step import ContrastiveStep

    device = torch.device(args.device)
    queries = math.ceil(negatives / (1 + args.hard_negatives))
    encoder = PEGEncoder.from_pretrained(
        args.model_dir, dtype="float32", device=device, max_length=args.max_length
    )
    encoder.model.train()
    if device.type == "cuda":
        autocast_forward(encoder.model, device)
    optimizer = torch.optim.AdamW(encoder.model.parameters(), lr=1e-5)
    batch = distinct_batch(queries, args.hard_negatives)
    inputs = build_inputs(batch, encoder.tokenize)
    step = ContrastiveStep(
        encoder,
        mini_batch_size=args.mini_batch_size,
        temperature=0.02,
        chunk_size=args.chunk_size,
        weighting=focal,
    )
    before = rss_gib()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    stats = step(inputs, gamma=1.0)
    torch.nn.utils.clip_grad_norm_(encoder.model.parameters(), 1.0)
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "negatives": negatives,
        "queries": queries,
        "candidates": int(len(inputs.column_rows)),
        "texts": inputs.n_texts,
        "distinct": len(inputs.ids),
        "tokens": sum(len(r) for r in inputs.ids),
        "rss_before_gib": before,
        "peak_rss_gib": peak_rss_gib(),
        "cuda_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "embedding_cache_mib": len(inputs.ids) * encoder.dim * 4 / 2**20,
        # Gradients plus AdamW's two moments, allocated by the first step whatever the batch.
        "grads_and_adam_mib": 3 * sum(p.numel() for p in encoder.model.parameters()) * 4 / 2**20,
        "logits_chunk_mib": min(args.chunk_size, queries) * len(inputs.column_rows) * 4 / 2**20,
        "seconds": seconds,
        "loss": stats.loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--negatives", type=int, nargs="+", default=[1000, 10000, 80000])
    parser.add_argument("--hard-negatives", type=int, default=5)
    parser.add_argument("--mini-batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    args.model_dir = small_bert(
        args.model_dir or Path(tempfile.gettempdir()) / "peg-rag-bench-bert-4x256",
        max_length=args.max_length,
    )
    if args.child:
        print(json.dumps(child(args, args.negatives[0])))
        return

    # glibc keeps freed activation buffers in its heap once its dynamic mmap threshold has
    # grown, which RSS counts. A fixed threshold (an environment variable) shows how much of
    # the growth is that rather than memory the step holds.
    allocators = {"default": {}, "mmap 128 KiB": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
    if args.device != "cpu":
        allocators = {"default": {}}
    rows = []
    for negatives in args.negatives:
        command = [sys.executable, __file__, "--child", "--negatives", str(negatives)] + [
            f"--{k}={v}"
            for k, v in (
                ("hard-negatives", args.hard_negatives),
                ("mini-batch-size", args.mini_batch_size),
                ("chunk-size", args.chunk_size),
                ("max-length", args.max_length),
                ("device", args.device),
                ("model-dir", args.model_dir),
                ("threads", args.threads),
            )
        ]
        for allocator, env in allocators.items():
            out = subprocess.run(
                command, capture_output=True, text=True, check=True, env={**os.environ, **env}
            ).stdout
            rows.append({**json.loads(out.strip().splitlines()[-1]), "allocator": allocator})
            print(rows[-1], flush=True)

    gpu = args.device.startswith("cuda")
    lines = [
        header("Training engine (issue 3): peak memory vs in-batch negatives"),
        f"- Model: random BERT, 4 layers x hidden 256, me5-small-zh tokenizer, "
        f"{'bf16 autocast on ' + args.device if gpu else 'fp32 on CPU'}; "
        f"{torch.get_num_threads()} torch threads",
        f"- One step (gradient cache + clip + AdamW) on pairwise-distinct real Chinese texts "
        "(training queries/positives and eval corpora, paired arbitrarily), 1 positive "
        f"+ {args.hard_negatives} hard negatives per query, mini-batch {args.mini_batch_size} "
        f"texts, max_length {args.max_length}, loss chunk {args.chunk_size} queries",
        "- RSS before: process memory with model, optimizer and the tokenized batch; peak: "
        "maximum RSS during the step (VmHWM reset before it)",
        "",
        "| in-batch negatives (distinct) | queries | texts (distinct) | malloc | RSS before GiB | "
        "peak RSS GiB | "
        "step growth GiB | embedding cache MiB | logits chunk MiB |"
        + (" CUDA peak GiB |" if gpu else "")
        + " step s |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"
        + (" ---: |" if gpu else "")
        + " ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['queries'] * (1 + args.hard_negatives):,} ({r['candidates']:,}) | "
            f"{r['queries']:,} | {r['texts']:,} ({r['distinct']:,}) | {r['allocator']} | "
            f"{r['rss_before_gib']:.2f} | {r['peak_rss_gib']:.2f} | "
            f"{r['peak_rss_gib'] - r['rss_before_gib']:.2f} | {r['embedding_cache_mib']:.0f} | "
            f"{r['logits_chunk_mib']:.0f} |"
            + (f" {r['cuda_peak_gib']:.2f} |" if gpu else "")
            + f" {r['seconds']:.0f} |"
        )
    default = [r for r in rows if r["allocator"] == "default"]
    growth = [r["peak_rss_gib"] - r["rss_before_gib"] for r in default]
    lines += [
        "",
        f"Peak RSS of the largest step: {max(r['peak_rss_gib'] for r in default):.2f} GiB (goal "
        "for 80,000 negatives on this machine: under 8 GiB). Step growth from the smallest to "
        f"the largest batch: {growth[0]:.2f} -> {growth[-1]:.2f} GiB for "
        f"{default[-1]['distinct'] / default[0]['distinct']:.0f}x the texts. The growth includes "
        f"{default[0]['grads_and_adam_mib']:.0f} MiB of gradients and AdamW state (first step), "
        "and, with glibc's default malloc, freed activation buffers it keeps (compare the "
        "'mmap 128 KiB' rows).",
    ]
    update_section("train_memory" + ("_gpu" if gpu else ""), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
