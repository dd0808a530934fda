"""A hybrid index on disk: its manifest, and its committed states.

Layout of an index directory::

    hybrid.json        the manifest: encoder settings and model, chunking, BM25 and fusion
                       defaults, store
    CURRENT            name of the committed state directory
    state-000042/      chunks.jsonl, docs.json and bm25/ of that commit
    chroma/            the embedded Chroma database (when the store is embedded Chroma)

The committed state (BM25 + chunk table) is the source of truth, and it is replaced
atomically: a new ``state-N`` directory is written in full and then ``CURRENT`` is switched
to it with a rename. How the vector store is kept in step is explained in
:mod:`peg_rag.retrieval.hybrid`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peg_rag.core.encoding import Encoder, vector_settings
from peg_rag.core.files import read_json, write_json, write_text

from .bm25 import BM25Index

FORMAT_VERSION = 1
CONFIG_FILE = "hybrid.json"
CURRENT_FILE = "CURRENT"
STORE_DIR = "chroma"
# Text whose embedding is saved at creation and compared on load: a different model (or
# changed model files) behind the same name gives a visibly different vector.
_PROBE = "检索增强生成 (retrieval-augmented generation) 把检索到的段落交给大模型。"
_PROBE_MIN_COSINE = 0.95
# Manifest keys of peg-rag 0.1, read for indexes it wrote.
_OLD_KEYS = {"query_instruction": "query_prompt", "passage_instruction": "passage_prompt"}


class InconsistentIndexError(RuntimeError):
    """The vector store lacks vectors for committed chunks (see peg_rag.retrieval.hybrid)."""


@dataclass
class StoredChunk:
    """A chunk as stored: its user metadata without the reserved ``doc_id``."""

    id: str
    doc_id: str
    text: str
    start: int
    end: int
    metadata: dict[str, Any]

    def filter_view(self) -> dict[str, Any]:
        """What filters see: the metadata plus ``doc_id``."""
        return {**self.metadata, "doc_id": self.doc_id}


def is_index(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a hybrid index."""
    return (Path(path) / CONFIG_FILE).is_file()


def encoder_record(encoder: Encoder) -> dict[str, Any]:
    """How to load the same encoder again (model, backend, quantization), and what its
    vectors look like."""
    runtime = {
        "backend": encoder.load_options.get("backend", "torch"),
        "quantize": encoder.load_options.get("quantize"),
    }
    return {
        "model": encoder.name_or_path,
        **runtime,
        **vector_settings(encoder),
        "dim": encoder.dim,
    }


def probe_vector(encoder: Encoder) -> list[float]:
    """The encoder's vector of the probe text, rounded for JSON."""
    return encoder.encode_passages([_PROBE], show_progress_bar=False)[0].round(6).tolist()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the index at ``path``, with 0.1's key names updated."""
    if not is_index(path):
        raise FileNotFoundError(f"{path} is not a hybrid index: {CONFIG_FILE} is missing")
    manifest = read_json(path / CONFIG_FILE)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_FILE}: unsupported format_version")
    saved = manifest["encoder"]
    for old, new in _OLD_KEYS.items():
        if old in saved:
            saved[new] = saved.pop(old)
    return manifest


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    write_json(path / CONFIG_FILE, manifest)


def check_encoder(encoder: Encoder, manifest: dict[str, Any], path: Path) -> None:
    """Raise ValueError unless ``encoder`` makes the vectors the index was built with."""
    saved = manifest["encoder"]
    if encoder.dim != saved["dim"]:
        raise ValueError(
            f"{path} holds {saved['dim']}-dim vectors; this encoder makes {encoder.dim}"
        )
    for key in ("pooling", "normalize", "query_prompt", "passage_prompt"):
        if (getattr(encoder, key) or None) != (saved[key] or None):
            raise ValueError(
                f"{path} was built with {key}={saved[key]!r}; this encoder has "
                f"{getattr(encoder, key)!r}, so its vectors would not match"
            )
    probe = np.asarray(probe_vector(encoder), dtype=np.float32)
    stored = np.asarray(manifest["probe"], dtype=np.float32)
    cosine = float(np.dot(probe, stored))
    cosine /= float(np.linalg.norm(probe) * np.linalg.norm(stored)) or 1.0
    if cosine < _PROBE_MIN_COSINE:
        raise ValueError(
            f"this encoder's vectors differ from the ones {path} was built with "
            f"(cosine {cosine:.3f} on a probe text): a different model or changed files"
        )


def _state_name(generation: int) -> str:
    return f"state-{generation:06d}"


def current_state(path: Path) -> tuple[Path, int]:
    """The committed state directory and its generation number."""
    state = path / (path / CURRENT_FILE).read_text(encoding="utf-8").strip()
    return state, int(state.name.rsplit("-", 1)[1])


def read_state(state: Path) -> tuple[BM25Index, dict[str, StoredChunk], dict[str, Any]]:
    """BM25, chunks by id and documents (``doc_id -> {"hash", "chunks"}``) of a state."""
    bm25 = BM25Index.load(state / "bm25")
    chunks: dict[str, StoredChunk] = {}
    with (state / "chunks.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            chunk = StoredChunk(**json.loads(line))
            chunks[chunk.id] = chunk
    if set(chunks) != set(bm25.ids):
        raise InconsistentIndexError(
            f"{state}: the chunk table and the BM25 index hold different ids; "
            "the state directory was modified outside peg-rag"
        )
    return bm25, chunks, read_json(state / "docs.json")


def commit_state(
    path: Path,
    generation: int,
    bm25: BM25Index,
    chunks: Iterable[StoredChunk],
    docs: dict[str, Any],
) -> None:
    """Write state ``generation`` in full, then switch CURRENT to it atomically."""
    name = _state_name(generation)
    tmp = path / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    bm25.save(tmp / "bm25")
    with (tmp / "chunks.jsonl").open("w", encoding="utf-8") as handle:
        for chunk in chunks:
            handle.write(json.dumps(asdict(chunk), ensure_ascii=False) + "\n")
    write_json(tmp / "docs.json", docs)
    os.replace(tmp, path / name)
    write_text(path / CURRENT_FILE, name)
    remove_stale_states(path, generation)


def remove_stale_states(path: Path, generation: int) -> None:
    """Delete state directories other than the current one (older or half-written)."""
    keep = _state_name(generation)
    for entry in path.iterdir():
        if entry.is_dir() and entry.name != keep and entry.name.lstrip(".").startswith("state-"):
            shutil.rmtree(entry, ignore_errors=True)
