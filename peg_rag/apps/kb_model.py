"""Train a small PEG model on a knowledge base alone: ``peg-rag demo``'s offline fallback.

When no pretrained model can be reached, the demo still needs a dense retriever. This builds
one from the passages only: a WordPiece tokenizer trained on their text, a small randomly
initialized BERT with mean pooling, and contrastive pairs derived from the passages (title ->
passage, sentence -> passage, and a sentence span -> the passage without it), trained with
:func:`peg_rag.trainer.train` (the ``[train]`` extra). User questions are never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from peg_rag import trainer
from peg_rag.core.files import swap_dir
from peg_rag.core.model_files import STSettings, write_st_settings
from peg_rag.core.text import split_sentences

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Punctuation users type that a knowledge base may never contain: keep it out of [UNK].
EXTRA_ALPHABET = list("，。、；：？！…—·“”‘’（）《》【】「」,.;:?!()[]\"'-")
MIN_SENTENCE_CHARS = 8


@dataclass(frozen=True)
class Recipe:
    """Model size and training settings; the cache key covers every field.

    The defaults train in about 1.5 minutes on 2 CPU cores (benchmarks/demo_run.py):
    a 2-layer, 128-wide BERT, 200 steps of 64 pairs with in-batch negatives.
    """

    hidden_size: int = 128
    layers: int = 2
    heads: int = 2
    intermediate_size: int = 512
    max_length: int = 256
    vocab_size: int = 8000
    steps: int = 200
    batch_size: int = 64
    hard_negatives: int = 0
    learning_rate: float = 1e-3
    temperature: float = 0.05
    seed: int = 0

    def key(self, texts: Sequence[str]) -> str:
        """A short hash of the recipe and the knowledge base, naming the cached model."""
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode())
        for text in texts:
            digest.update(text.encode("utf-8") + b"\0")
        return digest.hexdigest()[:16]


QUICK = Recipe(hidden_size=64, layers=2, heads=2, intermediate_size=128, steps=20, batch_size=16)


def build_tokenizer(texts: Sequence[str], recipe: Recipe):
    """A BERT WordPiece tokenizer (one token per CJK character) trained on ``texts``."""
    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(handle_chinese_chars=True, lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.train_from_iterator(
        texts,
        trainers.WordPieceTrainer(
            vocab_size=recipe.vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=EXTRA_ALPHABET,
            show_progress=False,
        ),
    )
    cls, sep = core.token_to_id("[CLS]"), core.token_to_id("[SEP]")
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=recipe.max_length,
    )


def build_untrained_model(texts: Sequence[str], directory: Path, recipe: Recipe) -> Path:
    """Save a freshly initialized small BERT, its tokenizer and mean-pooling settings."""
    tokenizer = build_tokenizer(texts, recipe)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=recipe.max_length,
    )
    torch.manual_seed(recipe.seed)
    directory.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # Mean pooling learns from scratch faster than [CLS]: every token gets gradient.
    settings = STSettings(pooling="mean", normalize=True, max_length=recipe.max_length)
    write_st_settings(directory, recipe.hidden_size, settings)
    return directory


def training_pairs(documents: Sequence[tuple[str, str]], seed: int = 0) -> list[dict[str, Any]]:
    """Query/positive pairs from ``(title, text)`` documents and nothing else.

    ``text`` is the document as it is indexed. Each document gives: its title -> the
    text; each sentence -> the text; and one sentence -> the text without that sentence,
    so the model must learn what belongs together rather than only spot copied characters
    (the inverse cloze task).
    """
    rng = random.Random(seed)
    pairs = []
    for title, text in documents:
        if title.strip():
            pairs.append({"query": title, "pos": [text]})
        sentences = [text[a:b] for a, b in split_sentences(text)]
        long = [s for s in sentences if len(s.strip()) >= MIN_SENTENCE_CHARS]
        for sentence in long:
            pairs.append({"query": sentence.strip(), "pos": [text]})
        if len(long) > 1:
            held_out = rng.choice(long)
            rest = "".join(s for s in sentences if s is not held_out).strip()
            pairs.append({"query": held_out.strip(), "pos": [rest]})
    rng.shuffle(pairs)
    return pairs


def train_kb_model(
    documents: Sequence[tuple[str, str]], directory: str | Path, recipe: Recipe = Recipe()
) -> Path:
    """Build and train the fallback model into ``directory`` (replaced atomically).

    ``documents`` are ``(title, text)`` with the text as it will be indexed. Shows the
    trainer's progress bar. Returns the directory, loadable with ``PEGEncoder.from_pretrained``.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as work:
        work_dir = Path(work)
        initial = build_untrained_model([t for _, t in documents], work_dir / "initial", recipe)
        data = work_dir / "pairs.jsonl"
        with data.open("w", encoding="utf-8") as out:
            for pair in training_pairs(documents, recipe.seed):
                out.write(json.dumps(pair, ensure_ascii=False) + "\n")
        result = trainer.train(
            trainer.make_config(
                model=str(initial),
                train=[str(data)],
                output_dir=str(work_dir / "run"),
                max_steps=recipe.steps,
                batch_size=recipe.batch_size,
                mini_batch_size=max(recipe.batch_size, 32),
                hard_negatives=recipe.hard_negatives,
                learning_rate=recipe.learning_rate,
                temperature=recipe.temperature,
                warmup_ratio=0.1,
                seed=recipe.seed,
                report_to="none",
                logging_steps=max(recipe.steps // 10, 1),
            )
        )
        swap_dir(result.model_dir, target)
    return target
