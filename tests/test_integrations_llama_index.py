"""LlamaIndex integration: PEGEmbedding (batches, events, async, indexes), PEGHybridRetriever."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llama_index.core import Document, Settings, StorageContext, VectorStoreIndex
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.embedding import EmbeddingEndEvent

from peg_rag import PEGEncoder
from peg_rag.integrations.llama_index import PEGEmbedding

TEXTS = [
    "异地就医需要先办理备案",
    "故宫博物院周一闭馆",
    "身份证可以在居住地换领",
    "黄山山顶适合看日出",
    "公积金可以用来支付房租",
    "新生儿出生后要尽快参保",
    "充电宝不能托运",
]


def documents() -> list[Document]:
    """TEXTS as documents whose embedded text is exactly the text (metadata left out)."""
    return [
        Document(text=t, id_=f"d{i}", metadata={"n": i}, excluded_embed_metadata_keys=["n"])
        for i, t in enumerate(TEXTS)
    ]


@pytest.fixture(scope="module")
def encoder(tiny_model_dir: Path) -> PEGEncoder:
    return PEGEncoder.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture
def embed_model(encoder: PEGEncoder) -> PEGEmbedding:
    return PEGEmbedding(encoder=encoder, embed_batch_size=3)


def test_loads_by_model_name_with_options(tiny_model_dir: Path):
    model = PEGEmbedding(
        model_name=str(tiny_model_dir), device="cpu", pooling="mean", query_instruction="查询："
    )
    assert (model.model_name, model.pooling, model.query_instruction) == (
        str(tiny_model_dir),
        "mean",
        "查询：",
    )
    assert model.encoder.pooling == "mean"
    query, passage = model.get_query_embedding(TEXTS[0]), model.get_text_embedding(TEXTS[0])
    np.testing.assert_allclose(query, model.encoder.encode_queries(TEXTS[:1])[0], atol=1e-6)
    np.testing.assert_allclose(passage, model.encoder.encode_passages(TEXTS[:1])[0], atol=1e-6)
    assert not np.allclose(query, passage)
    assert model.to_dict()["class_name"] == "PEGEmbedding"


def test_ready_encoder_and_options_are_exclusive(encoder: PEGEncoder):
    with pytest.raises(ValueError, match="not both"):
        PEGEmbedding(encoder=encoder, max_length=16)


def test_batches_of_embed_batch_size_are_one_forward_pass_each(embed_model, encoder, monkeypatch):
    calls: list[tuple[int, int | None]] = []
    encode = encoder.encode_passages

    def spy(texts, **kwargs):
        calls.append((len(texts), kwargs.get("batch_size")))
        return encode(texts, **kwargs)

    monkeypatch.setattr(encoder, "encode_passages", spy)
    vectors = embed_model.get_text_embedding_batch(TEXTS)
    assert calls == [(3, 3), (3, 3), (1, 1)]
    np.testing.assert_allclose(vectors, encode(TEXTS), atol=1e-6)
    calls.clear()
    assert np.allclose(
        asyncio.run(embed_model.aget_text_embedding_batch(TEXTS)), vectors, atol=1e-6
    )
    assert sorted(calls) == [(1, 1), (3, 3), (3, 3)]


class Collect(BaseEventHandler):
    events: list[Any] = []

    def handle(self, event: Any, **kwargs: Any) -> None:
        self.events.append(event)


def test_callbacks_and_instrumentation_events_fire(encoder: PEGEncoder):
    debug = LlamaDebugHandler()
    model = PEGEmbedding(
        encoder=encoder, embed_batch_size=4, callback_manager=CallbackManager([debug])
    )
    collect = Collect(events=[])
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(collect)
    try:
        model.get_text_embedding_batch(TEXTS)
        model.get_query_embedding("医保")
        asyncio.run(model.aget_query_embedding("医保"))
    finally:
        dispatcher.event_handlers.remove(collect)
    pairs = debug.get_event_pairs(CBEventType.EMBEDDING)
    assert len(pairs) == 4  # two batches and two queries
    ends = [e for e in collect.events if isinstance(e, EmbeddingEndEvent)]
    assert [len(e.chunks) for e in ends] == [4, 3, 1, 1]
    assert all(len(v) == encoder.dim for e in ends for v in e.embeddings)


def test_async_embedding_leaves_the_event_loop_free(embed_model, encoder, monkeypatch):
    encode = encoder.encode_queries

    def encode_slowly(texts, **kwargs):
        time.sleep(0.3)  # a model busy on the CPU
        return encode(texts, **kwargs)

    monkeypatch.setattr(encoder, "encode_queries", encode_slowly)

    async def main() -> tuple[list[float], int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        vector = await embed_model.aget_query_embedding("故宫")
        ticker.cancel()
        return vector, ticks

    vector, ticks = asyncio.run(main())
    assert len(vector) == encoder.dim and ticks >= 10


@pytest.fixture
def settings_embed_model(embed_model: PEGEmbedding, monkeypatch) -> PEGEmbedding:
    """Settings.embed_model = PEGEmbedding(...), undone after the test."""
    monkeypatch.setattr(Settings, "_embed_model", None)
    Settings.embed_model = embed_model
    return embed_model


def test_vector_store_index_via_settings(settings_embed_model: PEGEmbedding):
    assert Settings.embed_model is settings_embed_model
    docs = documents()
    index = VectorStoreIndex.from_documents(docs)
    # A node's exact text as the query: no instructions, so its own vector is the top hit.
    retriever = index.as_retriever(similarity_top_k=1)
    for i, text in enumerate(TEXTS):
        hit = retriever.retrieve(text)[0]
        assert hit.node.ref_doc_id == f"d{i}" and hit.node.metadata["n"] == i


def test_chroma_vector_store(embed_model: PEGEmbedding, tmp_path: Path):
    import chromadb
    from llama_index.vector_stores.chroma import ChromaVectorStore

    client = chromadb.PersistentClient(
        path=str(tmp_path), settings=chromadb.Settings(anonymized_telemetry=False)
    )
    collection = client.get_or_create_collection("sample_kb", metadata={"hnsw:space": "cosine"})
    storage = StorageContext.from_defaults(
        vector_store=ChromaVectorStore(chroma_collection=collection)
    )
    docs = documents()
    index = VectorStoreIndex.from_documents(docs, storage_context=storage, embed_model=embed_model)
    assert collection.count() == len(TEXTS)
    retriever = index.as_retriever(similarity_top_k=2)
    for i, text in enumerate(TEXTS):
        hits = retriever.retrieve(text)
        assert hits[0].node.ref_doc_id == f"d{i}" and hits[0].node.metadata["n"] == i
        assert hits[0].score >= hits[1].score
