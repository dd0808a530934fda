"""PEG training: huge-batch contrastive learning with gradient caching and progressive weighting.

from peg_rag.trainer import make_config, train
result = train(make_config(model="TownsWu/PEG", train=["data/"], output_dir="out"))

Training layer: may use the core and retrieval layers (evaluation during training), never
the apps or the CLI. ``train`` needs the ``[train]`` extra (accelerate, tensorboard).
"""

from typing import TYPE_CHECKING

from peg_rag.core.lazy import lazy_exports

if TYPE_CHECKING:
    from .config import ConfigError, TrainConfig, config_from_args, make_config
    from .mine import MiningStats, check_output, mine_file
    from .mine_options import MiningOptions
    from .train import TrainResult, train

__all__ = [
    "ConfigError",
    "MiningOptions",
    "MiningStats",
    "TrainConfig",
    "TrainResult",
    "check_output",
    "config_from_args",
    "make_config",
    "mine_file",
    "train",
]
__getattr__, __dir__ = lazy_exports(
    globals(),
    {
        "ConfigError": ".config",
        "MiningOptions": ".mine_options",
        "MiningStats": ".mine",
        "TrainConfig": ".config",
        "TrainResult": ".train",
        "check_output": ".mine",
        "config_from_args": ".config",
        "make_config": ".config",
        "mine_file": ".mine",
        "train": ".train",
    },
)
