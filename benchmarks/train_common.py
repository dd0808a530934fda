"""Shared pieces of the training benchmarks: a small BERT, real batches, memory readings."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ME5 = SHARED / "models" / "me5-small-zh"
TRAIN = SHARED / "data" / "train"


def small_bert(
    directory: Path,
    *,
    layers: int = 4,
    hidden: int = 256,
    dropout: float = 0.1,
    max_length: int = 128,
) -> Path:
    """A randomly initialized BERT (``layers`` x ``hidden``) with me5-small-zh's tokenizer,
    saved with sentence-transformers files (mean pooling, normalized), so that PEGEncoder and
    SentenceTransformer load exactly the same model."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from peg_rag.core.encoder import PEGEncoder

    if (directory / "modules.json").is_file():
        return directory
    tokenizer = AutoTokenizer.from_pretrained(ME5)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    BertModel(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    encoder = PEGEncoder.from_pretrained(tmp, pooling="mean", max_length=max_length, device="cpu")
    encoder.save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def real_batches(source: str, count: int, batch_size: int, hard_negatives: int, seed: int = 0):
    """``count`` consecutive training batches of one shared training source."""
    from peg_rag.trainer.data import TrainData

    data = TrainData(
        [str(TRAIN / source)], batch_size=batch_size, hard_negatives=hard_negatives, seed=seed
    )
    state, batches = data.initial_state(), []
    for _ in range(count):
        batch, state = data.batch(state)
        batches.append(batch)
    data.close()
    return batches


def distinct_batch(queries: int, hard_negatives: int, seed: int = 0):
    """A batch of ``queries`` x (2 + hard_negatives) pairwise-distinct real Chinese texts.

    The texts are every distinct query and positive of the shared training data plus the
    documents of the shared evaluation corpora, shuffled and dealt out; which text pairs with
    which is arbitrary. That is enough for measuring memory and time, which depend on how many
    texts there are and how long, and it makes N queries really give N x (1 + negatives)
    distinct candidates (real sources repeat texts, which the trainer embeds once).
    """
    import json

    import numpy as np

    from peg_rag.trainer.data import Batch

    pool: dict[str, None] = {}
    for path in sorted(TRAIN.glob("*/train.jsonl")):
        for line in path.open(encoding="utf-8"):
            record = json.loads(line)
            pool.update(dict.fromkeys([record["query"], *record["pos"]]))
    for path in sorted((SHARED / "data" / "eval").glob("*/corpus.jsonl")):
        for line in path.open(encoding="utf-8"):
            record = json.loads(line)
            pool[f"{record.get('title') or ''} {record['text']}".strip()] = None
    texts = list(pool)
    needed = queries * (2 + hard_negatives)
    if needed > len(texts):
        raise ValueError(f"{needed} distinct texts wanted, the shared data has {len(texts)}")
    order = np.random.default_rng(seed).permutation(len(texts))[:needed]
    dealt = [texts[i] for i in order]
    negatives = dealt[2 * queries :]
    return Batch(
        source="distinct",
        queries=dealt[:queries],
        prompts=[None] * queries,
        positives=dealt[queries : 2 * queries],
        negatives=[negatives[i::queries] for i in range(queries)],
        lines=list(range(queries)),
    )


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM) so far."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmRSS in /proc/self/status")


def autocast_forward(module: torch.nn.Module, device: torch.device) -> None:
    """Run ``module``'s forward under bf16 autocast, as accelerate does with bf16 training."""
    forward = module.forward

    def wrapped(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    module.forward = wrapped
