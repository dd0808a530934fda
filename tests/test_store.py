"""Chroma behind the VectorStore interface: embedded (persistent) and client/server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from peg_rag.retrieval.store import ChromaStore, VectorStore, open_store


def _unit(rows: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _exercise(store: VectorStore) -> None:
    vectors = _unit(6)
    ids = [f"c{i}" for i in range(6)]
    metadatas = [{"doc_id": f"d{i // 2}", "n": i} for i in range(6)]
    store.upsert(ids, vectors, [f"text {i}" for i in ids], metadatas)
    assert store.count() == 6 and store.all_ids() == set(ids)
    # Cosine space: similarity 1 with itself, and the order of exact dot products.
    hits = store.query(vectors[:1], k=6)[0]
    assert hits[0][0] == "c0" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    exact = vectors @ vectors[0]
    assert [i for i, _ in hits] == [ids[j] for j in np.argsort(-exact)]
    assert np.allclose([s for _, s in hits], np.sort(exact)[::-1], atol=1e-5)
    filtered = store.query(vectors[:1], k=6, where={"n": {"$gte": 4}})[0]
    assert {i for i, _ in filtered} == {"c4", "c5"}
    assert np.allclose(store.vectors(["c3", "c1"]), vectors[[3, 1]], atol=1e-6)
    store.delete(["c0", "c1"])
    assert store.all_ids() == set(ids[2:])


def test_persistent_store_keeps_the_given_vectors(tmp_path):
    store = ChromaStore.persistent(tmp_path / "db")
    assert store.collection.configuration["hnsw"]["space"] == "cosine"
    assert isinstance(store, VectorStore)
    _exercise(store)
    reopened = open_store(store.describe())
    assert reopened.count() == 4
    # The vectors come back as given (to float32 rounding): nothing is re-embedded.
    assert np.allclose(reopened.vectors(["c2", "c5"]), _unit(6)[[2, 5]], atol=1e-6)


def test_store_refuses_a_collection_in_another_space(tmp_path):
    import chromadb

    client = chromadb.PersistentClient(path=str(tmp_path / "db"), settings=ChromaStore._settings())
    client.create_collection(
        "chunks", configuration={"hnsw": {"space": "l2"}}, embedding_function=None
    )
    with pytest.raises(ValueError, match="cosine"):
        ChromaStore.persistent(tmp_path / "db")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory):
    """A `chroma run` server on 127.0.0.1, stopped after the module's tests."""
    beside_python = Path(sys.executable).with_name("chroma")
    binary = str(beside_python) if beside_python.is_file() else shutil.which("chroma")
    if binary is None:
        pytest.skip("the installed chromadb provides no `chroma` command to run a server")
    port = _free_port()
    process = subprocess.Popen(
        [
            binary,
            "run",
            "--path",
            str(tmp_path_factory.mktemp("chroma-server")),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import chromadb
        from chromadb.config import Settings

        deadline = time.monotonic() + 30
        while True:
            try:
                chromadb.HttpClient(
                    host="127.0.0.1", port=port, settings=Settings(anonymized_telemetry=False)
                ).heartbeat()
                break
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.skip("`chroma run` did not start a server on 127.0.0.1 within 30 s")
                time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_http_store_against_a_local_chroma_server(chroma_server):
    store = ChromaStore.http("127.0.0.1", chroma_server, collection="store-test")
    assert store.collection.configuration["hnsw"]["space"] == "cosine"
    _exercise(store)
    assert open_store(store.describe()).all_ids() == store.all_ids()


def test_hybrid_index_on_a_chroma_server(chroma_server, tiny_model_dir, tmp_path):
    from peg_rag import HybridRetriever

    store = ChromaStore.http("127.0.0.1", chroma_server, collection="hybrid-test")
    retriever = HybridRetriever.create(tmp_path / "idx", tiny_model_dir, store=store, chunk_size=32)
    retriever.add(
        [{"id": "a", "text": "医保报销需要身份证。"}, {"id": "b", "text": "故宫周一闭馆。"}]
    )
    loaded = HybridRetriever.load(tmp_path / "idx")  # reconnects from hybrid.json
    assert loaded.store.describe()["kind"] == "chroma-http"
    assert [r.doc_id for r in loaded.retrieve("故宫闭馆", k=1, method="bm25")] == ["b"]
    assert loaded.store.all_ids() == {"a#0", "b#0"}
