"""PEG training: huge-batch contrastive learning with gradient caching and progressive weighting.

from peg_rag.trainer import make_config, train
result = train(make_config(model="TownsWu/PEG", train=["data/"], output_dir="out"))
"""

from .config import ConfigError, TrainConfig, config_from_args, make_config
from .train import TrainResult, train

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "config_from_args", "make_config", "train"]
