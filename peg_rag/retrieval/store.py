"""Dense vector stores behind one small interface; Chroma (embedded or client/server) first.

The hybrid retriever gives a store precomputed, normalized vectors and asks it for nearest
neighbours by cosine similarity. It never asks a store to embed anything, so vectors written
once are read back as they are.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import chromadb
import numpy as np
from chromadb.config import Settings

from .filters import Where

Metadata = Mapping[str, str | int | float | bool]


@runtime_checkable
class VectorStore(Protocol):
    """What the hybrid retriever needs from a dense store; a server-grade store implements it too.

    Similarities are cosine similarities (higher is better). ``where`` filters use Chroma's
    metadata filter syntax (see :mod:`peg_rag.retrieval.filters`).
    """

    def upsert(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        texts: Sequence[str],
        metadatas: Sequence[Metadata],
    ) -> None: ...

    def delete(self, ids: Sequence[str]) -> None: ...

    def query(
        self, vectors: np.ndarray, k: int, where: Where | None = None
    ) -> list[list[tuple[str, float]]]:
        """For each query vector, up to k (id, similarity) pairs, best first."""
        ...

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ids, in that order (for scoring chosen candidates)."""
        ...

    def all_ids(self) -> set[str]: ...

    def count(self) -> int: ...

    def describe(self) -> dict[str, Any]:
        """JSON settings from which :func:`open_store` reconnects to this store."""
        ...


class ChromaStore:
    """A Chroma collection in cosine space holding vectors computed by the caller.

    Build one with :meth:`persistent` (embedded, a directory), :meth:`http` (a ``chroma run``
    server) or :meth:`ephemeral` (in memory). The collection is created with
    ``{"hnsw": {"space": "cosine"}}`` explicitly and no embedding function.
    """

    def __init__(
        self, client, collection: str, location: dict[str, Any], *, ef_search: int = 200
    ) -> None:
        self.client = client
        self.location = location
        self.collection_name = collection
        self.ef_search = ef_search
        self.collection = client.get_or_create_collection(
            collection,
            configuration={"hnsw": {"space": "cosine", "ef_search": ef_search}},
            embedding_function=None,
        )
        space = (self.collection.configuration or {}).get("hnsw", {}).get("space")
        if space not in (None, "cosine"):
            raise ValueError(
                f"Chroma collection {collection!r} exists with space {space!r}; "
                "the hybrid retriever needs cosine"
            )

    @staticmethod
    def _settings():
        """Client settings: no anonymized telemetry, so nothing leaves the machine."""
        return Settings(anonymized_telemetry=False)

    @classmethod
    def persistent(
        cls, path: str | os.PathLike[str], collection: str = "chunks", **kwargs
    ) -> ChromaStore:
        """Embedded Chroma (``chromadb.PersistentClient``) stored under ``path``."""
        # Absolute: chromadb caches clients per path string, so a relative path could
        # reach another directory's database after a chdir.
        path = os.path.abspath(path)
        client = chromadb.PersistentClient(path=path, settings=cls._settings())
        return cls(client, collection, {"kind": "chroma-persistent", "path": path}, **kwargs)

    @classmethod
    def http(
        cls,
        host: str = "localhost",
        port: int = 8000,
        collection: str = "chunks",
        *,
        ssl: bool = False,
        headers: dict[str, str] | None = None,
        **kwargs,
    ) -> ChromaStore:
        """A Chroma server (``chromadb.HttpClient``), e.g. one started with ``chroma run``."""
        client = chromadb.HttpClient(
            host=host, port=port, ssl=ssl, headers=headers, settings=cls._settings()
        )
        location = {"kind": "chroma-http", "host": host, "port": port, "ssl": ssl}
        return cls(client, collection, location, **kwargs)

    @classmethod
    def ephemeral(cls, collection: str = "chunks", **kwargs) -> ChromaStore:
        """In-memory Chroma: nothing is written to disk (tests, one-off evaluations)."""
        client = chromadb.EphemeralClient(settings=cls._settings())
        # Ephemeral clients in one process share a backend; a unique name keeps them apart
        # (not id(client): a collected client's id is reused, with its collection still there).
        name = f"{collection}-{uuid.uuid4().hex}"
        return cls(client, name, {"kind": "chroma-ephemeral"}, **kwargs)

    def _batches(self, n: int):
        size = self.client.get_max_batch_size()
        return range(0, n, size), size

    def upsert(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        texts: Sequence[str],
        metadatas: Sequence[Metadata],
    ) -> None:
        if not len(ids) == len(vectors) == len(texts) == len(metadatas):
            raise ValueError("ids, vectors, texts and metadatas must have the same length")
        starts, size = self._batches(len(ids))
        for s in starts:
            self.collection.upsert(
                ids=list(ids[s : s + size]),
                embeddings=np.asarray(vectors[s : s + size], dtype=np.float32),
                documents=list(texts[s : s + size]),
                metadatas=[dict(m) or None for m in metadatas[s : s + size]],
            )

    def delete(self, ids: Sequence[str]) -> None:
        starts, size = self._batches(len(ids))
        for s in starts:
            self.collection.delete(ids=list(ids[s : s + size]))

    def query(
        self, vectors: np.ndarray, k: int, where: Where | None = None
    ) -> list[list[tuple[str, float]]]:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if k <= 0 or self.count() == 0:
            return [[] for _ in vectors]
        result = self.collection.query(
            query_embeddings=vectors,
            n_results=k,
            where=dict(where) if where else None,
            include=["distances"],
        )
        # Chroma's cosine distance is 1 - cosine similarity.
        return [
            [(item, 1.0 - float(d)) for item, d in zip(ids, distances, strict=True)]
            for ids, distances in zip(result["ids"], result["distances"], strict=True)
        ]

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        if not ids:
            return np.empty((0, 0), dtype=np.float32)
        got = self.collection.get(ids=list(ids), include=["embeddings"])
        by_id = dict(zip(got["ids"], got["embeddings"], strict=True))
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise KeyError(f"no vectors stored for ids {missing[:5]}")
        return np.asarray([by_id[i] for i in ids], dtype=np.float32)

    def all_ids(self) -> set[str]:
        ids: set[str] = set()
        total = self.count()
        starts, size = self._batches(total)
        for s in starts:
            ids.update(self.collection.get(include=[], limit=size, offset=s)["ids"])
        return ids

    def count(self) -> int:
        return self.collection.count()

    def describe(self) -> dict[str, Any]:
        return {**self.location, "collection": self.collection_name, "ef_search": self.ef_search}


def open_store(
    description: Mapping[str, Any], base: str | os.PathLike[str] | None = None
) -> VectorStore:
    """Reconnect to a store from :meth:`VectorStore.describe`; relative paths resolve from base."""
    kind = description.get("kind")
    common = {"collection": description["collection"], "ef_search": description["ef_search"]}
    if kind == "chroma-persistent":
        path = description["path"]
        if base is not None and not os.path.isabs(path):
            path = os.path.join(base, path)
        return ChromaStore.persistent(path, **common)
    if kind == "chroma-http":
        return ChromaStore.http(
            description["host"], description["port"], ssl=description["ssl"], **common
        )
    if kind == "chroma-ephemeral":
        raise ValueError("an in-memory (ephemeral) store cannot be reopened")
    raise ValueError(f"unknown vector store kind {kind!r}")
