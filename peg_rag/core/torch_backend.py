"""The torch backend that PEGEncoder and Reranker share: load a transformers model for
inference, pad token ids into batches, and run them longest first. ``backend="onnx"``
swaps the model for an ONNX Runtime session (``onnx_backend``); the batching stays.

Length-sorted batches keep padding small: similar lengths share a batch, so little padded
compute is wasted, and the longest batch comes first, so a too-large batch fails at once.
A batch is also cut where the lengths drop sharply (``sorted_batches``): a padded token costs
as much as a real one, so one 512-token passage must not pad a few 60-token ones to 512, as
the server's dynamic batches of unrelated requests would otherwise make it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel

from . import onnx_backend
from .encoding import DTYPES, QUANTIZE
from .onnx_backend import OnnxModel

logger = logging.getLogger("peg_rag")
_DTYPES = dict(zip(DTYPES, (torch.float32, torch.bfloat16, torch.float16), strict=True))
Model = PreTrainedModel | OnnxModel  # what runs the batches, by backend


def default_device() -> torch.device:
    """CUDA, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def as_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype asked for, else bf16 (fp16 without bf16 support) on GPU and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load(
    model_dir: Any,
    auto_class: Any,
    *,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    quantize: str | None,
    trust_remote_code: bool,
    **model_kwargs: Any,
) -> tuple[PreTrainedModel, Any, dict[str, Any]]:
    """Model (``auto_class.from_pretrained``, SDPA attention where supported, in eval mode on
    its device, int8 if asked), tokenizer, and the options that load them again."""
    torch_device = torch.device(device) if device is not None else default_device()
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if quantize and torch_device.type != "cpu":
        raise ValueError("quantize='int8' is a CPU optimization; use dtype on GPU")
    torch_dtype = torch.float32 if quantize else as_dtype(dtype, torch_device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    options = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, **model_kwargs}
    try:
        model = auto_class.from_pretrained(model_dir, attn_implementation="sdpa", **options)
    except ValueError as exc:  # architectures without SDPA support
        if "sdpa" not in str(exc).lower():
            raise
        model = auto_class.from_pretrained(model_dir, **options)
    model.eval().to(torch_device)
    if quantize:
        model = quantize_int8(model)
    return (
        model,
        tokenizer,
        {
            "backend": "torch",
            "device": str(torch_device),
            "dtype": str(torch_dtype).removeprefix("torch."),
            "quantize": quantize,
            "trust_remote_code": trust_remote_code,
        },
    )


def load_model(
    backend: str, model_dir: Any, auto_class: Any, *, quantize: str | None, **options: Any
) -> tuple[Model, Any, dict[str, Any]]:
    """:func:`load` for ``backend="torch"``, ``onnx_backend.load`` for ``"onnx"`` (callers
    check both names first with ``encoding.check_runtime``)."""
    if backend == "onnx":
        return onnx_backend.load(model_dir, auto_class, quantize=quantize, **options)
    return load(model_dir, auto_class, quantize=quantize, **options)


def position_limit(model: Model, tokenizer: Any) -> int:
    """The most tokens the model takes: its position embeddings, or less if the tokenizer says."""
    limit = getattr(model.config, "max_position_embeddings", None) or 512
    if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # these reserve the first positions for padding
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer_limit and tokenizer_limit < 1_000_000:
        limit = min(limit, tokenizer_limit)
    return int(limit)


