"""``peg-rag index`` and ``peg-rag query`` end to end on the tiny model."""

from __future__ import annotations

import json

import pytest

from peg_rag.cli import main


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "yibao.txt").write_text(
        "医保报销需要准备哪些材料？参保人员报销时需提供身份证、医保卡和费用清单。", encoding="utf-8"
    )
    (docs / "guide.md").write_text("# 故宫\n\n北京故宫周一闭馆。旺季八点半开门。", encoding="utf-8")
    (docs / "ignored.csv").write_text("a,b\n", encoding="utf-8")
    beir = tmp_path / "corpus.jsonl"  # BEIR layout, used as it is
    beir.write_text(
        '{"_id": "d1", "title": "糖尿病", "text": "糖尿病人可以吃西瓜吗"}\n'
        '{"_id": "d2", "title": "", "text": "高血压患者要少盐"}\n',
        encoding="utf-8",
    )
    own = tmp_path / "own.jsonl"
    own.write_text(
        '{"id": "p1", "text": "居住证续签可以在网上办理。", "metadata": {"city": "北京"}}\n',
        encoding="utf-8",
    )
    return tmp_path


def _index(model, *paths, extra=()):
    return main(["index", *map(str, paths), "--index-dir", "idx", "--model", str(model), *extra])


def test_index_then_query_in_text_json_and_batch(corpus, tiny_model_dir, capsys):
    assert (
        _index(tiny_model_dir, "docs", "corpus.jsonl", "own.jsonl", extra=["--chunk-size", "16"])
        == 0
    )
    out = capsys.readouterr().out
    assert "5 documents added" in out
    assert main(["query", "医保报销", "--index-dir", "idx", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "docs/yibao.txt#0" in out and "bm25 #1" in out

    assert main(["query", "糖尿病 西瓜", "--index-dir", "idx", "-k", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["doc_id"] == "d1" and result["metadata"] == {
        "source": "corpus.jsonl",
        "title": "糖尿病",
    }
    assert result["text"].startswith("糖尿病 糖尿病人")  # BEIR joins title and text

    queries = corpus / "queries.jsonl"
    queries.write_text(
        '{"id": "a", "text": "居住证"}\n{"id": "b", "text": "的"}\n', encoding="utf-8"
    )
    args = ["query", "--queries", str(queries), "--index-dir", "idx", "-k", "3"]
    assert main([*args, "--output", "out.jsonl", "--method", "bm25"]) == 0
    lines = [json.loads(x) for x in (corpus / "out.jsonl").read_text("utf-8").splitlines()]
    assert [x["id"] for x in lines] == ["a", "b"]
    assert lines[0]["results"][0]["doc_id"] == "p1" and lines[1]["results"] == []
    assert main([*args, "--filter", '{"city": "北京"}']) == 0
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert all(r["doc_id"] == "p1" for x in printed for r in x["results"])


def test_index_is_incremental(corpus, tiny_model_dir, capsys):
    assert _index(tiny_model_dir, "docs", "corpus.jsonl", extra=["--chunk-size", "32"]) == 0
    capsys.readouterr()
    assert main(["index", "docs", "corpus.jsonl", "--index-dir", "idx"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    (corpus / "corpus.jsonl").write_text(
        '{"_id": "d1", "title": "糖尿病", "text": "糖尿病人可以少吃西瓜"}\n', encoding="utf-8"
    )
    assert main(["index", "docs", "corpus.jsonl", "--index-dir", "idx"]) == 0
    out = capsys.readouterr().out
    assert "2 unchanged and skipped" in out and "1 replaced" in out and "1 deleted" in out
    from peg_rag import HybridRetriever

    assert sorted(HybridRetriever.load(corpus / "idx").doc_ids()) == [
        "d1",
        "docs/guide.md",
        "docs/yibao.txt",
    ]


def test_whole_documents_and_errors(corpus, tiny_model_dir, capsys):
    assert _index(tiny_model_dir, "docs", extra=["--chunk-size", "0"]) == 0
    from peg_rag import HybridRetriever

    assert len(HybridRetriever.load(corpus / "idx")) == 2  # one chunk per document
    bad = corpus / "bad.jsonl"
    bad.write_text('{"id": "x", "text": "好"}\n{"id": "y"}\n', encoding="utf-8")
    assert main(["index", str(bad), "--index-dir", "idx"]) == 2
    assert "bad.jsonl:2: field 'text'" in capsys.readouterr().err
    assert main(["index", "docs", "--index-dir", "fresh"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["query", "--index-dir", "idx"]) == 2
    assert main(["query", "x", "--index-dir", "nowhere"]) == 2
