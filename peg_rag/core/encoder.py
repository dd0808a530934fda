"""PEGEncoder: turn text into L2-normalized vectors with any BERT-style embedding model."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedModel

from .deprecation import renamed, warn_renamed
from .encoding import DEFAULT_BATCH_SIZE, DTYPES, POOLING_MODES, Kind, check_texts
from .model_files import (
    STSettings,
    model_name,
    read_st_settings,
    resolve_model_dir,
    write_st_settings,
)

logger = logging.getLogger("peg_rag")
_DTYPES = dict(zip(DTYPES, (torch.float32, torch.bfloat16, torch.float16), strict=True))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states (batch, seq, dim) into one vector per text: [CLS] or masked mean."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _as_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return _default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


class PEGEncoder:
    """Encode queries and passages with a BERT-style model into normalized float32 vectors.

    Build one with :meth:`from_pretrained`. Pooling, prompts, normalization and max length
    default to what the model's sentence-transformers files say, else [CLS] pooling, no
    prompts, normalized vectors and the model's position limit.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer,
        *,
        pooling: str = "cls",
        normalize: bool = True,
        query_prompt: str | None = None,
        passage_prompt: str | None = None,
        max_length: int = 512,
        batch_size: int = DEFAULT_BATCH_SIZE,
        show_progress_bar: bool = False,
        quantized: bool = False,
        name_or_path: str = "",
        load_options: dict[str, Any] | None = None,
        query_instruction: str | None = None,
        passage_instruction: str | None = None,
    ) -> None:
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token, so batches cannot be padded")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.query_prompt = renamed(
            "query_instruction", "query_prompt", query_instruction, query_prompt
        )
        self.passage_prompt = renamed(
            "passage_instruction", "passage_prompt", passage_instruction, passage_prompt
        )
        self.max_length = max_length
        self.batch_size = batch_size
        self.show_progress_bar = show_progress_bar
        self.quantized = quantized
        self.name_or_path = name_or_path
        self.load_options = dict(load_options or {})

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        query_prompt: str | None = None,
        passage_prompt: str | None = None,
        max_length: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        trust_remote_code: bool = False,
        quantize: Literal["int8"] | None = None,
        show_progress_bar: bool = False,
        query_instruction: str | None = None,
        passage_instruction: str | None = None,
    ) -> PEGEncoder:
        """Load a model from a hub id (``TownsWu/PEG``) or a local directory.

        Explicit arguments win over the sentence-transformers files; ``normalize=None``
        means "as the files say, else True". ``dtype`` defaults to bf16 (fp16 without bf16
        support) on GPU and fp32 elsewhere. ``quantize="int8"`` applies dynamic int8
        quantization to the Linear layers, on CPU only. ``query_instruction`` and
        ``passage_instruction`` are deprecated names of the prompts.
        """
        query_prompt = renamed("query_instruction", "query_prompt", query_instruction, query_prompt)
        passage_prompt = renamed(
            "passage_instruction", "passage_prompt", passage_instruction, passage_prompt
        )
        model_dir = resolve_model_dir(name_or_path)
        found = read_st_settings(model_dir)
        torch_device = torch.device(device) if device is not None else _default_device()
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        if quantize and torch_device.type != "cpu":
            raise ValueError("quantize='int8' is a CPU optimization; use dtype on GPU")
        torch_dtype = torch.float32 if quantize else _as_dtype(dtype, torch_device)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        try:
            model = AutoModel.from_pretrained(
                model_dir,
                dtype=torch_dtype,
                attn_implementation="sdpa",
                trust_remote_code=trust_remote_code,
            )
        except ValueError as exc:  # architectures without SDPA support
            if "sdpa" not in str(exc).lower():
                raise
            model = AutoModel.from_pretrained(
                model_dir, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
        model.eval().to(torch_device)
        if quantize:
            model = _quantize_int8(model)
        limit = _position_limit(model, tokenizer)
        length = max_length or min(found.max_length or limit, limit)
        if length > limit:
            raise ValueError(f"max_length={length} exceeds the model's limit of {limit} tokens")
        return cls(
            model,
            tokenizer,
            pooling=pooling or found.pooling or "cls",
            normalize=normalize if normalize is not None else found.normalize is not False,
            query_prompt=query_prompt if query_prompt is not None else found.query_prompt,
            passage_prompt=passage_prompt if passage_prompt is not None else found.passage_prompt,
            max_length=length,
            batch_size=batch_size,
            show_progress_bar=show_progress_bar,
            quantized=quantize is not None,
            name_or_path=model_name(name_or_path),
            load_options={
                "device": str(torch_device),
                "dtype": str(torch_dtype).removeprefix("torch."),
                "quantize": quantize,
                "trust_remote_code": trust_remote_code,
            },
        )

    @property
    def dim(self) -> int:
        """Size of the vectors this encoder returns."""
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt(self, kind: Kind | None) -> str:
        """The prefix added to texts of this kind ('' for None)."""
        if kind is None:
            return ""
        if kind == "query":
            return self.query_prompt or ""
        if kind == "passage":
            return self.passage_prompt or ""
        raise ValueError(f"kind must be 'query', 'passage' or None, got {kind!r}")

    # Deprecated names (peg-rag 0.1) of the prompts.
    @property
    def query_instruction(self) -> str | None:
        warn_renamed("query_instruction", "query_prompt")
        return self.query_prompt

    @property
    def passage_instruction(self) -> str | None:
        warn_renamed("passage_instruction", "passage_prompt")
        return self.passage_prompt

    def instruction(self, kind: Kind | None) -> str:
        warn_renamed("instruction", "prompt")
        return self.prompt(kind)

    def tokenize(
        self, texts: Sequence[str], kind: Kind | None = None
    ) -> tuple[list[list[int]], int]:
        """Validate, prefix and tokenize texts to at most max_length ids each.

        Returns the id lists and how many texts were truncated.
        """
        check_texts(texts)
        if not texts:
            return [], 0
        prefix = self.prompt(kind)
        prefixed = [prefix + t for t in texts] if prefix else list(texts)
        # One extra token tells which texts are too long; only those are re-tokenized.
        ids = self.tokenizer(prefixed, truncation=True, max_length=self.max_length + 1)["input_ids"]
        long = [i for i, row in enumerate(ids) if len(row) > self.max_length]
        if long:
            cut = self.tokenizer(
                [prefixed[i] for i in long], truncation=True, max_length=self.max_length
            )["input_ids"]
            for i, row in zip(long, cut, strict=True):
                ids[i] = row
        return ids, len(long)

    def collate(self, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Pad id lists to the longest one and move them to the model's device."""
        width = max(len(row) for row in ids)
        input_ids = np.full((len(ids), width), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        device = self.device
        return {
            "input_ids": torch.from_numpy(input_ids).to(device, non_blocking=True),
            "attention_mask": torch.from_numpy(mask).to(device, non_blocking=True),
        }

    def embed(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Differentiable forward: pooled (and normalized) float32 embeddings of a batch."""
        hidden = self.model(**features).last_hidden_state
        pooled = pool(hidden, features["attention_mask"], self.pooling).float()
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def encode(
        self,
        texts: Sequence[str],
        kind: Kind | None = None,
        *,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """Encode texts into a float32 array of shape (len(texts), dim).

        ``kind`` picks the prompt: "query", "passage", or None for none.
        Texts longer than max_length tokens are truncated, and each call that truncates
        logs one warning with the count.
        """
        ids, truncated = self.tokenize(texts, kind)
        if truncated:
            logger.warning(
                "%d of %d texts were longer than max_length=%d tokens and were truncated",
                truncated,
                len(ids),
                self.max_length,
            )
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        if not ids:
            return out
        size = batch_size or self.batch_size
        # Longest first: similar lengths share a batch, so little padding is computed.
        order = np.argsort([-len(row) for row in ids], kind="stable")
        show = self.show_progress_bar if show_progress_bar is None else show_progress_bar
        starts = range(0, len(order), size)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in tqdm(starts, desc="Encoding", unit="batch", disable=not show):
                    index = order[start : start + size]
                    batch = self.collate([ids[i] for i in index])
                    out[index] = self.embed(batch).cpu().numpy()
        finally:
            self.model.train(was_training)
        return out

    def encode_queries(self, texts: Sequence[str], **kwargs) -> np.ndarray:
        """Encode search queries (with the query prompt)."""
        return self.encode(texts, "query", **kwargs)

    def encode_passages(self, texts: Sequence[str], **kwargs) -> np.ndarray:
        """Encode passages/documents (with the passage prompt)."""
        return self.encode(texts, "passage", **kwargs)

    def settings(self) -> STSettings:
        return STSettings(
            pooling=self.pooling,
            normalize=self.normalize,
            query_prompt=self.query_prompt,
            passage_prompt=self.passage_prompt,
            max_length=self.max_length,
        )

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write model, tokenizer and sentence-transformers files to ``directory``.

        Both ``PEGEncoder.from_pretrained`` and ``sentence_transformers.SentenceTransformer``
        load the result with the same pooling, normalization, prompts and max length.
        """
        if self.quantized:
            raise ValueError("an int8-quantized encoder cannot be saved; save the fp32 model")
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        write_st_settings(path, self.dim, self.settings())


def _position_limit(model: PreTrainedModel, tokenizer) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or 512
    if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # these reserve the first positions for padding
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer_limit and tokenizer_limit < 1_000_000:
        limit = min(limit, tokenizer_limit)
    return int(limit)


def _quantize_int8(model: PreTrainedModel) -> PreTrainedModel:
    # fbgemm's VNNI kernels beat the default "x86" engine, which was up to 10x slower on
    # short texts in benchmarks/encode_throughput.py. The engine is process-wide.
    if "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"
    with warnings.catch_warnings():  # torch marks eager dynamic quantization as deprecated
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
