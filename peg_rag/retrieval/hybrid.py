"""HybridRetriever: Chinese BM25 and dense vectors over the same chunks, fused, in one directory.

Layout of an index directory::

    hybrid.json        encoder settings and model, chunking, BM25 and fusion defaults, store
    CURRENT            name of the committed state directory
    state-000042/      chunks.jsonl, docs.json and bm25/ of that commit
    chroma/            the embedded Chroma database (when the store is embedded Chroma)

Consistency between the two indexes. The committed state (BM25 + chunk table) is the source
of truth, and it is replaced atomically: a new ``state-N`` directory is written in full and
then ``CURRENT`` is switched to it with ``os.replace``. The vector store is written around
that switch so that, whatever point a crash interrupts, the store holds a *superset* of
the committed chunks:

- add: vectors are upserted into the store first, then the state is committed;
- delete: the state without the chunks is committed first, then they leave the store;
- replace (add with an id that exists and whose text or metadata changed): delete, then add.

``load`` compares the store's ids with the committed chunks. Vectors the state does not
know (left by an interrupted add or delete) are deleted from the store, with a warning.
Chunks without a vector can only appear when the store itself lost data; ``load`` then
raises :class:`InconsistentIndexError`, and ``load(..., repair=True)`` re-embeds just those
chunks from their stored text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import filters as where_filters
from .bm25 import BM25Index, ChineseTokenizer
from .fusion import reciprocal_rank, relative_score
from .json_files import read_json, write_json
from .store import ChromaStore, VectorStore, open_store
from .text import Chunker

logger = logging.getLogger("peg_rag")

FORMAT_VERSION = 1
CONFIG_FILE = "hybrid.json"
CURRENT_FILE = "CURRENT"
STORE_DIR = "chroma"
RETRIEVERS = ("dense", "bm25")
# Text whose embedding is saved at creation and compared on load: a different model (or
# changed model files) behind the same name gives a visibly different vector.
_PROBE = "检索增强生成 (retrieval-augmented generation) 把检索到的段落交给大模型。"
_PROBE_MIN_COSINE = 0.95

Method = Literal["hybrid", "dense", "bm25"]
Fusion = Literal["relative", "rrf"]


class InconsistentIndexError(RuntimeError):
    """The vector store lacks vectors for committed chunks (see the module docstring)."""


@dataclass
class Document:
    """A source document: ``id`` as given by the user, its text and scalar metadata."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class RetrievalResult:
    """One retrieved chunk.

    ``id`` is the chunk id (``"<doc_id>#<n>"``), ``doc_id`` the source document's id,
    ``start``/``end`` the chunk's character offsets in the document text, ``score`` the
    fused score (the retriever's own score with ``method="dense"`` or ``"bm25"``), and
    ``ranks``/``scores`` the 1-based rank and raw score each retriever gave
    (None where the chunk was not among its candidates). Dense scores are cosine
    similarities, BM25 scores are BM25 scores.
    """

    id: str
    doc_id: str
    text: str
    metadata: dict[str, Any]
    score: float
    ranks: dict[str, int | None]
    scores: dict[str, float | None]
    start: int
    end: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HybridSettings:
    """Chunking and retrieval defaults, saved with the index.

    ``chunk_size`` counts encoder tokens (or characters with ``chunk_unit="char"``; 0 keeps
    documents whole); ``chunk_overlap`` defaults to an eighth of it.
    ``weights`` are per retriever (``dense``, ``bm25``); ``candidates`` is how many
    results each retriever contributes to fusion. The defaults (relative-score fusion,
    dense 0.7 / BM25 0.3, 100 candidates) were chosen once for all data sets; see the
    "Hybrid retrieval" section of benchmarks/RESULTS.md for the comparison.
    """

    chunk_size: int = 256
    chunk_overlap: int | None = None
    chunk_unit: Literal["token", "char"] = "token"
    normalize_width: bool = False
    fusion: Fusion = "relative"
    weights: dict[str, float] = field(default_factory=lambda: {"dense": 0.7, "bm25": 0.3})
    rrf_k: int = 60
    candidates: int = 100

    def __post_init__(self) -> None:
        if self.chunk_unit not in ("token", "char"):
            raise ValueError(f"chunk_unit must be 'token' or 'char', got {self.chunk_unit!r}")
        if self.fusion not in ("relative", "rrf"):
            raise ValueError(f"fusion must be 'relative' or 'rrf', got {self.fusion!r}")
        _check_weights(self.weights)
        if self.chunk_size < 0:
            raise ValueError(
                f"chunk_size must be >= 0 (0 keeps documents whole), got {self.chunk_size}"
            )
        if self.chunk_overlap is None:
            self.chunk_overlap = self.chunk_size // 8
        if self.chunk_size and not 0 <= self.chunk_overlap < self.chunk_size:
            raise ValueError(
                f"chunk_overlap must be in [0, chunk_size={self.chunk_size}), "
                f"got {self.chunk_overlap}"
            )
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")


