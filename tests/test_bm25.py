"""jieba BM25: Chinese matching, tokenizer options, exact scores, add/delete, persistence."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from peg_rag.retrieval.bm25 import BM25Index, ChineseTokenizer, bundled_stopwords

DOCS = {
    "d1": "糖尿病患者的饮食需要控制碳水化合物的摄入。",
    "d2": "高血压患者应该少吃盐，多运动。",
    "d3": "医保报销需要身份证和医保卡。",
    "d4": "北京故宫每周一闭馆。",
}


def _index(**tokenizer_options) -> BM25Index:
    index = BM25Index(ChineseTokenizer(**tokenizer_options))
    index.add(list(DOCS), list(DOCS.values()))
    return index


def test_chinese_query_matches_where_whitespace_and_regex_tokenizers_match_nothing():
    import bm25s

    query = "糖尿病饮食怎么控制"
    # Whitespace and bm25s's default \w\w+ tokenizer both see a whole Chinese sentence as
    # one token, so the query shares no token with any document.
    whitespace = {d: set(t.split()) for d, t in DOCS.items()}
    assert all(not whitespace[d] & set(query.split()) for d in DOCS)
    regex = bm25s.tokenize(
        list(DOCS.values()), stopwords=None, return_ids=False, show_progress=False
    )
    query_regex = set(re.findall(r"(?u)\b\w\w+\b", query))
    assert all(not set(tokens) & query_regex for tokens in regex)

    hits = _index().search(query, k=4)
    assert hits[0][0] == "d1" and hits[0][1] > 0
    assert _index().search("医保卡报销", k=1)[0][0] == "d3"
    assert _index().search("故宫什么时候闭馆", k=1)[0][0] == "d4"


def test_scores_follow_the_lucene_bm25_formula():
    k1, b = 1.2, 0.75
    docs = [["糖尿病", "饮食", "饮食"], ["饮食", "运动"], ["医保", "报销", "材料", "清单"]]
    index = BM25Index(k1=k1, b=b)
    index.add_tokens(["a", "b", "c"], docs)
    query = ["饮食", "运动"]
    index.tokenizer = lambda text: query  # score the pre-tokenized query
    avgdl = sum(map(len, docs)) / len(docs)
    expected = []
    for tokens in docs:
        score = 0.0
        for term in query:
            df = sum(term in d for d in docs)
            idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
            tf = tokens.count(term)
            score += idf * tf / (tf + k1 * (1 - b + b * len(tokens) / avgdl))
        expected.append(score)
    assert np.allclose(index.scores("饮食 运动"), expected, rtol=1e-5)
    assert [i for i, _ in index.search("饮食 运动", k=3)] == ["b", "a"]  # c scores 0: left out


def test_empty_stopword_only_and_unknown_queries_return_nothing():
    index = _index()
    assert index.search("", k=5) == []
    assert index.search("   ", k=5) == []
    assert index.search("的了吗？！", k=5) == []
    assert index.search("zzzz", k=5) == []
    assert BM25Index().search("糖尿病", k=5) == []


def test_tokenizer_normalizes_and_drops_punctuation_and_stopwords():
    tokens = ChineseTokenizer(char_unigrams=False)("ＣＴ和MRI检查，的结果！")
    assert tokens == ["ct", "mri", "检查", "结果"]
    assert "的" in bundled_stopwords("zh") and "the" in bundled_stopwords("en")
    assert "the" in ChineseTokenizer()("the CT scan")
    assert "the" not in ChineseTokenizer(english_stopwords=True)("the CT scan")
    # Search mode also yields the words inside a long word; precise mode does not.
    search = ChineseTokenizer(char_unigrams=False)("中华人民共和国")
    precise = ChineseTokenizer(mode="precise", char_unigrams=False)("中华人民共和国")
    assert precise == ["中华人民共和国"] and {"中华", "人民", "共和国"} <= set(search)
    # Characters are indexed too, so differently segmented words still share tokens.
    assert {"孕", "妇"} <= set(ChineseTokenizer()("孕妇"))


def test_user_dictionary_changes_segmentation(tmp_path):
    word = "灵犀通卡"
    assert word not in ChineseTokenizer()(f"{word}怎么办理")
    user_dict = tmp_path / "dict.txt"
    user_dict.write_text(f"{word} 10000 n\n", encoding="utf-8")
    tokenizer = ChineseTokenizer(user_dict=user_dict)
    assert word in tokenizer(f"{word}怎么办理")
    assert tokenizer.to_json()["user_words"] == [[word, 10000, "n"]]
    bad = tmp_path / "bad.txt"
    bad.write_text("a 1 n extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.txt:1"):
        ChineseTokenizer(user_dict=bad)


def test_add_delete_and_mask():
    index = _index()
    assert index.search("高血压", k=1)[0][0] == "d2"
    with pytest.raises(ValueError, match="already"):
        index.add(["d2"], ["重复"])
    assert index.delete(["d2", "missing"]) == 1
    assert "d2" not in index and len(index) == 3
    assert all(i != "d2" for i, _ in index.search("高血压患者", k=4))
    index.add(["d5"], ["高血压的预防"])
    assert index.search("高血压", k=1)[0][0] == "d5"
    mask = np.array([0.0 if i == "d1" else 1.0 for i in index.ids], dtype=np.float32)
    assert all(i != "d1" for i, _ in index.search("糖尿病患者", k=4, mask=mask))


def test_save_and_load_keep_tokenizer_and_scores_without_pickle(tmp_path):
    index = BM25Index(
        ChineseTokenizer(user_words=[["灵犀通卡", 10000, None]], english_stopwords=True)
    )
    index.add(list(DOCS) + ["d5"], list(DOCS.values()) + ["灵犀通卡可以在医院使用"])
    index.delete(["d4"])  # leaves unused vocabulary behind, pruned on save
    index.save(tmp_path)
    loaded = BM25Index.load(tmp_path)
    assert loaded.tokenizer.to_json() == index.tokenizer.to_json()
    assert "灵犀通卡" in loaded.tokenizer("灵犀通卡")
    assert loaded.ids == index.ids
    for query in ("灵犀通卡", "高血压", "糖尿病饮食", "the 医保"):
        assert loaded.search(query, k=5) == index.search(query, k=5)
    with np.load(tmp_path / "bm25.npz", allow_pickle=False) as arrays:
        assert set(arrays.files) == {"tokens", "lengths", "data", "indices", "indptr"}
    for name in ("tokenizer.json", "bm25.json"):
        json.loads((tmp_path / name).read_text(encoding="utf-8"))
    loaded.add(["d6"], ["故宫门票"])  # a loaded index keeps working
    assert loaded.search("故宫", k=1)[0][0] == "d6"


@pytest.mark.parametrize("method", BM25Index.METHODS)
def test_score_matrix_is_the_one_bm25s_builds(method):
    import bm25s

    texts = [*DOCS.values(), "", "糖尿病糖尿病糖尿病饮食", "的了吗"]  # an empty and a stopword row
    index = BM25Index(method=method, k1=1.5, b=0.6)
    index.add([f"r{i}" for i in range(len(texts))], texts)
    index.delete(["r1"])  # leaves words no row uses, pruned before building
    built = index._built().scores
    reference = bm25s.BM25(method=method, k1=1.5, b=0.6)
    reference.index(
        ([t.tolist() for t in index._tokens], dict(index._vocab)),
        create_empty_token=False,
        show_progress=False,
    )
    for name in ("data", "indices", "indptr"):
        np.testing.assert_allclose(built[name], reference.scores[name], rtol=1e-6)
        assert built[name].dtype == reference.scores[name].dtype


def test_character_tokens_leave_out_stopword_characters():
    assert ChineseTokenizer()("医生的书") == ["医生", "书", "医", "生", "书"]  # 的: a stopword
    assert ChineseTokenizer(stopwords=["书"])("医生的书") == ["医生", "的", "医", "生", "的"]
