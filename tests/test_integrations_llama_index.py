"""LlamaIndex integration: PEGEmbedding (batches, events, async, indexes), PEGHybridRetriever."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from integration_utils import make_slow, ticks_during
from llama_index.core import Document, Settings, StorageContext, VectorStoreIndex
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.chat_engine import CondensePlusContextChatEngine
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.embedding import EmbeddingEndEvent
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import NodeRelationship, TextNode
from llama_index.core.vector_stores import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
)

from peg_rag import PEGEncoder
from peg_rag.apps.sample_data import load_sample_kb
from peg_rag.integrations.hybrid import RETRIEVAL_KEYS
from peg_rag.integrations.llama_index import PEGEmbedding, PEGHybridRetriever, to_where

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
        model_name=str(tiny_model_dir), device="cpu", pooling="mean", query_prompt="查询："
    )
    assert (model.model_name, model.pooling, model.query_prompt) == (
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
    make_slow(monkeypatch, encoder, "encode_queries")
    vector, ticks = ticks_during(lambda: embed_model.aget_query_embedding("故宫"))
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


# ---------------------------------------------------------------- PEGHybridRetriever


def kb_documents() -> list[Document]:
    """40 passages of each domain of the sample knowledge base."""
    kb = load_sample_kb()
    chosen = kb[:40] + kb[100:140] + kb[200:240]
    return [
        Document(id_=p.id, text=f"{p.title}\n{p.text}", metadata={**p.metadata, "title": p.title})
        for p in chosen
    ]


@pytest.fixture(scope="module")
def hybrid(encoder: PEGEncoder) -> PEGHybridRetriever:
    return PEGHybridRetriever.from_documents(
        kb_documents(), encoder, similarity_top_k=4, chunk_size=0
    )


def test_returns_nodes_with_their_ids_metadata_and_scores(hybrid: PEGHybridRetriever):
    by_id = {d.doc_id: d for d in kb_documents()}
    hits = hybrid.retrieve("异地就医备案需要准备什么材料")
    assert len(hits) == 4
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    for hit in hits:
        source = by_id[hit.node.node_id]
        assert hit.node.get_content() == source.text
        meta = hit.node.metadata
        assert {k: meta[k] for k in source.metadata} == source.metadata
        assert meta["doc_id"] == hit.node.node_id and meta["score"] == hit.score
        assert meta["dense_rank"] is not None or meta["bm25_rank"] is not None
        assert hit.node.relationships[NodeRelationship.SOURCE].node_id == hit.node.node_id
    # Scores and ranks are for the application, not for the LLM's context.
    assert all(k not in hits[0].node.get_content(metadata_mode="llm") for k in RETRIEVAL_KEYS)


def test_chunked_documents_give_chunk_nodes_with_their_source(encoder: PEGEncoder):
    docs = kb_documents()[:10]
    retriever = PEGHybridRetriever.from_documents(
        docs, encoder, similarity_top_k=30, chunk_size=24, chunk_overlap=0
    )
    hits = retriever.retrieve("医保")
    assert len(hits) > len(docs)
    for hit in hits:
        doc_id, _, n = hit.node.node_id.partition("#")
        assert n.isdigit() and hit.node.ref_doc_id == doc_id == hit.node.metadata["doc_id"]
        source = next(d for d in docs if d.doc_id == doc_id).text
        assert source[hit.node.start_char_idx : hit.node.end_char_idx] == hit.node.get_content()


def test_from_nodes_keeps_node_ids(encoder: PEGEncoder):
    nodes = [
        TextNode(id_=f"node-{i}", text=d.text, metadata=d.metadata)
        for i, d in enumerate(kb_documents()[:12])
    ]
    retriever = PEGHybridRetriever.from_nodes(nodes, encoder, similarity_top_k=12)
    hits = retriever.retrieve("医保缴费")
    assert sorted(h.node.node_id for h in hits) == sorted(n.node_id for n in nodes)
    originals = {n.node_id: n for n in nodes}
    assert all(h.node.get_content() == originals[h.node.node_id].text for h in hits)


def test_metadata_filters_apply(hybrid: PEGHybridRetriever, encoder: PEGEncoder):
    query = "医保报销需要哪些材料"
    assert any(h.node.metadata["domain"] == "医保" for h in hybrid.retrieve(query))
    retriever = PEGHybridRetriever(
        hybrid.hybrid,
        similarity_top_k=5,
        filters=MetadataFilters(filters=[MetadataFilter(key="domain", value="旅游")]),
    )
    hits = retriever.retrieve(query)
    assert len(hits) == 5 and {h.node.metadata["domain"] for h in hits} == {"旅游"}
    either = MetadataFilters(
        filters=[
            MetadataFilter(key="domain", value="政务"),
            MetadataFilters(
                filters=[
                    MetadataFilter(key="title", operator=FilterOperator.IN, value=["故宫开放时间"])
                ]
            ),
        ],
        condition=FilterCondition.OR,
    )
    assert to_where(either) == {
        "$or": [{"domain": {"$eq": "政务"}}, {"title": {"$in": ["故宫开放时间"]}}]
    }
    retriever.filters = either
    retriever.similarity_top_k = 41
    hits = retriever.retrieve("故宫")
    assert {h.node.node_id for h in hits} == {f"zw-{i:03d}" for i in range(1, 41)} | {"ly-002"}


def test_unsupported_filter_is_refused(hybrid: PEGHybridRetriever):
    text_match = MetadataFilters(
        filters=[MetadataFilter(key="title", operator=FilterOperator.TEXT_MATCH, value="故宫")]
    )
    with pytest.raises(ValueError, match="text_match"):
        PEGHybridRetriever(hybrid.hybrid, filters=text_match)


def test_async_retrieve_matches_sync(hybrid: PEGHybridRetriever):
    query = "火车票退票手续费"
    sync = [(h.node.node_id, h.score) for h in hybrid.retrieve(query)]
    hits = asyncio.run(hybrid.aretrieve(query))
    assert [(h.node.node_id, h.score) for h in hits] == sync


def test_saved_index_dir_round_trip(encoder: PEGEncoder, tmp_path: Path):
    docs = kb_documents()[:20]
    built = PEGHybridRetriever.from_documents(docs, encoder, index_dir=tmp_path, chunk_size=0)
    query = "新生儿怎么参保"
    before = [(h.node.node_id, round(h.score, 6)) for h in built.retrieve(query)]
    reopened = PEGHybridRetriever.from_index_dir(tmp_path, encoder)
    assert [(h.node.node_id, round(h.score, 6)) for h in reopened.retrieve(query)] == before
    # The same documents again: the index is reused, nothing re-embedded or duplicated.
    again = PEGHybridRetriever.from_documents(docs, encoder, index_dir=tmp_path)
    assert len(again.hybrid) == len(docs)


def test_retriever_query_engine_with_mock_llm(hybrid: PEGHybridRetriever):
    engine = RetrieverQueryEngine.from_args(hybrid, llm=MockLLM())
    response = engine.query("故宫周一开门吗")
    assert [n.node.node_id for n in response.source_nodes] == [
        h.node.node_id for h in hybrid.retrieve("故宫周一开门吗")
    ]
    # MockLLM echoes its prompt: the retrieved passages reached it, the scores did not.
    assert response.source_nodes[0].node.get_content() in str(response)
    assert "dense_score" not in str(response)


def test_condense_plus_context_chat_engine_with_mock_llm(hybrid: PEGHybridRetriever):
    engine = CondensePlusContextChatEngine.from_defaults(hybrid, llm=MockLLM())
    first = engine.chat("异地就医怎么备案")
    second = engine.chat("需要什么材料")
    for reply in (first, second):
        assert reply.source_nodes and reply.source_nodes[0].node.get_content() in str(reply)
    assert len(engine.chat_history) == 4
