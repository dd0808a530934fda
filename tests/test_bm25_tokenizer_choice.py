"""The BM25 tokenizer (jieba or rjieba): either retrieves, user words work with both, the
choice is saved with an index and kept by it, and `peg-rag index --bm25-tokenizer` sets it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from peg_rag import Document, HybridRetriever, PEGEncoder
from peg_rag.cli import main
from peg_rag.retrieval.bm25 import BM25Index, ChineseTokenizer
from peg_rag.retrieval.settings import BM25_TOKENIZERS, DEFAULT_BM25_TOKENIZER

V01 = Path(__file__).parent / "data" / "v0.1"
DOCS = {
    "d1": "糖尿病患者的饮食需要控制碳水化合物的摄入。",
    "d2": "高血压患者应该少吃盐，多运动。",
    "d3": "医保报销需要身份证和医保卡。",
    "d4": "北京故宫每周一闭馆。",
}
WORD = "灵犀通卡"  # both segmenters split it into 灵犀 / 通卡 unless told otherwise


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return PEGEncoder.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("segmenter", BM25_TOKENIZERS)
def test_either_segmenter_retrieves(segmenter):
    tokenizer = ChineseTokenizer(segmenter=segmenter)
    assert {"中华", "人民", "共和国", "中华人民共和国"} <= set(tokenizer("中华人民共和国"))
    index = BM25Index(tokenizer)
    index.add(list(DOCS), list(DOCS.values()))
    assert index.search("糖尿病饮食怎么控制", k=1)[0][0] == "d1"
    assert index.search("医保卡报销", k=1)[0][0] == "d3"
    assert index.search("故宫什么时候闭馆", k=1)[0][0] == "d4"


@pytest.mark.parametrize("segmenter", BM25_TOKENIZERS)
def test_user_words_keep_a_word_whole_and_let_queries_match_it(segmenter, tmp_path):
    text = f"{WORD}怎么办理"
    plain = ChineseTokenizer(segmenter=segmenter, char_unigrams=False)
    assert WORD not in plain(text)
    user_dict = tmp_path / "dict.txt"
    user_dict.write_text(f"{WORD} 10000 n\n", encoding="utf-8")
    from_file = ChineseTokenizer(segmenter=segmenter, user_dict=user_dict)
    assert WORD in from_file(text)
    # Precise mode without characters: a query for the word finds only the text that has it
    # whole, not the one with its two halves apart.
    options = {"segmenter": segmenter, "mode": "precise", "char_unigrams": False}
    docs = {"card": f"{WORD}可以在医院使用", "apart": "灵犀和通卡是两样东西"}
    hits = {}
    for name, user_words in (("plain", []), ("user", [[WORD, None, None]])):
        index = BM25Index(ChineseTokenizer(**options, user_words=user_words))
        index.add(list(docs), list(docs.values()))
        hits[name] = [item for item, _ in index.search(WORD, k=2)]
    assert sorted(hits["plain"]) == ["apart", "card"] and hits["user"] == ["card"]
    # User words stay in their own segmenter.
    assert WORD not in ChineseTokenizer(segmenter=segmenter, char_unigrams=False)(text)


def test_the_segmenter_is_saved_and_configurations_without_it_mean_jieba(tmp_path):
    index = BM25Index(ChineseTokenizer(segmenter="rjieba", user_words=[[WORD, None, None]]))
    index.add([*DOCS, "d5"], [*DOCS.values(), f"{WORD}可以在医院使用"])
    index.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text("utf-8"))["segmenter"] == "rjieba"
    loaded = BM25Index.load(tmp_path)
    assert loaded.tokenizer.segmenter == "rjieba" and WORD in loaded.tokenizer(WORD)
    for query in (WORD, "高血压", "糖尿病饮食"):
        assert loaded.search(query, k=5) == index.search(query, k=5)
    config = ChineseTokenizer(segmenter="rjieba").to_json()
    del config["segmenter"]  # as peg-rag wrote it before rjieba was offered
    assert ChineseTokenizer.from_json(config).segmenter == "jieba"
    with pytest.raises(ValueError, match="segmenter must be one of 'jieba', 'rjieba'"):
        ChineseTokenizer(segmenter="pkuseg")  # type: ignore[arg-type]


def test_an_index_written_by_0_1_keeps_jieba(tmp_path):
    copy = Path(shutil.copytree(V01, tmp_path / "v0.1"))
    encoder = PEGEncoder.from_pretrained(copy / "model")
    retriever = HybridRetriever.load(copy / "index", encoder=encoder)
    assert retriever.bm25.tokenizer.segmenter == "jieba"
    retriever.add([Document("new", "故宫门票在网上预约")])  # a commit by this version
    again = HybridRetriever.load(copy / "index", encoder=encoder)
    assert again.bm25.tokenizer.segmenter == "jieba"
    assert again.retrieve("故宫门票", k=1, method="bm25")[0].doc_id == "new"


def test_create_takes_the_tokenizer_and_the_index_keeps_it(tmp_path, encoder):
    docs = [Document(item, text) for item, text in DOCS.items()]
    default = HybridRetriever.create(None, encoder, chunk_size=32)
    assert default.bm25.tokenizer.segmenter == DEFAULT_BM25_TOKENIZER
    for segmenter in BM25_TOKENIZERS:
        path = tmp_path / segmenter
        HybridRetriever.create(path, encoder, chunk_size=32, bm25_tokenizer=segmenter).add(docs)
        loaded = HybridRetriever.load(path, encoder=encoder)
        assert loaded.bm25.tokenizer.segmenter == segmenter
        assert loaded.retrieve("医保卡报销", k=1, method="bm25")[0].doc_id == "d3"
        assert loaded.retrieve("故宫闭馆", k=1)[0].doc_id == "d4"
    given = ChineseTokenizer(segmenter="rjieba", english_stopwords=True)
    created = HybridRetriever.create(None, encoder, chunk_size=32, tokenizer=given)
    assert created.bm25.tokenizer is given
    with pytest.raises(ValueError, match="pass only one of them"):
        HybridRetriever.create(None, encoder, tokenizer=given, bm25_tokenizer="jieba")
    with pytest.raises(ValueError, match="bm25_tokenizer must be one of"):
        HybridRetriever.create(tmp_path / "bad", encoder, chunk_size=32, bm25_tokenizer="pkuseg")  # type: ignore[arg-type]
    assert not (tmp_path / "bad").exists()  # rejected before anything was written


def test_index_command_sets_the_tokenizer_and_keeps_it(tmp_path, tiny_model_dir, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in DOCS.items()
        ),
        encoding="utf-8",
    )
    index_dir = str(tmp_path / "idx")
    common = ["index", str(docs), "--index-dir", index_dir]
    new = ["--model", str(tiny_model_dir), "--chunk-size", "32", "--bm25-tokenizer", "rjieba"]
    assert main([*common, *new]) == 0
    assert "4 documents added" in capsys.readouterr().out
    assert HybridRetriever.load(index_dir).bm25.tokenizer.segmenter == "rjieba"
    assert main(["query", "医保卡报销", "--index-dir", index_dir, "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["doc_id"] == "d3"
    docs.write_text('{"id": "d5", "text": "故宫门票在网上预约"}\n', encoding="utf-8")
    assert main([*common, "--bm25-tokenizer", "jieba"]) == 2
    assert "keeps its BM25 tokenizer" in capsys.readouterr().err
    assert main(common) == 0  # without the flag, the index's own tokenizer
    assert HybridRetriever.load(index_dir).bm25.tokenizer.segmenter == "rjieba"
    with pytest.raises(SystemExit):
        main([*common, "--bm25-tokenizer", "pkuseg"])