def _check_weights(weights: Mapping[str, float]) -> None:
    if set(weights) != set(RETRIEVERS) or any(w < 0 for w in weights.values()):
        raise ValueError(f"weights must give a weight >= 0 for 'dense' and 'bm25', got {weights}")


@dataclass
class _Chunk:
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


@dataclass
class AddReport:
    """What :meth:`HybridRetriever.add` did, counted in documents and chunks."""

    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    chunks: int = 0


def _as_document(item: Document | Mapping[str, Any], position: int) -> Document:
    if isinstance(item, Document):
        doc = item
    elif isinstance(item, Mapping):
        unknown = set(item) - {"id", "text", "metadata"}
        if unknown:
            raise ValueError(f"documents[{position}]: unknown keys {sorted(unknown)}")
        doc = Document(item.get("id"), item.get("text"), dict(item.get("metadata") or {}))  # type: ignore[arg-type]
    else:
        raise TypeError(
            f"documents[{position}] is {type(item).__name__}, expected Document or dict"
        )
    if not isinstance(doc.id, str) or not doc.id:
        raise ValueError(f"documents[{position}]: id must be a non-empty string, got {doc.id!r}")
    if not isinstance(doc.text, str) or not doc.text.strip():
        raise ValueError(f"documents[{position}] (id {doc.id!r}): text must be a non-empty string")
    if not isinstance(doc.metadata, Mapping):
        raise ValueError(f"documents[{position}] (id {doc.id!r}): metadata must be a dict")
    for key, value in doc.metadata.items():
        if key == "doc_id":
            raise ValueError(
                f"documents[{position}] (id {doc.id!r}): metadata key 'doc_id' is reserved"
            )
        if not isinstance(key, str) or not isinstance(value, (str, int, float, bool)):
            raise ValueError(
                f"documents[{position}] (id {doc.id!r}): metadata {key!r} must map a string "
                f"to a str, int, float or bool, got {value!r}"
            )
    return doc


