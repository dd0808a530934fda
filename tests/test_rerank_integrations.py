"""Reranking in the integrations: LlamaIndex's PEGRerank (a node postprocessor), LangChain's
PEGReranker (a document compressor), and the rerank stage of both PEGHybridRetrievers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import build_tiny_reranker
from integration_utils import make_slow, ticks_during
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document as LCDocument
from langchain_tests.integration_tests import RetrieversIntegrationTests
from llama_index.core import Document
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode

from peg_rag import HybridRetriever, PEGEncoder, Reranker
from peg_rag.apps.sample_data import load_sample_kb
from peg_rag.integrations import langchain as lc
from peg_rag.integrations import llama_index as li

QUERY = "异地就医备案需要什么材料"


@pytest.fixture(scope="module")
def encoder(tiny_model_dir: Path) -> PEGEncoder:
    return PEGEncoder.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reranker(tmp_path_factory.mktemp("integrations") / "reranker", seed=1)


@pytest.fixture(scope="module")
def reranker(reranker_dir: Path) -> Reranker:
    return Reranker.from_pretrained(reranker_dir, device="cpu")


def passages() -> list[tuple[str, str, dict[str, Any]]]:
    """(id, text, metadata) of 30 passages of each domain of the sample knowledge base."""
    kb = load_sample_kb()
    return [
        (p.id, f"{p.title}\n{p.text}", {**p.metadata, "title": p.title})
        for p in kb[:30] + kb[100:130] + kb[200:230]
    ]


def expected(reranker: Reranker, texts: list[str], top_n: int, **options: Any):
    """Reranker.rerank's order and scores: what the wrappers must return."""
    ranked = reranker.rerank(QUERY, texts, top_n, **options)
    return [i for i, _ in ranked], [s for _, s in ranked]


# ---------------------------------------------------------------- LlamaIndex: PEGRerank


def nodes() -> list[NodeWithScore]:
    return [
        NodeWithScore(node=TextNode(id_=i, text=t, metadata=m), score=1.0 - n / 100)
        for n, (i, t, m) in enumerate(passages()[:8])
    ]


def test_pegrerank_returns_the_top_n_in_the_rerankers_order(reranker: Reranker):
    hits = nodes()
    texts = [h.node.get_content(metadata_mode=MetadataMode.EMBED) for h in hits]
    order, scores = expected(reranker, texts, 3)
    found = li.PEGRerank(reranker=reranker, top_n=3).postprocess_nodes(hits, query_str=QUERY)
    assert [h.node.node_id for h in found] == [hits[i].node.node_id for i in order]
    assert [h.score for h in found] == pytest.approx(scores, abs=1e-5)
    assert [h.score for h in hits] == [1.0 - n / 100 for n in range(8)]  # inputs untouched
    assert "retrieval_score" not in found[0].node.metadata
    default = li.PEGRerank(reranker=reranker)
    assert default.top_n == 2 and len(default.postprocess_nodes(hits, query_str=QUERY)) == 2


def test_pegrerank_keeps_the_retrieval_score_out_of_the_llms_context(reranker: Reranker):
    hits = nodes()
    found = li.PEGRerank(reranker=reranker, top_n=8, keep_retrieval_score=True).postprocess_nodes(
        hits, query_str=QUERY
    )
    before = {h.node.node_id: h.score for h in hits}
    for hit in found:
        assert hit.node.metadata["retrieval_score"] == before[hit.node.node_id] != hit.score
        assert "retrieval_score" not in hit.node.get_content(metadata_mode=MetadataMode.LLM)


def test_pegrerank_normalize_gives_sigmoids(reranker: Reranker):
    hits = nodes()
    texts = [h.node.get_content(metadata_mode=MetadataMode.EMBED) for h in hits]
    _, scores = expected(reranker, texts, 4, normalize=True)
    rerank = li.PEGRerank(reranker=reranker, top_n=4, normalize=True)
    found = rerank.postprocess_nodes(hits, query_str=QUERY)
    assert [h.score for h in found] == pytest.approx(scores, abs=1e-6)
    assert all(0.0 <= h.score <= 1.0 for h in found)


