"""PEG training: huge-batch contrastive learning with gradient caching and progressive weighting,
and reranker (cross-encoder) training on the same machinery.

from peg_rag.trainer import make_config, train
result = train(make_config(model="TownsWu/PEG", train=["data/"], output_dir="out"))

from peg_rag.trainer import make_reranker_config, train_reranker
result = train_reranker(make_reranker_config(model="BASE", train=["mined/"], output_dir="rr"))

from peg_rag.trainer import merge_models
merge_models(["BASE", "runs/peg/model"], [0.5, 0.5], "merged")  # or weights="auto"

Training layer: may use the core and retrieval layers (evaluation during training), never
the apps or the CLI. ``train`` and ``train_reranker`` need the ``[train]`` extra (accelerate,
tensorboard).
"""

from typing import TYPE_CHECKING

from peg_rag.core.lazy import lazy_exports

if TYPE_CHECKING:
    from .config import ConfigError, TrainConfig, config_from_args, make_config
    from .loop import TrainResult
    from .merge import MergeResult, merge_models
    from .mine import MiningStats, check_output, mine_file
    from .mine_options import MiningOptions
    from .reranker import train_reranker
    from .reranker_config import RerankerConfig, make_reranker_config, reranker_config_from_args
    from .teacher import ScoreStats, score_file, score_lines
    from .train import train

__all__ = [
    "ConfigError",
    "MergeResult",
    "MiningOptions",
    "MiningStats",
    "RerankerConfig",
    "ScoreStats",
    "TrainConfig",
    "TrainResult",
    "check_output",
    "config_from_args",
    "make_config",
    "make_reranker_config",
    "merge_models",
    "mine_file",
    "reranker_config_from_args",
    "score_file",
    "score_lines",
    "train",
    "train_reranker",
]
__getattr__, __dir__ = lazy_exports(
    globals(),
    {
        "ConfigError": ".config",
        "MergeResult": ".merge",
        "MiningOptions": ".mine_options",
        "MiningStats": ".mine",
        "RerankerConfig": ".reranker_config",
        "ScoreStats": ".teacher",
        "TrainConfig": ".config",
        "TrainResult": ".loop",
        "check_output": ".mine",
        "config_from_args": ".config",
        "make_config": ".config",
        "make_reranker_config": ".reranker_config",
        "merge_models": ".merge",
        "mine_file": ".mine",
        "reranker_config_from_args": ".reranker_config",
        "score_file": ".teacher",
        "score_lines": ".teacher",
        "train": ".train",
        "train_reranker": ".reranker",
    },
)
