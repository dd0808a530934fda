"""Write a model folder that ships with its ONNX files (``peg-rag export``).

The folder holds the Hugging Face files, the sentence-transformers settings (pooling,
prompts, max length; ``CrossEncoder``'s for a reranker) and, in sentence-transformers'
layout, ``onnx/model.onnx`` (float32, fused for ONNX Runtime) plus, with int8,
``onnx/model_qint8_<isa>.onnx`` for this CPU. PEGEncoder and Reranker with
``backend="onnx"`` use those files as they are; sentence-transformers loads the folder with
its torch backend, and with ``backend="onnx"`` where optimum is installed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from . import onnx_backend
from .encoder import PEGEncoder
from .encoding import check_runtime
from .files import read_json, swap_dir, temp_sibling, write_json
from .model_files import resolve_model_dir
from .reranker import Reranker

# transformers 5 writes its generic fast tokenizer as "TokenizersBackend", a name that
# transformers 4 (which optimum-onnx, hence sentence-transformers' ONNX backend, pins) does
# not know; both read the older name "PreTrainedTokenizerFast".
_RENAMED_TOKENIZERS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer's class so that transformers 4 and 5 both load it."""
    config = read_json(path)
    if config.get("tokenizer_class") in _RENAMED_TOKENIZERS:
        config["tokenizer_class"] = _RENAMED_TOKENIZERS[config["tokenizer_class"]]
        write_json(path, config, indent=2)


@dataclass
class Export:
    """What ``export_model`` wrote: the kind of model and the ONNX files."""

    kind: str  # "encoder" or "reranker"
    onnx_files: list[Path]


def export_model(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    quantize: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> Export:
    """Write ``model`` (an embedding model, or a cross-encoder: its config's architecture
    says which) to the folder ``output`` with its ONNX files; see the module docstring.

    The folder is written under a temporary name and renamed into place, so an interrupted
    export leaves no half folder. An existing non-empty ``output`` is replaced only with
    ``overwrite=True``.
    """
    check_runtime("onnx", quantize)
    target = Path(output)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{target} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )
    model_dir = resolve_model_dir(model)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    architectures = config.architectures or []
    is_reranker = any(a.endswith("ForSequenceClassification") for a in architectures)
    loader = Reranker if is_reranker else PEGEncoder
    loaded = loader.from_pretrained(
        model_dir, device="cpu", dtype="float32", trust_remote_code=trust_remote_code
    )
    tmp = temp_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        loaded.save_pretrained(tmp)
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
        written = onnx_backend.build_files(
            tmp,
            AutoModelForSequenceClassification if is_reranker else AutoModel,
            AutoConfig.from_pretrained(tmp, trust_remote_code=trust_remote_code),
            tmp / onnx_backend.ONNX_DIR,
            quantize=quantize,
            trust_remote_code=trust_remote_code,
        )
        swap_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Export(
        "reranker" if is_reranker else "encoder",
        [target / onnx_backend.ONNX_DIR / path.name for path in written],
    )