def test_pegrerank_loads_by_model_name_with_options(reranker_dir: Path):
    rerank = li.PEGRerank(model=str(reranker_dir), device="cpu", max_length=64, top_n=1)
    assert (rerank.model, rerank.device, rerank.max_length, rerank.dtype) == (
        str(reranker_dir.resolve()),
        "cpu",
        64,
        "float32",
    )
    assert rerank.reranker.max_length == 64
    assert rerank.to_dict()["class_name"] == "PEGRerank"


@pytest.mark.parametrize("wrapper", [li.PEGRerank, lc.PEGReranker])
def test_ready_reranker_and_options_are_exclusive_and_typos_fail(wrapper, reranker: Reranker):
    with pytest.raises(ValueError, match="not both"):
        wrapper(reranker=reranker, max_length=32)
    with pytest.raises(ValueError, match="not both"):
        wrapper(reranker=reranker, model="BAAI/bge-reranker-base")
    assert wrapper(reranker=reranker).model == reranker.name_or_path
    with pytest.raises(ValueError, match="topn"):
        wrapper(reranker=reranker, topn=3)


class Collect(BaseEventHandler):
    events: list[Any] = []

    def handle(self, event: Any, **kwargs: Any) -> None:
        self.events.append(event)


def test_pegrerank_fires_callback_and_instrumentation_events(reranker: Reranker):
    debug = LlamaDebugHandler()
    rerank = li.PEGRerank(reranker=reranker, top_n=2, callback_manager=CallbackManager([debug]))
    collect = Collect(events=[])
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(collect)
    try:
        found = rerank.postprocess_nodes(nodes(), query_str=QUERY)
        asyncio.run(rerank.apostprocess_nodes(nodes(), query_str=QUERY))
    finally:
        dispatcher.event_handlers.remove(collect)
    [(start, end), _] = debug.get_event_pairs(CBEventType.RERANKING)
    assert start.payload["model_name"] == reranker.name_or_path and start.payload["top_k"] == 2
    assert [h.node.node_id for h in end.payload["nodes"]] == [h.node.node_id for h in found]
    starts = [e for e in collect.events if isinstance(e, ReRankStartEvent)]
    ends = [e for e in collect.events if isinstance(e, ReRankEndEvent)]
    assert len(starts) == len(ends) == 2
    assert starts[0].model_name == reranker.name_or_path and len(starts[0].nodes) == 8
    assert [len(e.nodes) for e in ends] == [2, 2]


def test_pegrerank_async_leaves_the_event_loop_free(reranker: Reranker, monkeypatch):
    rerank = li.PEGRerank(reranker=reranker, top_n=2)
    make_slow(monkeypatch, reranker, "score_pairs")
    found, ticks = ticks_during(lambda: rerank.apostprocess_nodes(nodes(), query_str=QUERY))
    assert len(found) == 2 and ticks >= 10


@pytest.fixture(scope="module")
def li_hybrid(encoder: PEGEncoder) -> li.PEGHybridRetriever:
    documents = [Document(id_=i, text=t, metadata=m) for i, t, m in passages()]
    return li.PEGHybridRetriever.from_documents(
        documents, encoder, similarity_top_k=6, chunk_size=0, reranker=False
    )


def test_pegrerank_in_a_query_engine(li_hybrid: li.PEGHybridRetriever, reranker: Reranker):
    rerank = li.PEGRerank(reranker=reranker, top_n=2)
    engine = RetrieverQueryEngine.from_args(li_hybrid, llm=MockLLM(), node_postprocessors=[rerank])
    response = engine.query(QUERY)
    first = li_hybrid.retrieve(QUERY)
    texts = [h.node.get_content(metadata_mode=MetadataMode.EMBED) for h in first]
    order, scores = expected(reranker, texts, 2)
    assert [h.node.node_id for h in response.source_nodes] == [first[i].node.node_id for i in order]
    assert [h.score for h in response.source_nodes] == pytest.approx(scores, abs=1e-5)


