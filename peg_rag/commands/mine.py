"""``peg-rag mine``: fill the ``neg`` lists of a training JSONL with mined hard negatives."""

from __future__ import annotations

import argparse
from pathlib import Path

from peg_rag import trainer
from peg_rag.trainer.mine_options import MiningOptions

from .common import add_encoder_arguments, load_encoder, load_reranker

DEFAULTS = MiningOptions()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "mine",
        help="mine hard negatives into a training JSONL",
        description="Encode each line's query and a candidate pool, search the pool exactly, "
        "and write a copy of INPUT whose 'neg' lists hold --negatives texts sampled from ranks "
        "[--range-min, --range-max) (counted from 0). Candidates equal to the query or a "
        "known positive of it (of any line with the same query text), and candidates "
        "scoring above --max-score-ratio x the line's lowest "
        "positive score, are skipped. With --reranker, sampled candidates that the reranker "
        "judges relevant are dropped and replaced by further samples. Other fields are kept, "
        "except teacher scores (pos_scores, neg_scores), which no longer match the new 'neg' "
        "lists.",
    )
    parser.add_argument("input", type=Path, metavar="INPUT.jsonl")
    parser.add_argument("--output", type=Path, required=True, metavar="OUT.jsonl")
    parser.add_argument(
        "--corpus",
        type=Path,
        nargs="+",
        default=[],
        metavar="PATH",
        help="candidate pool: JSONL files with 'text' (and optional 'title') or BEIR folders "
        "(default: the input's own positive and negative texts)",
    )
    parser.add_argument(
        "--negatives", type=int, default=DEFAULTS.negatives, help="negatives per line"
    )
    parser.add_argument(
        "--range-min", type=int, default=DEFAULTS.range_min, help="first rank sampled"
    )
    parser.add_argument(
        "--range-max", type=int, default=DEFAULTS.range_max, help="rank after the last one"
    )
    parser.add_argument(
        "--max-score-ratio",
        type=float,
        default=DEFAULTS.max_score_ratio,
        help="skip candidates scoring above this times the positive's score",
    )
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    add_encoder_arguments(parser)
    group = parser.add_argument_group(
        "reranker guard",
        "sigmoid scores of the sampled candidates; the reranker runs with the encoder's "
        "--backend, --device, --dtype, --quantize and --batch-size",
    )
    group.add_argument(
        "--reranker", metavar="MODEL", help="cross-encoder that vets each sampled candidate"
    )
    rule = group.add_mutually_exclusive_group()
    rule.add_argument(
        "--reranker-threshold",
        type=float,
        metavar="T",
        help="drop candidates with sigmoid(score) >= T",
    )
    rule.add_argument(
        "--reranker-margin",
        type=float,
        metavar="M",
        help="drop candidates with sigmoid(score) > sigmoid(lowest positive's score) - M "
        "(the default rule, with M = 0)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = MiningOptions(
        negatives=args.negatives,
        range_min=args.range_min,
        range_max=args.range_max,
        max_score_ratio=args.max_score_ratio,
        seed=args.seed,
        reranker_threshold=args.reranker_threshold,
        reranker_margin=args.reranker_margin,
    )
    if options.reranker_rule_set and not args.reranker:
        raise ValueError("--reranker-threshold and --reranker-margin need --reranker")
    trainer.check_output(
        args.input, args.output, overwrite=args.overwrite
    )  # before the model loads
    stats = trainer.mine_file(
        load_encoder(args),
        args.input,
        args.output,
        corpus=args.corpus,
        options=options,
        reranker=load_reranker(args),
        overwrite=args.overwrite,
        show_progress_bar=True,
    )
    print(f"wrote {args.output}: {stats.summary()}")
    return 0