def quantize_int8(model: PreTrainedModel) -> PreTrainedModel:
    """Dynamic int8 quantization of the Linear layers (CPU)."""
    # fbgemm's VNNI kernels beat the default "x86" engine, which was up to 10x slower on
    # short texts in benchmarks/encode_throughput.py. The engine is process-wide.
    if "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"
    with warnings.catch_warnings():  # torch marks eager dynamic quantization as deprecated
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def collate(
    ids: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
    token_types: Sequence[Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Pad id lists to the longest one (and their token types, for text pairs) on ``device``."""
    width = max(len(row) for row in ids)
    arrays = {
        "input_ids": np.full((len(ids), width), pad_id, dtype=np.int64),
        "attention_mask": np.zeros((len(ids), width), dtype=np.int64),
    }
    if token_types is not None:
        arrays["token_type_ids"] = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        arrays["input_ids"][i, : len(row)] = row
        arrays["attention_mask"][i, : len(row)] = 1
        if token_types is not None:
            arrays["token_type_ids"][i, : len(row)] = token_types[i]
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in arrays.items()}


def warn_truncated(truncated: int, total: int, max_length: int, what: str = "texts") -> None:
    """One warning per call that truncated anything: never silent."""
    if truncated:
        logger.warning(
            "%d of %d %s were longer than max_length=%d tokens and were truncated",
            truncated,
            total,
            what,
            max_length,
        )


# A text joins the batch being formed only if padding it to the batch's longest text wastes
# at most this share of that length, or at most PAD_TOKENS tokens (short texts batch freely:
# for them the per-batch overhead outweighs a few padded tokens).
MAX_PAD_SHARE = 0.2
PAD_TOKENS = 16


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Indices of ``lengths``, longest first, in batches of at most ``batch_size``; a batch
    ends early where the next text would be padded by more than ``MAX_PAD_SHARE`` of the
    batch's longest length and more than ``PAD_TOKENS`` tokens."""
    order = np.argsort([-n for n in lengths], kind="stable")
    batches, start = [], 0
    for end in range(1, len(order) + 1):
        if end < len(order) and end - start < batch_size:
            width, length = lengths[order[start]], lengths[order[end]]
            if width - length <= max(PAD_TOKENS, MAX_PAD_SHARE * width):
                continue
        batches.append(order[start:end])
        start = end
    return batches


def run_sorted(
    model: torch.nn.Module,
    lengths: Sequence[int],
    batch_size: int,
    forward: Callable[[np.ndarray], torch.Tensor],
    out: np.ndarray,
    *,
    desc: str,
    show_progress_bar: bool,
) -> np.ndarray:
    """Fill ``out[index] = forward(index)`` over batches of indices, longest first, in eval
    mode under ``torch.inference_mode`` (the model's training mode is restored after)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batches = sorted_batches(lengths, batch_size)
            for index in tqdm(batches, desc=desc, unit="batch", disable=not show_progress_bar):
                out[index] = forward(index).float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


class TorchModel:
    """What PEGEncoder and Reranker share: a transformers model (or an ONNX Runtime session
    in its place) and its tokenizer, how they were loaded (``name_or_path``,
    ``load_options``: backend, device, dtype, quantize, trust_remote_code) and how texts are
    batched."""

    def __init__(
        self,
        model: Model,
        tokenizer: Any,
        *,
        max_length: int,
        batch_size: int,
        show_progress_bar: bool,
        quantized: bool,
        name_or_path: str,
        load_options: dict[str, Any] | None,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token, so batches cannot be padded")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.show_progress_bar = show_progress_bar
        self.quantized = quantized
        self.name_or_path = name_or_path
        self.load_options = dict(load_options or {})

    @property
    def device(self) -> torch.device:
        return self.model.device

    def save_model(self, directory: str | os.PathLike[str], what: str) -> Path:
        """Write the model and tokenizer to ``directory`` (created); returns it as a Path."""
        if not isinstance(self.model, PreTrainedModel):
            raise ValueError(
                f"a {what} on ONNX Runtime is inference-only and cannot be saved; load it with "
                "backend='torch' to save it, or write its ONNX files with peg-rag export"
            )
        if self.quantized:
            raise ValueError(f"an int8-quantized {what} cannot be saved; save the fp32 model")
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # Encoding leaves its per-call truncation and padding on the fast tokenizer; saved,
            # they would make tools that read tokenizer.json directly cut texts at that length.
            backend.no_truncation()
            backend.no_padding()
        self.tokenizer.save_pretrained(path)
        return path
