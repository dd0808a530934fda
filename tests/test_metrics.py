"""Metrics against values computed by hand, and the BEIR loader's errors."""

from __future__ import annotations

import math

import pytest

from peg_rag.core.beir import load_beir, load_pairs
from peg_rag.core.metrics import (
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    retrieval_scores,
    spearman,
)
from peg_rag.core.records import DataError


def test_ndcg_graded_by_hand():
    # Relevant: d1 grade 2 (gain 3), d2 grade 1 (gain 1). Ranked: x, d2, d1.
    dcg = 0 + 1 / math.log2(3) + 3 / math.log2(4)
    idcg = 3 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(["x", "d2", "d1"], {"d1": 2, "d2": 1}, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["x", "d2", "d1"], {"d1": 2, "d2": 1}, 1) == 0.0
    assert ndcg_at_k(["d1", "d2"], {"d1": 2, "d2": 1}, 10) == pytest.approx(1.0)


def test_mrr_and_recall_by_hand():
    relevance = {"a": 1, "b": 1, "c": 0}
    assert mrr_at_k(["c", "x", "b", "a"], relevance, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["c", "x", "b"], relevance, 2) == 0.0
    assert recall_at_k(["c", "x", "b"], relevance, 3) == pytest.approx(0.5)
    assert recall_at_k(["a", "b"], relevance, 100) == 1.0


def test_retrieval_scores_average_and_missing_queries():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d9": 0}}
    scores = retrieval_scores({"q1": ["d1"], "q3": ["d9"]}, qrels)  # q2 unanswered, q3 unjudged
    assert scores["ndcg@10"] == pytest.approx(0.5)
    assert scores["mrr@10"] == pytest.approx(0.5)
    assert scores["recall@100"] == pytest.approx(0.5)


def test_spearman_with_ties():
    # ranks of x: 1, 2.5, 2.5, 4; ranks of y: 1, 2, 3, 4 -> Pearson of the ranks
    assert spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(0.9486832980505138)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_load_beir_and_line_errors(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text(
        '{"_id": "d1", "title": "标题", "text": "正文"}\n{"_id": "d2", "text": "只有正文"}\n',
        encoding="utf-8",
    )
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "问题"}\n', encoding="utf-8")
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\n")
    data = load_beir(tmp_path)
    assert data.corpus == {"d1": "标题 正文", "d2": "只有正文"}
    assert data.qrels == {"q1": {"d1": 2}}
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "问题"}\n{"_id": "q2"}\n')
    with pytest.raises(DataError, match=r"queries.jsonl:2: field 'text': missing"):
        load_beir(tmp_path)
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\thigh\n")
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "问题"}\n')
    with pytest.raises(DataError, match=r"test.tsv:2: field 'score'"):
        load_beir(tmp_path)


def test_load_pairs(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("s1\ts2\tscore\n一\t二\t3\n三\t四\t5\n", encoding="utf-8")
    assert load_pairs(path) == (["一", "三"], ["二", "四"], [3.0, 5.0])
    path.write_text("s1\ts2\tscore\n一\t二\n", encoding="utf-8")
    with pytest.raises(DataError, match="pairs.tsv:2"):
        load_pairs(path)
