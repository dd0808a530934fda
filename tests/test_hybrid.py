"""HybridRetriever: results, add/delete in step, filters, fusion, persistence, crash recovery."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import textwrap

import pytest

from peg_rag import Document, HybridRetriever, PEGEncoder
from peg_rag.retrieval.evaluate import index_corpus, run_queries
from peg_rag.retrieval.fusion import reciprocal_rank, relative_score
from peg_rag.retrieval.hybrid import InconsistentIndexError

DOCS = [
    Document(
        "yb",
        "医保报销需要准备哪些材料？参保人员报销时需提供身份证、医保卡和费用清单。异地就医需要先备案。",
        {"topic": "insurance", "year": 2021},
    ),
    Document(
        "gxy",
        "高血压患者日常饮食应该注意什么？要少盐少油，多吃蔬菜。",
        {"topic": "health", "year": 2022},
    ),
    Document(
        "tnb",
        "糖尿病人可以吃西瓜吗？西瓜含糖量不高，但要控制分量。",
        {"topic": "health", "year": 2020},
    ),
    Document(
        "gg",
        "北京故宫的开放时间是几点到几点？旺季八点半开门，周一闭馆。",
        {"topic": "travel", "year": 2021},
    ),
    Document(
        "jzz",
        "如何在网上办理居住证续签？登录政务服务网，上传照片并提交申请。",
        {"topic": "government", "year": 2023},
    ),
]
QUERIES = ["医保报销材料", "糖尿病 西瓜", "故宫周一开门吗", "居住证怎么续签", "高血压饮食"]


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return PEGEncoder.from_pretrained(tiny_model_dir)


def _build(path, encoder, **settings) -> HybridRetriever:
    retriever = HybridRetriever.create(path, encoder, chunk_size=24, chunk_overlap=4, **settings)
    retriever.add(DOCS)
    return retriever


def _in_step(retriever: HybridRetriever) -> None:
    chunks = set(retriever._chunks)
    assert retriever.store.all_ids() == chunks == set(retriever.bm25.ids)
    assert {c.doc_id for c in retriever._chunks.values()} == set(retriever.doc_ids())
    for doc_id, info in retriever._docs.items():
        assert sum(c.doc_id == doc_id for c in retriever._chunks.values()) == info["chunks"]


def test_results_carry_chunk_document_scores_and_ranks(tmp_path, encoder):
    retriever = _build(tmp_path / "idx", encoder)
    results = retriever.retrieve("医保报销需要什么材料", k=3)
    assert len(results) == 3
    assert results[0].doc_id == "yb" and results[0].id.startswith("yb#")
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    texts = {d.id: d.text for d in DOCS}
    for r in results:
        assert texts[r.doc_id][r.start : r.end] == r.text
        assert set(r.ranks) == set(r.scores) == {"dense", "bm25", "rerank"}
        assert r.metadata == next(d.metadata for d in DOCS if d.id == r.doc_id)
    assert results[0].ranks["bm25"] == 1 and results[0].scores["bm25"] > 0
    assert json.loads(json.dumps(results[0].to_dict()))["doc_id"] == "yb"


def test_fused_scores_match_the_fusion_of_each_retrievers_list(tmp_path, encoder):
    retriever = _build(None, encoder, candidates=50)
    for query in QUERIES:
        dense = [(r.id, r.score) for r in retriever.retrieve(query, k=50, method="dense")]
        bm25 = [(r.id, r.score) for r in retriever.retrieve(query, k=50, method="bm25")]
        relative = relative_score([dense, bm25], [0.7, 0.3])
        got = [(r.id, r.score) for r in retriever.retrieve(query, k=50)]
        assert [i for i, _ in got] == [i for i, _ in relative]
        assert [s for _, s in got] == pytest.approx([s for _, s in relative])
        rrf = reciprocal_rank([[i for i, _ in dense], [i for i, _ in bm25]], [1.0, 1.0], 60)
        got = retriever.retrieve(query, k=50, fusion="rrf", weights={"dense": 1, "bm25": 1})
        assert [(r.id, pytest.approx(r.score)) for r in got] == rrf
        for r in got:  # per-retriever ranks are positions in each list
            if r.ranks["bm25"] is not None:
                assert bm25[r.ranks["bm25"] - 1] == (r.id, pytest.approx(r.scores["bm25"]))


def test_empty_and_stopword_queries(encoder):
    retriever = _build(None, encoder)
    assert retriever.retrieve("", k=5) == [] and retriever.retrieve("  ", k=5) == []
    assert retriever.retrieve("的了吗", k=5, method="bm25") == []
    dense_only = retriever.retrieve("的了吗", k=3)
    assert len(dense_only) == 3 and all(r.ranks["bm25"] is None for r in dense_only)
    empty = HybridRetriever.create(None, encoder, chunk_size=24)
    assert empty.retrieve("医保", k=5) == []


def test_add_and_delete_keep_both_indexes_in_step(tmp_path, encoder):
    retriever = _build(tmp_path / "idx", encoder)
    _in_step(retriever)
    rng = random.Random(0)
    for step in range(12):
        doc = rng.choice(DOCS)
        if rng.random() < 0.4:
            retriever.delete([doc.id])
        else:
            text = doc.text if rng.random() < 0.5 else doc.text + f"第{step}次修订。"
            retriever.add([Document(doc.id, text, doc.metadata)])
        _in_step(retriever)
        assert all(r.doc_id in retriever.doc_ids() for r in retriever.retrieve("医保 故宫", k=10))
    _in_step(HybridRetriever.load(tmp_path / "idx", encoder=encoder))


def test_add_skips_unchanged_and_replaces_changed_documents(encoder):
    retriever = _build(None, encoder)
    report = retriever.add(DOCS[:2])
    assert (report.added, report.replaced, report.unchanged, report.chunks) == (0, 0, 2, 0)
    changed = Document("yb", "医保卡丢了怎么补办？", {"topic": "insurance", "year": 2024})
    report = retriever.add([changed, Document("new", "新文档。")])
    assert (report.added, report.replaced, report.unchanged) == (1, 1, 0)
    assert [r.text for r in retriever.retrieve("医保卡", k=10) if r.doc_id == "yb"] == [
        changed.text
    ]
    assert retriever.delete(["yb", "nope"]) == 1 and "yb" not in retriever.doc_ids()
    _in_step(retriever)


def test_bad_documents_are_rejected_before_anything_changes(encoder):
    retriever = _build(None, encoder)
    before = set(retriever._chunks)
    bad_batches = [
        [DOCS[0], {"id": "x", "text": "  "}],
        [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}],
        [{"id": "x", "text": "a", "metadata": {"doc_id": "y"}}],
        [{"id": "x", "text": "a", "metadata": {"tags": ["a", "b"]}}],
        [{"id": "", "text": "a"}],
        [{"id": "x", "body": "a"}],
    ]
    for batch in bad_batches:
        with pytest.raises(ValueError):
            retriever.add(batch)
    assert set(retriever._chunks) == before
    _in_step(retriever)


def test_filters_apply_to_both_retrievers(encoder):
    retriever = _build(None, encoder)
    where = {"topic": "health", "year": {"$gte": 2021}}
    for method in ("hybrid", "dense", "bm25"):
        results = retriever.retrieve("医保 高血压 糖尿病 故宫", k=10, filters=where, method=method)
        assert results and {r.doc_id for r in results} == {"gxy"}
    results = retriever.retrieve("医保", k=10, filters={"doc_id": {"$in": ["gg", "jzz"]}})
    assert {r.doc_id for r in results} == {"gg", "jzz"}
    assert retriever.retrieve("医保", k=10, filters={"topic": "none"}) == []
    assert retriever.doc_ids({"topic": "health"}) == ["gxy", "tnb"]
    with pytest.raises(ValueError, match="operator"):
        retriever.retrieve("医保", filters={"year": {"$like": 1}})


def test_results_are_the_same_after_reload_in_a_new_process(tmp_path, encoder, tiny_model_dir):
    index_dir = tmp_path / "idx"
    retriever = _build(index_dir, encoder, fusion="rrf")
    retriever.delete(["gg"])
    expected = [[r.to_dict() for r in retriever.retrieve(q, k=4)] for q in QUERIES]
    script = textwrap.dedent(
        f"""
        import json
        from peg_rag import HybridRetriever
        retriever = HybridRetriever.load({str(index_dir)!r})
        print(json.dumps([[r.to_dict() for r in retriever.retrieve(q, k=4)] for q in {QUERIES!r}]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(got) == len(expected)
    for got_list, expected_list in zip(got, expected, strict=True):
        assert [r["id"] for r in got_list] == [r["id"] for r in expected_list]
        for a, b in zip(got_list, expected_list, strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-6)
            assert a["ranks"] == b["ranks"] and a["text"] == b["text"]


def test_interrupted_add_and_delete_leave_orphans_that_load_removes(tmp_path, encoder, caplog):
    index_dir = tmp_path / "idx"
    retriever = _build(index_dir, encoder)

    def crash(*_args):
        raise KeyboardInterrupt("simulated crash")

    # An add that dies after writing vectors but before committing the state.
    retriever._commit = crash
    with pytest.raises(KeyboardInterrupt):
        retriever.add([Document("late", "后来加入的文档。")])
    # A delete that dies after committing the state but before removing the vectors.
    second = HybridRetriever.load(index_dir, encoder=encoder)
    second.store.delete = crash
    with pytest.raises(KeyboardInterrupt):
        second.delete(["gxy"])

    with caplog.at_level(logging.WARNING, logger="peg_rag"):
        loaded = HybridRetriever.load(index_dir, encoder=encoder)
    assert "interrupted" in caplog.text
    assert "late" not in loaded.doc_ids() and "gxy" not in loaded.doc_ids()
    _in_step(loaded)


def test_lost_vectors_are_reported_and_repaired_on_request(tmp_path, encoder):
    index_dir = tmp_path / "idx"
    retriever = _build(index_dir, encoder)
    before = retriever.store.vectors(["gg#0"])
    retriever.store.delete(["gg#0", "yb#1"])  # the store loses data behind our back
    with pytest.raises(InconsistentIndexError, match="repair=True"):
        HybridRetriever.load(index_dir, encoder=encoder)
    repaired = HybridRetriever.load(index_dir, encoder=encoder, repair=True)
    _in_step(repaired)
    assert repaired.store.vectors(["gg#0"]) == pytest.approx(before, abs=1e-5)


def test_load_needs_the_same_encoder(tmp_path, encoder):
    from helpers import build_tiny_model

    index_dir = tmp_path / "idx"
    _build(index_dir, encoder)
    other = PEGEncoder.from_pretrained(build_tiny_model(tmp_path / "other", seed=1))
    with pytest.raises(ValueError, match="differ"):
        HybridRetriever.load(index_dir, encoder=other)
    mean_pooled = PEGEncoder.from_pretrained(encoder.name_or_path, pooling="mean")
    with pytest.raises(ValueError, match="pooling"):
        HybridRetriever.load(index_dir, encoder=mean_pooled)
    with pytest.raises(FileExistsError):
        HybridRetriever.create(index_dir, encoder, chunk_size=24)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="neither empty"):
        HybridRetriever.create(tmp_path / "busy", encoder, chunk_size=24)
    with pytest.raises(ValueError, match="max_length"):
        HybridRetriever.create(None, encoder, chunk_size=1000)


def test_beir_helpers_return_document_runs(encoder):
    corpus = {d.id: d.text for d in DOCS}
    queries = {f"q{i}": q for i, q in enumerate(QUERIES)}
    retriever = index_corpus(corpus, encoder)
    assert len(retriever) == len(corpus)  # documents are indexed whole
    runs = run_queries(retriever, queries, k=3)
    assert set(runs) == {"bm25", "dense", "hybrid"}
    assert runs["bm25"]["q1"][0] == "tnb" and runs["hybrid"]["q0"][0] == "yb"
    assert all(len(ranked) <= 3 for run in runs.values() for ranked in run.values())


@pytest.mark.slow
def test_hybrid_beats_either_retriever_alone_on_a_small_medical_set(me5_dir):
    from helpers import EVAL_DIR

    from peg_rag.core.beir import load_beir
    from peg_rag.core.metrics import retrieval_scores

    data = load_beir(EVAL_DIR / "cmedir-dev")
    qrels = dict(list(data.qrels.items())[:150])
    wanted = {d for rel in qrels.values() for d in rel}
    distractors = [d for d in data.corpus if d not in wanted][:1500]
    corpus = {d: data.corpus[d] for d in [*wanted, *distractors]}
    retriever = index_corpus(corpus, PEGEncoder.from_pretrained(me5_dir))
    runs = run_queries(retriever, {q: data.queries[q] for q in qrels}, k=10)
    ndcg = {m: retrieval_scores(run, qrels)["ndcg@10"] for m, run in runs.items()}
    assert ndcg["hybrid"] > max(ndcg["dense"], ndcg["bm25"]), ndcg
