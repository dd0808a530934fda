"""Shared pieces of the hybrid-retrieval benchmarks: an on-disk vector cache and corpora.

Encoding 100k passages with me5-small-zh on two CPU cores takes a while, so passage vectors
are cached outside the repository, keyed by the model, how it was loaded, its settings, the
kind and the text. Cached vectors are exactly what the encoder returned; only reruns are
faster. The cache lives in ``$PEG_BENCH_CACHE`` if set, else under peg-rag's cache directory
(``peg_rag.core.cache.cache_dir()``, which honours ``$PEG_RAG_CACHE`` and ``$XDG_CACHE_HOME``);
the scripts' ``--cache`` flag overrides both.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from peg_rag.core.cache import cache_dir

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODEL = SHARED / "models" / "me5-small-zh"
EVAL = SHARED / "data" / "eval"
TRAIN = SHARED / "data" / "train"
SETS = ("kuake-qtr-dev", "cmedir-dev", "cmrc2018-dev")
ENV_CACHE = "PEG_BENCH_CACHE"


def bench_dir() -> Path:
    """Working folder of the retrieval benchmarks (indexes built for timing and the like)."""
    return cache_dir() / "bench" / "retrieval"


def default_vector_cache() -> Path:
    """``$PEG_BENCH_CACHE``, else ``bench_dir() / "vectors"``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    return bench_dir() / "vectors"


class CachedEncoder:
    """A PEGEncoder stand-in that reuses vectors from earlier runs for the given kinds.

    Everything else (tokenizer, settings, query encoding unless cached) is the wrapped
    encoder's, so a HybridRetriever built with it stores the same vectors it would
    compute itself.
    """

    def __init__(self, encoder, directory: Path | None = None, kinds: Sequence[str] = ("passage",)):
        """``directory``: where the vectors go (default: :func:`default_vector_cache`)."""
        self.encoder = encoder
        self.kinds = set(kinds)
        settings = encoder.settings()
        model = Path(encoder.name_or_path)  # a local directory's absolute path, or a hub id
        weights = sorted(model.glob("*.safetensors")) if model.is_dir() else []
        identity = json.dumps(
            [
                encoder.name_or_path,
                encoder.load_options,
                vars(settings),
                [w.stat().st_size for w in weights],
            ],
            default=str,
            sort_keys=True,
        )
        root = Path(directory) if directory is not None else default_vector_cache()
        self.dir = root / hashlib.sha1(identity.encode()).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        self._rows: dict[bytes, np.ndarray] = {}
        for shard in sorted(self.dir.glob("shard-*.npz")):
            with np.load(shard, allow_pickle=False) as data:
                self._rows.update(zip(data["keys"].tolist(), data["vectors"], strict=True))
        self.hits = self.misses = 0

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    @staticmethod
    def _key(kind: str | None, text: str) -> bytes:
        return hashlib.sha1(f"{kind}\0{text}".encode()).hexdigest().encode()

    def encode(self, texts: Sequence[str], kind: str | None = None, **kwargs) -> np.ndarray:
        if kind not in self.kinds:
            return self.encoder.encode(texts, kind, **kwargs)
        keys = [self._key(kind, t) for t in texts]
        todo = list(dict.fromkeys(i for i, k in enumerate(keys) if k not in self._rows))
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            fresh = self.encoder.encode([texts[i] for i in todo], kind, **kwargs)
            shard = self.dir / f"shard-{len(list(self.dir.glob('shard-*.npz'))):05d}.npz"
            np.savez(shard, keys=np.array([keys[i] for i in todo], dtype="S40"), vectors=fresh)
            self._rows.update(zip((keys[i] for i in todo), fresh, strict=True))
        return np.stack([self._rows[k] for k in keys]) if keys else self.encoder.encode([], kind)

    def encode_queries(self, texts: Sequence[str], **kwargs) -> np.ndarray:
        return self.encode(texts, "query", **kwargs)

    def encode_passages(self, texts: Sequence[str], **kwargs) -> np.ndarray:
        return self.encode(texts, "passage", **kwargs)


def train_texts() -> list[str]:
    """Distinct query and positive texts of the shared training files, short ones first
    (the paraphrase and query-log sets), then the reading-comprehension passages."""
    from peg_rag.core.records import read_jsonl

    texts: dict[str, None] = {}
    order = ["paraphrase-medical", "paraphrase-finance", "kuake-qtr", "cmrc2018-trial", "drcd"]
    for name in order:
        for record in read_jsonl(TRAIN / name / "train.jsonl", lambda r, w: r):
            for text in [record.get("query"), *record.get("pos", [])]:
                if isinstance(text, str) and text.strip():
                    texts.setdefault(text.strip())
    return list(texts)
