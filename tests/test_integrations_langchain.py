"""LangChain integration: PEGEmbeddings (standard suites, Chroma) and PEGHybridRetriever."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from integration_utils import make_slow, ticks_during
from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import ParrotFakeChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_tests.integration_tests import EmbeddingsIntegrationTests, RetrieversIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests

from peg_rag import PEGEncoder
from peg_rag.apps.sample_data import load_sample_kb
from peg_rag.integrations.langchain import PEGEmbeddings, PEGHybridRetriever, text_id

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class TinyModel:
    """Hands the session's tiny model directory to the standard suites' properties."""

    model_dir: Path

    @pytest.fixture(autouse=True)
    def _tiny(self, tiny_model_dir: Path) -> None:
        type(self).model_dir = tiny_model_dir

    @property
    def embeddings_class(self) -> type[PEGEmbeddings]:
        return PEGEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"model_name": str(self.model_dir), "device": "cpu"}


@pytest.mark.asyncio
class TestPEGEmbeddingsUnit(TinyModel, EmbeddingsUnitTests):
    pass


@pytest.mark.asyncio
class TestPEGEmbeddingsIntegration(TinyModel, EmbeddingsIntegrationTests):
    pass


@pytest.fixture(scope="module")
def embeddings(tiny_model_dir: Path) -> PEGEmbeddings:
    encoder = PEGEncoder.from_pretrained(
        tiny_model_dir, device="cpu", query_prompt="查询：", passage_prompt="段落："
    )
    return PEGEmbeddings(encoder=encoder, batch_size=2)


def test_instructions_match_the_encoder(embeddings: PEGEmbeddings):
    encoder = embeddings.encoder
    texts = ["医保报销需要哪些材料", "故宫几点开门", "身份证丢了怎么办"]
    np.testing.assert_allclose(
        embeddings.embed_documents(texts), encoder.encode_passages(texts), atol=1e-6
    )
    np.testing.assert_allclose(
        embeddings.embed_query(texts[0]), encoder.encode_queries(texts[:1])[0], atol=1e-6
    )
    assert not np.allclose(
        embeddings.embed_query(texts[0]), embeddings.embed_documents(texts[:1])[0]
    )
    assert embeddings.query_prompt == "查询：" and embeddings.model_name == str(
        encoder.name_or_path
    )


def test_ready_encoder_and_options_are_exclusive(embeddings: PEGEmbeddings):
    with pytest.raises(ValueError, match="not both"):
        PEGEmbeddings(encoder=embeddings.encoder, pooling="mean")


def test_unknown_option_is_rejected(tiny_model_dir: Path):
    with pytest.raises(ValueError, match="pooling_mode"):
        PEGEmbeddings(model_name=str(tiny_model_dir), pooling_mode="mean")


def test_empty_text_fails_loudly(embeddings: PEGEmbeddings):
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        embeddings.embed_documents(["有内容", "  "])


def test_async_embedding_leaves_the_event_loop_free(embeddings: PEGEmbeddings, monkeypatch):
    make_slow(monkeypatch, embeddings.encoder, "encode_passages")
    vectors, ticks = ticks_during(lambda: embeddings.aembed_documents(["一", "二", "三"]))
    assert len(vectors) == 3 and ticks >= 10


def test_chroma_vector_store_with_peg_embeddings(tiny_model_dir: Path, tmp_path: Path):
    import chromadb
    from langchain_chroma import Chroma

    # No instructions: a query with a document's exact words gets that document's vector.
    embeddings = PEGEmbeddings(model_name=str(tiny_model_dir), device="cpu")
    client = chromadb.PersistentClient(
        path=str(tmp_path), settings=chromadb.Settings(anonymized_telemetry=False)
    )
    store = Chroma(
        collection_name="sample_kb",
        embedding_function=embeddings,
        client=client,
        collection_metadata={"hnsw:space": "cosine"},
    )
    texts = ["异地就医需要先备案", "故宫周一闭馆", "身份证可以异地换领", "黄山适合看日出"]
    store.add_texts(texts, metadatas=[{"n": i} for i in range(4)], ids=[f"d{i}" for i in range(4)])
    for i, text in enumerate(texts):
        hit = store.similarity_search(text, k=1)[0]
        assert (hit.id, hit.page_content, hit.metadata["n"]) == (f"d{i}", text, i)


# ---------------------------------------------------------------- PEGHybridRetriever


def kb_documents() -> list[Document]:
    """40 passages of each domain of the sample knowledge base."""
    kb = load_sample_kb()
    chosen = kb[:40] + kb[100:140] + kb[200:240]
    return [
        Document(
            id=p.id, page_content=f"{p.title}\n{p.text}", metadata={**p.metadata, "title": p.title}
        )
        for p in chosen
    ]


@pytest.fixture(scope="module")
def hybrid(embeddings: PEGEmbeddings) -> PEGHybridRetriever:
    return PEGHybridRetriever.from_documents(kb_documents(), embeddings, chunk_size=0)


@pytest.mark.asyncio
class TestPEGHybridRetrieverStandard(RetrieversIntegrationTests):
    shared: PEGHybridRetriever

    @pytest.fixture(autouse=True)
    def _shared(self, hybrid: PEGHybridRetriever) -> None:
        type(self).shared = hybrid

    @property
    def retriever_constructor(self) -> type[PEGHybridRetriever]:
        return PEGHybridRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"hybrid": self.shared.hybrid}

    @property
    def retriever_query_example(self) -> str:
        return "医保报销需要准备哪些材料"


def test_documents_carry_ids_metadata_and_all_scores(hybrid: PEGHybridRetriever):
    by_id = {d.id: d for d in kb_documents()}
    docs = hybrid.invoke("异地就医备案怎么办理", k=5)
    assert len(docs) == 5
    assert [d.metadata["score"] for d in docs] == sorted(
        (d.metadata["score"] for d in docs), reverse=True
    )
    for doc in docs:
        source = by_id[doc.id]
        assert doc.page_content == source.page_content
        assert {k: doc.metadata[k] for k in source.metadata} == source.metadata
        assert doc.metadata["doc_id"] == doc.id and doc.metadata["chunk_id"] == f"{doc.id}#0"
        for name in ("dense", "bm25"):
            rank, score = doc.metadata[f"{name}_rank"], doc.metadata[f"{name}_score"]
            assert (rank is None) == (score is None)
    assert any(d.metadata["bm25_rank"] for d in docs) and any(
        d.metadata["dense_rank"] for d in docs
    )


def test_k_and_filters_in_constructor_and_at_invoke(hybrid: PEGHybridRetriever):
    travel = PEGHybridRetriever(hybrid=hybrid.hybrid, k=6, filters={"domain": "旅游"})
    docs = travel.invoke("医保报销")
    assert len(docs) == 6 and {d.metadata["domain"] for d in docs} == {"旅游"}
    docs = travel.invoke("医保报销", k=2, filters={"domain": "政务"})
    assert len(docs) == 2 and {d.metadata["domain"] for d in docs} == {"政务"}
    with pytest.raises(ValueError, match="unsupported operator"):
        PEGHybridRetriever(hybrid=hybrid.hybrid, filters={"domain": {"$like": "旅"}})


def test_from_texts_without_ids_uses_text_hashes_and_index_dir_round_trip(
    embeddings: PEGEmbeddings, tmp_path: Path
):
    texts = [d.page_content for d in kb_documents()[:15]]
    built = PEGHybridRetriever.from_texts(texts, embeddings, index_dir=tmp_path, chunk_size=0, k=3)
    docs = built.invoke("公积金提取")
    assert {d.id for d in docs} <= {text_id(t) for t in texts}
    reopened = PEGHybridRetriever.from_index_dir(tmp_path, embeddings, k=3)
    assert [(d.id, d.metadata["score"]) for d in reopened.invoke("公积金提取")] == [
        (d.id, d.metadata["score"]) for d in docs
    ]
    with pytest.raises(ValueError, match="15 texts, 1 ids"):
        PEGHybridRetriever.from_texts(texts, embeddings, ids=["x"])


def test_works_in_an_lcel_chain(hybrid: PEGHybridRetriever):
    def numbered(docs: list[Document]) -> str:
        return "\n".join(f"[{i}] {d.page_content}" for i, d in enumerate(docs, start=1))

    prompt = ChatPromptTemplate.from_messages(
        [("system", "只根据资料回答。"), ("human", "资料：\n{context}\n\n问题：{question}")]
    )
    chain = (
        {"context": hybrid | numbered, "question": RunnablePassthrough()}
        | prompt
        | ParrotFakeChatModel()  # answers with the prompt it was given
        | StrOutputParser()
    )
    question = "故宫周一开放吗"
    answer = chain.invoke(question)
    top = hybrid.invoke(question)
    assert answer.startswith("资料：\n[1] " + top[0].page_content) and answer.endswith(question)
    assert "".join(chain.stream(question)) == answer
