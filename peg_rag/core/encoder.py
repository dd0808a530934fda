"""PEGEncoder: turn text into L2-normalized vectors with any BERT-style embedding model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from transformers import AutoModel

from . import torch_backend
from .deprecation import renamed, warn_renamed
from .encoding import DEFAULT_BATCH_SIZE, POOLING_MODES, Kind, check_runtime, check_texts
from .model_files import (
    STSettings,
    model_name,
    read_st_settings,
    resolve_model_dir,
    write_st_settings,
)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states (batch, seq, dim) into one vector per text: [CLS] or masked mean."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class PEGEncoder(torch_backend.TorchModel):
    """Encode queries and passages with a BERT-style model into normalized float32 vectors.

    Build one with :meth:`from_pretrained`. Pooling, prompts, normalization and max length
    default to what the model's sentence-transformers files say, else [CLS] pooling, no
    prompts, normalized vectors and the model's position limit.
    """

    def __init__(
        self,
        model: torch_backend.Model,
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
        super().__init__(
            model,
            tokenizer,
            max_length=max_length,
            batch_size=batch_size,
            show_progress_bar=show_progress_bar,
            quantized=quantized,
            name_or_path=name_or_path,
            load_options=load_options,
        )
        self.pooling = pooling
        self.normalize = normalize
        self.query_prompt = renamed(
            "query_instruction", "query_prompt", query_instruction, query_prompt
        )
        self.passage_prompt = renamed(
            "passage_instruction", "passage_prompt", passage_instruction, passage_prompt
        )

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
        backend: Literal["torch", "onnx"] = "torch",
        show_progress_bar: bool = False,
        query_instruction: str | None = None,
        passage_instruction: str | None = None,
    ) -> PEGEncoder:
        """Load a model from a hub id (``TownsWu/PEG``) or a local directory.

        Explicit arguments win over the sentence-transformers files; ``normalize=None``
        means "as the files say, else True". ``dtype`` defaults to bf16 (fp16 without bf16
        support) on GPU and fp32 elsewhere. ``quantize="int8"`` applies dynamic int8
        quantization to the Linear layers, on CPU only. ``backend="onnx"`` runs the model
        on ONNX Runtime on the CPU (float32, or the whole graph in int8 with
        ``quantize="int8"``), from the folder's ``onnx/`` files or an export cached on first
        use (see ``peg_rag.core.onnx_backend``); such an encoder is inference-only.
        ``query_instruction`` and ``passage_instruction`` are deprecated names of the prompts.
        """
        check_runtime(backend, quantize)
        query_prompt = renamed("query_instruction", "query_prompt", query_instruction, query_prompt)
        passage_prompt = renamed(
            "passage_instruction", "passage_prompt", passage_instruction, passage_prompt
        )
        model_dir = resolve_model_dir(name_or_path)
        found = read_st_settings(model_dir)
        model, tokenizer, load_options = torch_backend.load_model(
            backend,
            model_dir,
            AutoModel,
            device=device,
            dtype=dtype,
            quantize=quantize,
            trust_remote_code=trust_remote_code,
        )
        limit = torch_backend.position_limit(model, tokenizer)
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
            load_options=load_options,
        )

    @property
    def dim(self) -> int:
        """Size of the vectors this encoder returns."""
        return int(self.model.config.hidden_size)

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
        return torch_backend.collate(ids, self.tokenizer.pad_token_id, self.device)

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
        torch_backend.warn_truncated(truncated, len(ids), self.max_length)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        if not ids:
            return out
        return torch_backend.run_sorted(
            self.model,
            [len(row) for row in ids],
            batch_size or self.batch_size,
            lambda index: self.embed(self.collate([ids[i] for i in index])),
            out,
            desc="Encoding",
            show_progress_bar=(
                self.show_progress_bar if show_progress_bar is None else show_progress_bar
            ),
        )

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
        path = self.save_model(directory, "encoder")
        write_st_settings(path, self.dim, self.settings())
