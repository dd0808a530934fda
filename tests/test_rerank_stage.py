"""The reranking stage of HybridRetriever: the fused top n reordered by a cross-encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import build_tiny_reranker
from test_hybrid import DOCS, QUERIES

from peg_rag import HybridRetriever, PEGEncoder, Reranker


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory):
    return build_tiny_reranker(tmp_path_factory.mktemp("stage") / "reranker", seed=1)


@pytest.fixture(scope="module")
def reranker(reranker_dir):
    return Reranker.from_pretrained(reranker_dir)


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return PEGEncoder.from_pretrained(tiny_model_dir)


def build(path, encoder, **options) -> HybridRetriever:
    retriever = HybridRetriever.create(path, encoder, chunk_size=24, chunk_overlap=4, **options)
    retriever.add(DOCS)
    return retriever


def test_the_fused_top_n_is_reordered_by_the_reranker(encoder, reranker):
    retriever = build(None, encoder)
    for query in QUERIES:
        fused = retriever.retrieve(query, k=6)
        found = retriever.retrieve(query, k=3, reranker=reranker, rerank_top_n=6)
        scores = reranker.score(query, [r.text for r in fused])
        best = np.argsort(-scores, kind="stable")[:3]
        assert [r.id for r in found] == [fused[i].id for i in best]
        assert [r.ranks["rerank"] for r in found] == [1, 2, 3]
        assert [r.score for r in found] == pytest.approx(scores[best].tolist(), abs=1e-5)
        assert [r.scores["rerank"] for r in found] == [r.score for r in found]
        by_id = {r.id: r for r in fused}
        for r in found:  # the first stage's ranks and scores travel with each result
            assert r.ranks["dense"] == by_id[r.id].ranks["dense"]
            assert r.scores["bm25"] == by_id[r.id].scores["bm25"]


def test_rerank_top_n_bounds_the_candidates(encoder, reranker):
    retriever = build(None, encoder)
    query = QUERIES[0]
    top1 = retriever.retrieve(query, k=1, reranker=False)
    assert retriever.retrieve(query, k=1, reranker=reranker, rerank_top_n=1)[0].id == top1[0].id
    with pytest.raises(ValueError, match="rerank_top_n must be >= 1"):
        retriever.retrieve(query, k=1, reranker=reranker, rerank_top_n=0)


def test_an_index_records_its_reranker_and_loads_it(tmp_path, encoder, reranker_dir):
    build(tmp_path / "idx", encoder, reranker=str(reranker_dir), rerank_top_n=8)
    loaded = HybridRetriever.load(tmp_path / "idx", encoder=encoder)
    assert loaded.reranker is not None and loaded.settings.rerank_top_n == 8
    assert loaded.reranker.name_or_path == str(reranker_dir.resolve())
    with_stage = loaded.retrieve(QUERIES[1], k=2)
    assert all(r.ranks["rerank"] is not None for r in with_stage)
    plain = loaded.retrieve(QUERIES[1], k=2, reranker=False)
    assert all(r.ranks["rerank"] is None for r in plain)
    assert HybridRetriever.load(tmp_path / "idx", encoder=encoder, reranker=False).reranker is None


def test_without_a_reranker_nothing_is_reranked(encoder):
    results = build(None, encoder).retrieve_many(QUERIES, k=3)
    assert all(r.ranks["rerank"] is None and r.scores["rerank"] is None for x in results for r in x)


def test_beyond_rerank_top_n_the_first_stage_order_follows(encoder, reranker):
    retriever = build(None, encoder)
    query = QUERIES[2]
    fused = retriever.retrieve(query, k=6, reranker=False)
    found = retriever.retrieve(query, k=6, reranker=reranker, rerank_top_n=2)
    assert {r.id for r in found[:2]} == {r.id for r in fused[:2]}
    assert [r.ranks["rerank"] for r in found[:2]] == [1, 2]
    assert [r.id for r in found[2:]] == [r.id for r in fused[2:]]
    assert all(r.ranks["rerank"] is None for r in found[2:])


def test_cli_index_records_the_reranker_and_query_uses_or_skips_it(
    tmp_path, tiny_model_dir, reranker_dir, capsys, monkeypatch
):
    from peg_rag.cli import main

    monkeypatch.chdir(tmp_path)
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) + "\n" for d in DOCS),
        encoding="utf-8",
    )
    index = ["index", str(docs), "--index-dir", "idx", "--model", str(tiny_model_dir)]
    index += ["--chunk-size", "64"]
    assert main([*index, "--reranker", str(reranker_dir), "--rerank-top-n", "4"]) == 0
    capsys.readouterr()
    query = ["query", QUERIES[0], "--index-dir", "idx", "-k", "3", "--json"]
    assert main(query) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["ranks"]["rerank"] for r in results] == [1, 2, 3]
    assert main([*query, "--no-rerank"]) == 0
    assert all(r["ranks"]["rerank"] is None for r in json.loads(capsys.readouterr().out)["results"])
    assert main(["query", QUERIES[0], "--index-dir", "idx", "-k", "3", "--rerank-top-n", "1"]) == 0
    text = capsys.readouterr().out
    assert text.count("rerank #1") == 1 and "rerank #2" not in text
    assert main([*query, "--no-rerank", "--reranker", str(reranker_dir)]) == 2
    assert "not both" in capsys.readouterr().err


def test_cli_eval_adds_a_hybrid_rerank_row(tmp_path, tiny_model_dir, reranker_dir, capsys):
    from test_evaluate import write_beir

    from peg_rag.cli import main

    folder = write_beir(
        tmp_path / "set", {"q1": "糖尿病 西瓜", "q2": "居住证"}, [("q1", "d1", 1), ("q2", "d0", 1)]
    )
    out = tmp_path / "r.json"
    args = ["eval", str(folder), "--model", str(tiny_model_dir), "--methods", "hybrid"]
    assert main([*args, "--reranker", str(reranker_dir), "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| set | hybrid |" in table and "| set | hybrid+rerank |" in table
    report = json.loads(out.read_text())
    assert set(report["results"]["set"]) == {"hybrid", "hybrid+rerank"}
    assert report["reranker"] == str(reranker_dir)