def _content_hash(doc: Document) -> str:
    payload = json.dumps([doc.text, doc.metadata], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _encoder_record(encoder) -> dict[str, Any]:
    """How to load the same encoder again, and what its vectors look like."""
    model = getattr(encoder, "name_or_path", None) or encoder.model.config._name_or_path
    path = Path(model)
    return {
        "model": str(path.resolve()) if path.is_dir() else str(model),
        "pooling": encoder.pooling,
        "normalize": encoder.normalize,
        "query_instruction": encoder.query_instruction,
        "passage_instruction": encoder.passage_instruction,
        "max_length": encoder.max_length,
        "dim": encoder.dim,
    }


def _make_chunker(settings: HybridSettings, encoder) -> Chunker:
    """The chunker for these settings; token chunks must fit the encoder with its prompt."""
    by_token = settings.chunk_unit == "token"
    if by_token and settings.chunk_size:
        overhead = len(encoder.tokenize(["x"], "passage")[0][0]) - 1
        if settings.chunk_size + overhead > encoder.max_length:
            raise ValueError(
                f"chunk_size={settings.chunk_size} tokens plus the passage prompt and special "
                f"tokens ({overhead}) exceed the encoder's max_length={encoder.max_length}"
            )
    return Chunker(
        settings.chunk_size,
        settings.chunk_overlap or 0,
        tokenizer=encoder.tokenizer if by_token else None,
        normalize=settings.normalize_width,
    )


class HybridRetriever:
    """Chunks, a jieba BM25 index and a vector store kept in step, with fused retrieval.

    Create one with :meth:`create` (a new index directory, or ``None`` for in memory),
    reopen it with :meth:`load`. Then :meth:`add` documents, :meth:`delete` them by id and
    :meth:`retrieve`. Every add/delete is committed to the directory before it returns.
    """

    def __init__(
        self,
        *,
        encoder,
        store: VectorStore,
        bm25: BM25Index,
        settings: HybridSettings,
        index_dir: Path | None,
        config: dict[str, Any],
    ) -> None:
        self.encoder = encoder
        self.store = store
        self.bm25 = bm25
        self.settings = settings
        self.index_dir = index_dir
        self._config = config
        self._chunks: dict[str, _Chunk] = {}
        self._docs: dict[str, dict[str, Any]] = {}  # doc_id -> {"hash", "chunks"}
        self._generation = 0
        self._views: list[dict[str, Any]] | None = None  # filter views in BM25 row order
        self.chunker = _make_chunker(settings, encoder)

    # ------------------------------------------------------------------ create / load

    @classmethod
    def create(
        cls,
        index_dir: str | os.PathLike[str] | None,
        encoder,
        *,
        store: VectorStore | None = None,
        tokenizer: ChineseTokenizer | None = None,
        k1: float = 1.2,
        b: float = 0.75,
        overwrite: bool = False,
        **settings: Any,
    ) -> HybridRetriever:
        """Start a new, empty hybrid index.

        ``encoder`` is a PEGEncoder or a model name/directory for PEGEncoder.from_pretrained.
        ``index_dir=None`` keeps everything in memory (an ephemeral Chroma; nothing is
        written). ``store`` defaults to embedded Chroma in ``index_dir/chroma``; pass
        ``ChromaStore.http(...)`` for a Chroma server. ``tokenizer`` configures BM25
        (user dictionary, stopwords...). Other keywords are :class:`HybridSettings`
        fields (chunk_size, chunk_overlap, chunk_unit, fusion, weights, candidates...).
        """
        from .encoder import PEGEncoder

        options = HybridSettings(**settings)
        if isinstance(encoder, (str, os.PathLike)):
            encoder = PEGEncoder.from_pretrained(encoder)
        _make_chunker(options, encoder)  # reject bad chunking before touching the disk
        path = Path(index_dir) if index_dir is not None else None
        if path is not None:
            if (path / CONFIG_FILE).exists():
                if not overwrite:
                    raise FileExistsError(
                        f"{path} already holds a hybrid index; load it, or pass overwrite=True"
                    )
                shutil.rmtree(path)
            elif path.exists() and any(path.iterdir()):
                raise FileExistsError(f"{path} is neither empty nor a hybrid index")
            path.mkdir(parents=True, exist_ok=True)
        if store is None:
            store = (
                ChromaStore.ephemeral()
                if path is None
                else ChromaStore.persistent(path / STORE_DIR)
            )
        elif store.count():
            raise ValueError(
                f"the vector store already holds {store.count()} vectors; give a new index "
                "its own collection"
            )
        description = store.describe()
        if path is not None and description.get("kind") == "chroma-persistent":
            # Relative, so the directory can be moved or copied as a whole.
            description["path"] = os.path.relpath(description["path"], path)
        config = {
            "format_version": FORMAT_VERSION,
            "encoder": _encoder_record(encoder),
            "probe": encoder.encode_passages([_PROBE], show_progress_bar=False)[0]
            .round(6)
            .tolist(),
            "settings": asdict(options),
            "store": description,
        }
        bm25 = BM25Index(tokenizer or ChineseTokenizer(), k1=k1, b=b)
        retriever = cls(
            encoder=encoder, store=store, bm25=bm25, settings=options, index_dir=path, config=config
        )
        if path is not None:
            write_json(path / CONFIG_FILE, config)
            retriever._commit()
        return retriever

    @classmethod
    def load(
        cls,
        index_dir: str | os.PathLike[str],
        *,
        encoder=None,
        store: VectorStore | None = None,
        repair: bool = False,
        **encoder_options: Any,
    ) -> HybridRetriever:
        """Open an index directory; no other argument is needed.

        The encoder is loaded from the model and settings saved at creation unless an
        already-loaded ``encoder`` is passed (it must produce the same vectors).
        ``encoder_options`` (device, dtype, quantize, batch_size...) go to
        PEGEncoder.from_pretrained. Vectors are read from the store, never re-embedded,
        except for chunks the store lost when ``repair=True``.
        """
        from .encoder import PEGEncoder

        path = Path(index_dir)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a hybrid index: {CONFIG_FILE} is missing")
        config = read_json(path / CONFIG_FILE)
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path / CONFIG_FILE}: unsupported format_version")
        saved = config["encoder"]
        if encoder is None:
            encoder = PEGEncoder.from_pretrained(
                saved["model"],
                pooling=saved["pooling"],
                normalize=saved["normalize"],
                query_instruction=saved["query_instruction"] or "",
                passage_instruction=saved["passage_instruction"] or "",
                max_length=saved["max_length"],
                **encoder_options,
            )
        cls._check_encoder(encoder, config, path)
        state = path / (path / CURRENT_FILE).read_text(encoding="utf-8").strip()
        retriever = cls(
            encoder=encoder,
            store=store or open_store(config["store"], base=path),
            bm25=BM25Index.load(state / "bm25"),
            settings=HybridSettings(**config["settings"]),
            index_dir=path,
            config=config,
        )
        retriever._generation = int(state.name.rsplit("-", 1)[1])
        retriever._read_state(state)
        retriever._remove_stale_states()
        retriever._reconcile(repair)
        return retriever

    @staticmethod
    def _check_encoder(encoder, config: dict[str, Any], path: Path) -> None:
        saved = config["encoder"]
        if encoder.dim != saved["dim"]:
            raise ValueError(
                f"{path} holds {saved['dim']}-dim vectors; this encoder makes {encoder.dim}"
            )
        for key in ("pooling", "normalize", "query_instruction", "passage_instruction"):
            if (getattr(encoder, key) or None) != (saved[key] or None):
                raise ValueError(
                    f"{path} was built with {key}={saved[key]!r}; this encoder has "
                    f"{getattr(encoder, key)!r}, so its vectors would not match"
                )
        probe = encoder.encode_passages([_PROBE], show_progress_bar=False)[0]
        cosine = float(np.dot(probe, np.asarray(config["probe"], dtype=np.float32)))
        cosine /= float(np.linalg.norm(probe) * np.linalg.norm(config["probe"])) or 1.0
        if cosine < _PROBE_MIN_COSINE:
            raise ValueError(
                f"this encoder's vectors differ from the ones {path} was built with "
                f"(cosine {cosine:.3f} on a probe text): a different model or changed files"
            )

    # ------------------------------------------------------------------ state on disk

    def _read_state(self, state: Path) -> None:
        with (state / "chunks.jsonl").open(encoding="utf-8") as handle:
            for line in handle:
                chunk = _Chunk(**json.loads(line))
                self._chunks[chunk.id] = chunk
        self._docs = read_json(state / "docs.json")
        if set(self._chunks) != set(self.bm25.ids):
            raise InconsistentIndexError(
                f"{state}: the chunk table and the BM25 index hold different ids; "
                "the state directory was modified outside peg-rag"
            )

    def _commit(self) -> None:
        """Write the state to a fresh directory, then switch CURRENT to it atomically."""
        if self.index_dir is None:
            return
        generation = self._generation + 1
        name = f"state-{generation:06d}"
        tmp = self.index_dir / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        self.bm25.save(tmp / "bm25")
        with (tmp / "chunks.jsonl").open("w", encoding="utf-8") as handle:
            for item in self.bm25.ids:
                handle.write(json.dumps(asdict(self._chunks[item]), ensure_ascii=False) + "\n")
        write_json(tmp / "docs.json", self._docs)
        os.replace(tmp, self.index_dir / name)
        current = self.index_dir / f".{CURRENT_FILE}.tmp"
        with current.open("w", encoding="utf-8") as handle:
            handle.write(name)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(current, self.index_dir / CURRENT_FILE)
        self._generation = generation
        self._remove_stale_states()

    def _remove_stale_states(self) -> None:
        """Delete state directories other than the current one (older or half-written)."""
        assert self.index_dir is not None
        keep = f"state-{self._generation:06d}"
        for entry in self.index_dir.iterdir():
            if (
                entry.is_dir()
                and entry.name != keep
                and entry.name.lstrip(".").startswith("state-")
            ):
                shutil.rmtree(entry, ignore_errors=True)

    def _reconcile(self, repair: bool) -> None:
        stored = self.store.all_ids()
        orphans = stored - self._chunks.keys()
        if orphans:
            logger.warning(
                "removing %d vectors that no committed chunk owns (left by an interrupted "
                "add or delete)",
                len(orphans),
            )
            self.store.delete(sorted(orphans))
        missing = sorted(self._chunks.keys() - stored)
        if not missing:
            return
        if not repair:
            raise InconsistentIndexError(
                f"the vector store has no vectors for {len(missing)} committed chunks "
                f"(e.g. {missing[:3]}); load with repair=True to re-embed them from their text"
            )
        logger.warning("re-embedding %d chunks whose vectors the store lost", len(missing))
        self._upsert_vectors([self._chunks[i] for i in missing])

    # ------------------------------------------------------------------ add / delete

    @property
    def encoder_settings(self) -> dict[str, Any]:
        """The model and settings the index's vectors were made with (as saved)."""
        return dict(self._config["encoder"])

    def __len__(self) -> int:
        """Number of chunks."""
        return len(self._chunks)

    def doc_ids(self, filters: Mapping[str, Any] | None = None) -> list[str]:
        """Ids of the indexed documents, or of those with a chunk matching ``filters``."""
        if filters is None:
            return list(self._docs)
        where_filters.validate(filters)
        found = {
            c.doc_id
            for c in self._chunks.values()
            if where_filters.matches(filters, c.filter_view())
        }
        return [d for d in self._docs if d in found]

    def _chunk_documents(self, docs: Sequence[Document]) -> list[_Chunk]:
        chunks = []
        for doc in docs:
            for piece in self.chunker.split(doc.text):
                chunks.append(
                    _Chunk(
                        f"{doc.id}#{piece.index}",
                        doc.id,
                        piece.text,
                        piece.start,
                        piece.end,
                        dict(doc.metadata),
                    )
                )
        return chunks

    def _upsert_vectors(self, chunks: Sequence[_Chunk], vectors: np.ndarray | None = None) -> None:
        if vectors is None:
            vectors = self.encoder.encode_passages([c.text for c in chunks])
        ids = [c.id for c in chunks]
        try:
            self.store.upsert(
                ids, vectors, [c.text for c in chunks], [c.filter_view() for c in chunks]
            )
        except BaseException:
            # Best effort; anything left behind is an orphan that load() removes.
            try:
                self.store.delete(ids)
            except Exception:  # noqa: BLE001 - the original error matters more
                logger.warning("could not roll back a failed vector upsert", exc_info=True)
            raise

    def add(
        self,
        documents: Iterable[Document | Mapping[str, Any]],
        *,
        show_progress: bool = False,
    ) -> AddReport:
        """Chunk, embed and index documents; commit before returning.

        A document whose id is new is added. One whose id exists is skipped when its text
        and metadata are unchanged (by content hash), else replaced. Metadata values must
        be str, int, float or bool; the key ``doc_id`` is reserved.
        """
        docs = [_as_document(d, i) for i, d in enumerate(documents)]
        seen: set[str] = set()
        for doc in docs:
            if doc.id in seen:
                raise ValueError(f"document id {doc.id!r} appears twice in one add()")
            seen.add(doc.id)
        report = AddReport()
        todo: list[tuple[Document, str]] = []
        for doc in docs:
            digest = _content_hash(doc)
            known = self._docs.get(doc.id)
            if known is None:
                report.added += 1
            elif known["hash"] == digest:
                report.unchanged += 1
                continue
            else:
                report.replaced += 1
            todo.append((doc, digest))
        if not todo:
            return report
        chunks = self._chunk_documents([doc for doc, _ in todo])
        # The slow, failure-prone work comes before any change to the index.
        vectors = self.encoder.encode_passages(
            [c.text for c in chunks], show_progress_bar=show_progress
        )
        tokens = self.bm25.tokenize_many([c.text for c in chunks], show_progress)
        replaced = [doc.id for doc, _ in todo if doc.id in self._docs]
        if replaced:
            self.delete(replaced)
        self._upsert_vectors(chunks, vectors)
        self.bm25.add_tokens([c.id for c in chunks], tokens)
        for chunk in chunks:
            self._chunks[chunk.id] = chunk
        counts: dict[str, int] = {}
        for chunk in chunks:
            counts[chunk.doc_id] = counts.get(chunk.doc_id, 0) + 1
        for doc, digest in todo:
            self._docs[doc.id] = {"hash": digest, "chunks": counts.get(doc.id, 0)}
        self._views = None
        self._commit()
        report.chunks = len(chunks)
        return report

    def delete(self, doc_ids: Iterable[str]) -> int:
        """Remove documents (all their chunks) by id; unknown ids are ignored.

        Returns the number of documents removed. The state is committed first, then the
        vectors leave the store.
        """
        doomed = {d for d in doc_ids if d in self._docs}
        if not doomed:
            return 0
        chunk_ids = [c.id for c in self._chunks.values() if c.doc_id in doomed]
        self.bm25.delete(chunk_ids)
        for item in chunk_ids:
            del self._chunks[item]
        for doc_id in doomed:
            del self._docs[doc_id]
        self._views = None
        self._commit()
        self.store.delete(chunk_ids)
        return len(doomed)

    # ------------------------------------------------------------------ retrieval

    def retrieve(
        self,
        query: str,
        k: int = 10,
        filters: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> list[RetrievalResult]:
        """The top k chunks for a query; see :meth:`retrieve_many` for the options."""
        return self.retrieve_many([query], k, filters, **options)[0]

    def retrieve_many(
        self,
        queries: Sequence[str],
        k: int = 10,
        filters: Mapping[str, Any] | None = None,
        *,
        method: Method = "hybrid",
        fusion: Fusion | None = None,
        weights: Mapping[str, float] | None = None,
        candidates: int | None = None,
    ) -> list[list[RetrievalResult]]:
        """Retrieve for several queries at once (one encoder batch).

        - ``filters``: a Chroma-style ``where`` on metadata (and ``doc_id``), applied to
          both retrievers (see :mod:`peg_rag.filters`).
        - ``method``: "hybrid" (default), or "dense" / "bm25" alone.
        - ``fusion``, ``weights``, ``candidates``: override the index's defaults.

        An empty or whitespace-only query, or a BM25 query made only of stopwords with
        ``method="bm25"``, gets an empty list.
        """
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings; use retrieve() for one query")
        if method not in ("hybrid", "dense", "bm25"):
            raise ValueError(f"method must be 'hybrid', 'dense' or 'bm25', got {method!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        fusion = fusion or self.settings.fusion
        if fusion not in ("relative", "rrf"):
            raise ValueError(f"fusion must be 'relative' or 'rrf', got {fusion!r}")
        weights = dict(weights or self.settings.weights)
        _check_weights(weights)
        depth = max(k, candidates or self.settings.candidates)
        for i, query in enumerate(queries):
            if not isinstance(query, str):
                raise TypeError(f"queries[{i}] is {type(query).__name__}, expected str")
        live = [i for i, q in enumerate(queries) if q.strip()]
        lists: dict[str, list[list[tuple[str, float]]]] = {
            name: [[] for _ in queries] for name in RETRIEVERS
        }
        if live and len(self._chunks):
            if method in ("hybrid", "dense"):
                vectors = self.encoder.encode_queries([queries[i] for i in live])
                where = where_filters.to_chroma(filters) if filters else None
                for i, found in zip(live, self.store.query(vectors, depth, where), strict=True):
                    lists["dense"][i] = found
            if method in ("hybrid", "bm25"):
                mask = where_filters.mask(filters, self._filter_views()) if filters else None
                for i in live:
                    lists["bm25"][i] = self.bm25.search(queries[i], depth, mask)
        return [
            self._results(lists["dense"][i], lists["bm25"][i], k, method, fusion, weights)
            for i in range(len(queries))
        ]

    def _filter_views(self) -> list[dict[str, Any]]:
        if self._views is None:
            self._views = [self._chunks[i].filter_view() for i in self.bm25.ids]
        return self._views

    def _results(
        self,
        dense: list[tuple[str, float]],
        bm25: list[tuple[str, float]],
        k: int,
        method: str,
        fusion: str,
        weights: Mapping[str, float],
    ) -> list[RetrievalResult]:
        if method == "dense":
            fused = dense
        elif method == "bm25":
            fused = bm25
        elif fusion == "rrf":
            fused = reciprocal_rank(
                [[i for i, _ in dense], [i for i, _ in bm25]],
                [weights["dense"], weights["bm25"]],
                self.settings.rrf_k,
            )
        else:
            fused = relative_score([dense, bm25], [weights["dense"], weights["bm25"]])
        per = {
            name: {item: (rank, score) for rank, (item, score) in enumerate(pairs, start=1)}
            for name, pairs in (("dense", dense), ("bm25", bm25))
        }
        results = []
        for item, score in fused[:k]:
            chunk = self._chunks[item]
            results.append(
                RetrievalResult(
                    id=item,
                    doc_id=chunk.doc_id,
                    text=chunk.text,
                    metadata=dict(chunk.metadata),
                    score=float(score),
                    ranks={n: per[n][item][0] if item in per[n] else None for n in RETRIEVERS},
                    scores={n: per[n][item][1] if item in per[n] else None for n in RETRIEVERS},
                    start=chunk.start,
                    end=chunk.end,
                )
            )
        return results