def test_llama_index_hybrid_retriever_with_a_reranker(
    li_hybrid: li.PEGHybridRetriever, reranker: Reranker
):
    retriever = li.PEGHybridRetriever(
        li_hybrid.hybrid, similarity_top_k=3, reranker=reranker, rerank_top_n=6
    )
    hits = retriever.retrieve(QUERY)
    stage = li_hybrid.hybrid.retrieve(QUERY, k=3, reranker=reranker, rerank_top_n=6)
    assert [h.node.node_id for h in hits] == [r.doc_id for r in stage]
    assert [h.node.metadata["rerank_rank"] for h in hits] == [1, 2, 3]
    assert [h.score for h in hits] == [h.node.metadata["rerank_score"] for h in hits]
    assert all(h.node.metadata["rerank_rank"] is None for h in li_hybrid.retrieve(QUERY))
    with pytest.raises(ValueError, match="rerank_top_n must be >= 1"):
        li.PEGHybridRetriever(li_hybrid.hybrid, rerank_top_n=0)


def test_an_index_reranker_is_used_or_dropped(
    encoder: PEGEncoder, reranker_dir: Path, tmp_path: Path
):
    index = HybridRetriever.create(tmp_path, encoder, chunk_size=0, reranker=str(reranker_dir))
    index.add([{"id": i, "text": t, "metadata": m} for i, t, m in passages()[:12]])
    recorded = li.PEGHybridRetriever.from_index_dir(tmp_path, encoder, similarity_top_k=2)
    assert [h.node.metadata["rerank_rank"] for h in recorded.retrieve(QUERY)] == [1, 2]
    plain = lc.PEGHybridRetriever.from_index_dir(tmp_path, encoder, k=2, reranker=False)
    assert plain.hybrid.reranker is None  # never loaded
    assert all(d.metadata["rerank_rank"] is None for d in plain.invoke(QUERY))


# ---------------------------------------------------------------- LangChain: PEGReranker


def lc_documents() -> list[LCDocument]:
    return [LCDocument(id=i, page_content=t, metadata=m) for i, t, m in passages()[:8]]


def test_pegreranker_returns_the_top_n_with_relevance_scores(reranker: Reranker):
    docs = lc_documents()
    order, scores = expected(reranker, [d.page_content for d in docs], 3)
    compressor = lc.PEGReranker(reranker=reranker)
    assert compressor.top_n == 3
    found = compressor.compress_documents(docs, QUERY)
    assert [d.id for d in found] == [docs[i].id for i in order]
    assert [d.metadata["relevance_score"] for d in found] == pytest.approx(scores, abs=1e-5)
    for doc in found:
        source = next(d for d in docs if d.id == doc.id)
        assert doc.page_content == source.page_content
        assert {k: doc.metadata[k] for k in source.metadata} == source.metadata
    assert all("relevance_score" not in d.metadata for d in docs)  # copies, not the inputs


def test_pegreranker_loads_by_model_name_and_normalizes(reranker_dir: Path, reranker: Reranker):
    compressor = lc.PEGReranker(model=str(reranker_dir), device="cpu", top_n=8, normalize=True)
    assert compressor.model == str(reranker_dir.resolve()) and compressor.device == "cpu"
    docs = lc_documents()
    found = compressor.compress_documents(docs, QUERY)
    _, scores = expected(reranker, [d.page_content for d in docs], 8, normalize=True)
    assert [d.metadata["relevance_score"] for d in found] == pytest.approx(scores, abs=1e-6)
    assert all(0.0 <= d.metadata["relevance_score"] <= 1.0 for d in found)


def test_pegreranker_async_leaves_the_event_loop_free(reranker: Reranker, monkeypatch):
    compressor = lc.PEGReranker(reranker=reranker, top_n=2)
    make_slow(monkeypatch, reranker, "score_pairs")
    found, ticks = ticks_during(lambda: compressor.acompress_documents(lc_documents(), QUERY))
    assert len(found) == 2 and ticks >= 10


