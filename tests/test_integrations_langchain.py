"""LangChain integration: PEGEmbeddings (standard suites, Chroma) and PEGHybridRetriever."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests

from peg_rag import PEGEncoder
from peg_rag.integrations.langchain import PEGEmbeddings

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
        tiny_model_dir, device="cpu", query_instruction="查询：", passage_instruction="段落："
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
    assert embeddings.query_instruction == "查询：" and embeddings.model_name == str(
        encoder.model.config._name_or_path
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
    slow = embeddings.encoder.encode_passages

    def encode_slowly(texts, **kwargs):
        time.sleep(0.3)  # a model busy on the CPU
        return slow(texts, **kwargs)

    monkeypatch.setattr(embeddings.encoder, "encode_passages", encode_slowly)

    async def main() -> tuple[list, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        vectors = await embeddings.aembed_documents(["一", "二", "三"])
        ticker.cancel()
        return vectors, ticks

    vectors, ticks = asyncio.run(main())
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
