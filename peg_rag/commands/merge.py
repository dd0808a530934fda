"""``peg-rag merge``: average the weights of embedding models (LM-Cocktail style)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from peg_rag import trainer
from peg_rag.core.encoding import DEFAULT_BATCH_SIZE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge embedding models by a weighted average of their weights",
        description="Write to DIR the model whose every floating-point tensor is the weighted "
        "average of the MODELs' (at least two, e.g. a base model and its fine-tuned version, "
        "as LM-Cocktail merges them). The models must share architecture, tensor shapes and "
        "tokenizer; DIR gets the first model's config, tokenizer, pooling and prompts. "
        "--weights takes one number >= 0 per model, divided by their sum, or 'auto': try "
        "weights in steps of 0.1 (a greedy climb for four or more models) and keep those with "
        "the best mean --metric of dense retrieval on the --validation BEIR folders.",
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help="hub id or model directory")
    parser.add_argument(
        "--weights",
        nargs="+",
        required=True,
        metavar="W",
        help="one weight per model (e.g. 0.3 0.7), or 'auto'",
    )
    parser.add_argument("--output", type=Path, required=True, metavar="DIR")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")
    search = parser.add_argument_group("--weights auto")
    search.add_argument("--validation", nargs="+", default=[], metavar="DIR", help="BEIR folders")
    search.add_argument(
        "--metric", default="ndcg@10", help="ndcg@10, mrr@10, recall@10 or recall@100"
    )
    search.add_argument(
        "--max-queries",
        type=int,
        default=50,
        metavar="N",
        help="judged queries per folder, a seeded sample (0: all)",
    )
    search.add_argument(
        "--max-distractors",
        type=int,
        metavar="N",
        help="passages per folder not judged relevant to those queries, a seeded sample "
        "(default: all); the corpus is encoded for every candidate, so this bounds the time",
    )
    search.add_argument("--seed", type=int, default=0, help="of the samples")
    search.add_argument(
        "--max-length", type=int, help="max tokens per text (default: the first model's)"
    )
    search.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    search.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.set_defaults(run=run)


def _weights(values: list[str]) -> list[float] | Literal["auto"]:
    if values == ["auto"]:
        return "auto"
    try:
        return [float(value) for value in values]
    except ValueError:
        raise ValueError(f"--weights takes numbers or 'auto', got {' '.join(values)}") from None


def run(args: argparse.Namespace) -> int:
    result = trainer.merge_models(
        args.models,
        _weights(args.weights),
        args.output,
        validation=args.validation,
        metric=args.metric,
        max_queries=args.max_queries or None,
        max_distractors=args.max_distractors,
        seed=args.seed,
        max_length=args.max_length,
        device=args.device,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        show_progress_bar=True,
    )
    if result.metric:
        print(result.table(), end="")
    weights = ", ".join(
        f"{w:.4g} {model}" for w, model in zip(result.weights, result.models, strict=True)
    )
    took = f"{result.seconds:.1f} s"
    if result.metric:  # the search's share is mostly evaluation: encoding every candidate
        took += f", of which {result.search_seconds:.1f} s scoring {len(result.scores)} candidates"
    print(f"wrote {result.output}: {weights} ({took})")
    return 0
