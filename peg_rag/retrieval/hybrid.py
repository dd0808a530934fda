"""HybridRetriever: Chinese BM25 and dense vectors over the same chunks, fused, in one directory.

The directory layout and the atomic commit of a state are in :mod:`.index_files`. The vector
store is written around each commit so that, whatever point a crash interrupts, the store
holds a *superset* of the committed chunks:

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peg_rag.core.documents import Document, as_document
from peg_rag.core.encoder import PEGEncoder
from peg_rag.core.encoding import Encoder
from peg_rag.core.reranker import Reranker

from . import filters as where_filters
from .bm25 import BM25Index, ChineseTokenizer
from .chunker import Chunker
from .fusion import reciprocal_rank, relative_score
from .index_files import (
    FORMAT_VERSION,
    STORE_DIR,
    InconsistentIndexError,
    StoredChunk,
    check_encoder,
    commit_state,
    current_state,
    encoder_record,
    is_index,
    probe_vector,
    read_manifest,
    read_state,
    remove_stale_states,
    write_manifest,
)
from .results import STAGES, RetrievalResult, rerank
from .settings import (
    BM25_TOKENIZERS,
    DEFAULT_BM25_TOKENIZER,
    FUSIONS,
    METHODS,
    RETRIEVERS,
    BM25Tokenizer,
    Fusion,
    HybridSettings,
    Method,
    check_choice,
    check_weights,
)
from .store import ChromaStore, VectorStore, open_store

logger = logging.getLogger("peg_rag")


@dataclass
class AddReport:
    """What :meth:`HybridRetriever.add` did, counted in documents and chunks."""

    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    chunks: int = 0


def _content_hash(doc: Document) -> str:
    payload = json.dumps([doc.text, doc.metadata], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _make_chunker(settings: HybridSettings, encoder: Encoder) -> Chunker:
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
        encoder: Encoder,
        store: VectorStore,
        bm25: BM25Index,
        settings: HybridSettings,
        index_dir: Path | None,
        config: dict[str, Any],
        reranker: Reranker | None = None,
    ) -> None:
        self.encoder = encoder
        self.reranker = reranker
        self.store = store
        self.bm25 = bm25
        self.settings = settings
        self.index_dir = index_dir
        self._config = config
        self._chunks: dict[str, StoredChunk] = {}
        self._docs: dict[str, dict[str, Any]] = {}  # doc_id -> {"hash", "chunks"}
        self._generation = 0
        self._views: list[dict[str, Any]] | None = None  # filter views in BM25 row order
        self.chunker = _make_chunker(settings, encoder)

    # ------------------------------------------------------------------ create / load

    @classmethod
    def create(
        cls,
        index_dir: str | os.PathLike[str] | None,
        encoder: Encoder | str | os.PathLike[str],
        *,
        store: VectorStore | None = None,
        tokenizer: ChineseTokenizer | None = None,
        bm25_tokenizer: BM25Tokenizer | None = None,
        k1: float = 1.2,
        b: float = 0.75,
        overwrite: bool = False,
        reranker: Reranker | str | os.PathLike[str] | None = None,
        **settings: Any,
    ) -> HybridRetriever:
        """Start a new, empty hybrid index.

        ``encoder`` is a PEGEncoder or a model name/directory for PEGEncoder.from_pretrained.
        ``index_dir=None`` keeps everything in memory (an ephemeral Chroma; nothing is
        written). ``store`` defaults to embedded Chroma in ``index_dir/chroma``; pass
        ``ChromaStore.http(...)`` for a Chroma server. ``bm25_tokenizer`` is the word
        segmenter under BM25, "jieba" or "rjieba" (default: ``DEFAULT_BM25_TOKENIZER`` of
        :mod:`.settings`); the index keeps it for good. ``tokenizer`` configures BM25 further
        (user dictionary, stopwords...). ``reranker`` (a Reranker or a model name) becomes
        the index's default second stage, recorded in its manifest. Other keywords are
        :class:`HybridSettings` fields (chunk_size, chunk_overlap, chunk_unit, fusion,
        weights, candidates, rerank_top_n...).
        """
        options = HybridSettings(**settings)
        if tokenizer is None:
            segmenter = bm25_tokenizer or DEFAULT_BM25_TOKENIZER
            check_choice("bm25_tokenizer", segmenter, BM25_TOKENIZERS)
            tokenizer = ChineseTokenizer(segmenter=segmenter)
        elif bm25_tokenizer not in (None, tokenizer.segmenter):
            raise ValueError(
                f"bm25_tokenizer={bm25_tokenizer!r} but the tokenizer given segments with "
                f"{tokenizer.segmenter!r}; pass only one of them"
            )
        if isinstance(encoder, (str, os.PathLike)):
            encoder = PEGEncoder.from_pretrained(encoder)
        if isinstance(reranker, (str, os.PathLike)):
            reranker = Reranker.from_pretrained(reranker)
        _make_chunker(options, encoder)  # reject bad chunking before touching the disk
        path = Path(index_dir) if index_dir is not None else None
        if path is not None:
            if is_index(path):
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
            "encoder": encoder_record(encoder),
            "probe": probe_vector(encoder),
            "settings": asdict(options),
            "store": description,
        }
        if reranker is not None:
            config["reranker"] = reranker.describe()
        bm25 = BM25Index(tokenizer, k1=k1, b=b)
        retriever = cls(
            encoder=encoder,
            store=store,
            bm25=bm25,
            settings=options,
            index_dir=path,
            config=config,
            reranker=reranker,
        )
        if path is not None:
            write_manifest(path, config)
            retriever._commit()
        return retriever

    @classmethod
    def load(
        cls,
        index_dir: str | os.PathLike[str],
        *,
        encoder: Encoder | None = None,
        store: VectorStore | None = None,
        repair: bool = False,
        reranker: Reranker | str | os.PathLike[str] | bool | None = None,
        **encoder_options: Any,
    ) -> HybridRetriever:
        """Open an index directory; no other argument is needed.

        The encoder is loaded from the model and settings saved at creation unless an
        already-loaded ``encoder`` is passed (it must produce the same vectors).
        ``encoder_options`` (backend, device, dtype, quantize, batch_size...) go to
        PEGEncoder.from_pretrained; ``backend`` and ``quantize`` default to those the index
        was built with (torch for indexes that do not record them). Vectors are read from
        the store, never re-embedded, except for chunks the store lost when ``repair=True``.
        ``reranker``: None loads the default one recorded at creation (if any), False runs
        without one, a Reranker or a model name replaces it for this session; it loads with
        the same ``backend``, ``device``, ``dtype`` and ``quantize`` as the encoder.
        """
        path = Path(index_dir)
        config = read_manifest(path)
        saved = config["encoder"]
        recorded = {"backend": saved.get("backend", "torch"), "quantize": saved.get("quantize")}
        given = {k: v for k, v in encoder_options.items() if v is not None}
        encoder_options = {**recorded, **given}
        if encoder is None:
            encoder = PEGEncoder.from_pretrained(
                saved["model"],
                pooling=saved["pooling"],
                normalize=saved["normalize"],
                query_prompt=saved["query_prompt"] or "",
                passage_prompt=saved["passage_prompt"] or "",
                max_length=saved["max_length"],
                **encoder_options,
            )
        check_encoder(encoder, config, path)
        state, generation = current_state(path)
        bm25, chunks, docs = read_state(state)
        if reranker is None and "reranker" in config:
            reranker = config["reranker"]["model"]
        if isinstance(reranker, (str, os.PathLike)):
            runtime = ("backend", "device", "dtype", "quantize", "trust_remote_code")
            reranker = Reranker.from_pretrained(
                reranker, **{k: v for k, v in encoder_options.items() if k in runtime}
            )
        retriever = cls(
            encoder=encoder,
            store=store or open_store(config["store"], base=path),
            bm25=bm25,
            settings=HybridSettings(**config["settings"]),
            index_dir=path,
            config=config,
            reranker=reranker if isinstance(reranker, Reranker) else None,
        )
        retriever._generation = generation
        retriever._chunks, retriever._docs = chunks, docs
        remove_stale_states(path, generation)
        retriever._reconcile(repair)
        return retriever

    # ------------------------------------------------------------------ state on disk

    def _commit(self) -> None:
        """Commit the chunk table and BM25 as a new state (nothing to do in memory)."""
        if self.index_dir is None:
            return
        commit_state(
            self.index_dir,
            self._generation + 1,
            self.bm25,
            (self._chunks[item] for item in self.bm25.ids),
            self._docs,
        )
        self._generation += 1

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
        where_filters.validate_filter(filters)
        found = {
            c.doc_id
            for c in self._chunks.values()
            if where_filters.matches(filters, c.filter_view())
        }
        return [d for d in self._docs if d in found]

    def _chunk_documents(self, docs: Sequence[Document]) -> list[StoredChunk]:
        chunks = []
        for doc in docs:
            for piece in self.chunker.split(doc.text):
                chunks.append(
                    StoredChunk(
                        f"{doc.id}#{piece.index}",
                        doc.id,
                        piece.text,
                        piece.start,
                        piece.end,
                        dict(doc.metadata),
                    )
                )
        return chunks

    def _upsert_vectors(
        self, chunks: Sequence[StoredChunk], vectors: np.ndarray | None = None
    ) -> None:
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
        docs = [as_document(d, i) for i, d in enumerate(documents)]
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
        reranker: Reranker | bool | None = None,
        rerank_top_n: int | None = None,
    ) -> list[list[RetrievalResult]]:
        """Retrieve for several queries at once (one encoder batch, one reranker run).

        - ``filters``: a Chroma-style ``where`` on metadata (and ``doc_id``), applied to
          both retrievers (see :mod:`peg_rag.retrieval.filters`).
        - ``method``: "hybrid" (default), or "dense" / "bm25" alone.
        - ``fusion``, ``weights``, ``candidates``: override the index's defaults.
        - ``reranker``: None uses the index's reranker (if it has one), False none, or a
          Reranker for this call. The first stage's top ``rerank_top_n`` (default: the
          index's, 30) are reranked; with k larger than that, the rest follow in their
          first-stage order (with no rerank rank or score).

        An empty or whitespace-only query, or a BM25 query made only of stopwords with
        ``method="bm25"``, gets an empty list.
        """
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings; use retrieve() for one query")
        check_choice("method", method, METHODS)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        fusion = fusion or self.settings.fusion
        check_choice("fusion", fusion, FUSIONS)
        weights = dict(weights or self.settings.weights)
        check_weights(weights)
        stage = self.reranker if reranker is None else reranker or None
        top_n = self.settings.rerank_top_n if rerank_top_n is None else rerank_top_n
        if top_n < 1:
            raise ValueError(f"rerank_top_n must be >= 1, got {top_n}")
        first = max(k, top_n) if isinstance(stage, Reranker) else k
        depth = max(first, candidates or self.settings.candidates)
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
        fused = [
            self._results(lists["dense"][i], lists["bm25"][i], first, method, fusion, weights)
            for i in range(len(queries))
        ]
        if isinstance(stage, Reranker):
            return rerank(stage, queries, fused, top_n, k)
        return fused

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
                    ranks={n: per[n][item][0] if item in per.get(n, {}) else None for n in STAGES},
                    scores={n: per[n][item][1] if item in per.get(n, {}) else None for n in STAGES},
                    start=chunk.start,
                    end=chunk.end,
                )
            )
        return results