@pytest.fixture(scope="module")
def lc_hybrid(li_hybrid: li.PEGHybridRetriever) -> lc.PEGHybridRetriever:
    """The same index as a LangChain retriever, without a reranker of its own."""
    return lc.PEGHybridRetriever(hybrid=li_hybrid.hybrid, k=6, reranker=False)


def test_pegreranker_in_a_contextual_compression_retriever(
    lc_hybrid: lc.PEGHybridRetriever, reranker: Reranker
):
    retriever = ContextualCompressionRetriever(
        base_compressor=lc.PEGReranker(reranker=reranker, top_n=2), base_retriever=lc_hybrid
    )
    first = lc_hybrid.invoke(QUERY)
    order, scores = expected(reranker, [d.page_content for d in first], 2)
    by_id = {d.id: d for d in first}
    for found in (retriever.invoke(QUERY), asyncio.run(retriever.ainvoke(QUERY))):
        assert [d.id for d in found] == [first[i].id for i in order]
        assert [d.metadata["relevance_score"] for d in found] == pytest.approx(scores, abs=1e-5)
        # The first stage's metadata (its fused score, ranks...) travels with each document.
        assert all(d.metadata["score"] == by_id[d.id].metadata["score"] for d in found)
    assert retriever.invoke("") == []


def test_langchain_hybrid_retriever_with_a_reranker(
    lc_hybrid: lc.PEGHybridRetriever, reranker: Reranker
):
    retriever = lc.PEGHybridRetriever(hybrid=lc_hybrid.hybrid, k=3, reranker=reranker)
    stage = lc_hybrid.hybrid.retrieve(QUERY, k=3, reranker=reranker, rerank_top_n=5)
    docs = retriever.invoke(QUERY, rerank_top_n=5)
    assert [d.id for d in docs] == [r.doc_id for r in stage]
    assert [d.metadata["rerank_rank"] for d in docs] == [1, 2, 3]
    assert [d.metadata["score"] for d in docs] == [d.metadata["rerank_score"] for d in docs]
    logits = reranker.score(QUERY, [d.page_content for d in docs])  # the cross-encoder's
    np.testing.assert_allclose([d.metadata["score"] for d in docs], logits, atol=1e-5)
    # Per call, like k and filters: no reranker at all.
    assert all(d.metadata["rerank_rank"] is None for d in retriever.invoke(QUERY, reranker=False))
    assert all(d.metadata["rerank_rank"] is None for d in lc_hybrid.invoke(QUERY))
    with pytest.raises(ValueError):
        lc.PEGHybridRetriever(hybrid=lc_hybrid.hybrid, rerank_top_n=0)


def test_from_texts_takes_a_reranker(encoder: PEGEncoder, reranker: Reranker):
    texts = [t for _, t, _ in passages()[:10]]
    retriever = lc.PEGHybridRetriever.from_texts(
        texts, encoder, chunk_size=0, k=2, reranker=reranker, rerank_top_n=4
    )
    assert (retriever.reranker, retriever.rerank_top_n) == (reranker, 4)
    assert [d.metadata["rerank_rank"] for d in retriever.invoke(QUERY)] == [1, 2]


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore::UserWarning")  # the suite marks sync tests asyncio too
class TestRerankingHybridRetrieverStandard(RetrieversIntegrationTests):
    """LangChain's standard retriever suite, with the rerank stage on."""

    shared: dict[str, Any]

    @pytest.fixture(autouse=True)
    def _shared(self, lc_hybrid: lc.PEGHybridRetriever, reranker: Reranker) -> None:
        type(self).shared = {"hybrid": lc_hybrid.hybrid, "reranker": reranker}

    @property
    def retriever_constructor(self) -> type[lc.PEGHybridRetriever]:
        return lc.PEGHybridRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return self.shared

    @property
    def retriever_query_example(self) -> str:
        return QUERY
