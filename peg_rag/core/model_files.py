"""Find a model directory and read/write its sentence-transformers settings.

PEGEncoder takes its defaults (pooling, prompts, max length, normalization) from the
files sentence-transformers writes next to a Hugging Face model, so a model saved by
either library loads the same way in the other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download

from .files import read_json, write_json

# Files worth fetching from the hub: configs, tokenizer, weights and ST module configs.
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "1_Pooling/*"]


class ModelNotFoundError(OSError):
    """Raised when a model name is neither a local directory nor a reachable hub repo."""


@dataclass
class STSettings:
    """Settings found in sentence-transformers files; None where a file says nothing."""

    pooling: str | None = None
    normalize: bool | None = None
    query_prompt: str | None = None
    passage_prompt: str | None = None
    max_length: int | None = None


def resolve_model_dir(name_or_path: str | os.PathLike[str]) -> Path:
    """Return a local directory holding the model: the path itself, or a hub snapshot.

    Raises ModelNotFoundError that names both places it tried.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a directory but has no config.json, so it is not a Hugging Face model"
            )
        return path
    name = str(name_or_path)
    try:
        local = Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))
        if not any(local.glob("*.safetensors")):  # older repos ship only PyTorch weights
            local = Path(snapshot_download(name, allow_patterns=["pytorch_model.bin"]))
    except Exception as exc:  # hub errors come in many classes; all mean "not available"
        raise ModelNotFoundError(
            f"cannot load model {name!r}: tried the local directory {path.resolve()} "
            f"(does not exist) and the Hugging Face Hub repo id {name!r} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ) from exc
    return local


def model_name(name_or_path: str | os.PathLike[str]) -> str:
    """How to name a model so that it loads again: a local directory's absolute path, else
    the hub id as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name_or_path)


def read_st_settings(model_dir: Path) -> STSettings:
    """Read pooling, normalization, prompts and max length from sentence-transformers files."""
    found = STSettings()
    modules_file = model_dir / "modules.json"
    if modules_file.is_file():
        modules = read_json(modules_file)
        types = [m.get("type", "") for m in modules]
        found.normalize = any(t.endswith("Normalize") for t in types)
        for module in modules:
            if module.get("type", "").endswith("Pooling"):
                found.pooling = _pooling_from_config(model_dir / module["path"] / "config.json")
    st_config = model_dir / "config_sentence_transformers.json"
    if st_config.is_file():
        prompts = read_json(st_config).get("prompts") or {}
        found.query_prompt = prompts.get("query")
        found.passage_prompt = prompts.get("passage", prompts.get("document"))
    bert_config = model_dir / "sentence_bert_config.json"
    if bert_config.is_file():
        found.max_length = read_json(bert_config).get("max_seq_length")
    return found


def _pooling_from_config(path: Path) -> str:
    config = read_json(path)
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode") and v)
    raise ValueError(f"{path}: pooling {modes} is not supported; PEGEncoder supports cls and mean")


def write_st_settings(model_dir: Path, dim: int, settings: STSettings) -> None:
    """Write the files sentence-transformers needs to load model_dir with these settings."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if settings.normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
        (model_dir / "2_Normalize").mkdir(exist_ok=True)
    pooling_dir = model_dir / "1_Pooling"
    pooling_dir.mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": settings.pooling == "cls",
        "pooling_mode_mean_tokens": settings.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    prompts = {}
    if settings.query_prompt:
        prompts["query"] = settings.query_prompt
    if settings.passage_prompt:
        prompts["passage"] = settings.passage_prompt
    files = {
        model_dir / "modules.json": modules,
        pooling_dir / "config.json": pooling,
        model_dir / "config_sentence_transformers.json": {
            "prompts": prompts,
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
        model_dir / "sentence_bert_config.json": {
            "max_seq_length": settings.max_length,
            "do_lower_case": False,
        },
    }
    for path, content in files.items():
        write_json(path, content, indent=2)
