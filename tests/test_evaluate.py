"""Evaluation on a tiny BEIR folder and a pairs file, through the library and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from peg_rag.cli import main
from peg_rag.core.beir import load_pairs
from peg_rag.core.encoder import PEGEncoder
from peg_rag.retrieval.evaluate import (
    evaluate_folder,
    load_set,
    pair_spearman,
    sample_set,
    score_set,
)

DOCS = [
    "医保报销需要准备身份证和医保卡",
    "高血压患者要少吃盐多运动",
    "故宫每天早上八点半开门",
    "居住证可以在网上续签",
    "糖尿病人少量吃西瓜没有问题",
    "异地就医要先在网上备案",
    "长城的慕田峪段适合徒步",
    "个税汇算在六月底截止",
]


def write_beir(folder: Path, queries: dict[str, str], qrels: list[tuple[str, str, int]]) -> Path:
    (folder / "qrels").mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w", encoding="utf-8") as handle:
        for i, text in enumerate(DOCS):
            handle.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
    with (folder / "queries.jsonl").open("w", encoding="utf-8") as handle:
        for qid, text in queries.items():
            handle.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{g}" for q, d, g in qrels]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return PEGEncoder.from_pretrained(tiny_model_dir, device="cpu", pooling="mean")


def rank_of(encoder, query: str, doc: int) -> int:
    """1-based rank of DOCS[doc] for ``query`` by brute force (ties to the lower index)."""
    scores = encoder.encode(DOCS, "passage") @ encoder.encode([query], "query")[0]
    return 1 + int((scores > scores[doc]).sum() + (scores[:doc] == scores[doc]).sum())


def test_evaluate_folder_beir(tmp_path, encoder):
    # q0 is d0's own text, so d0 ranks first; q1's relevant d3 ranks wherever the model says.
    queries = {"q0": DOCS[0], "q1": "网上怎么办理", "q2": "没有被评判的问题"}
    folder = write_beir(tmp_path / "tiny", queries, [("q0", "d0", 2), ("q1", "d3", 1)])
    scores = evaluate_folder(encoder, folder)
    rank = rank_of(encoder, queries["q1"], 3)
    assert set(scores) == {"ndcg@10", "mrr@10", "recall@10", "recall@100"}
    assert scores["mrr@10"] == pytest.approx((1 + 1 / rank) / 2)
    assert scores["ndcg@10"] == pytest.approx((1 + 1 / np.log2(rank + 1)) / 2)
    assert scores["recall@10"] == scores["recall@100"] == 1.0  # only 8 documents


def test_evaluate_folder_rejects_unknown_query(tmp_path, encoder):
    folder = write_beir(tmp_path / "bad", {"q0": DOCS[0]}, [("q0", "d0", 1), ("q9", "d1", 1)])
    with pytest.raises(ValueError, match="lacks, e.g. \\['q9'\\]"):
        evaluate_folder(encoder, folder)


def test_sample_set_keeps_sampled_judged_queries_their_passages_and_some_others(tmp_path):
    queries = {f"q{i}": DOCS[i] for i in range(5)}
    # q4 is judged nothing relevant; d5, judged 0 for q0, is a distractor like any other.
    qrels = [(f"q{i}", f"d{i}", 1) for i in range(4)] + [("q4", "d4", 0), ("q0", "d5", 0)]
    data = load_set(write_beir(tmp_path / "beir", queries, qrels))
    whole = sample_set(data)
    assert set(whole.queries) == {"q0", "q1", "q2", "q3"} and whole.corpus == data.corpus
    cut = sample_set(data, 2, 3, seed=0)
    relevant = {d for rel in cut.qrels.values() for d, grade in rel.items() if grade > 0}
    assert len(cut.queries) == 2 and set(cut.qrels) == set(cut.queries) and len(relevant) == 2
    assert relevant < set(cut.corpus) and len(cut.corpus) == 2 + 3
    assert all(cut.corpus[d] == data.corpus[d] for d in cut.corpus)
    assert sample_set(data, 2, 3, seed=0) == cut  # seeded
    assert len({frozenset(sample_set(data, 2, seed=s).queries) for s in range(20)}) > 1
    assert set(sample_set(data, 2, 0, seed=0).corpus) == relevant
    assert sample_set(data, 2, 6, seed=0).corpus == data.corpus  # 6 others: all of them
    with pytest.raises(ValueError, match="max_queries must be >= 1"):
        sample_set(data, 0)
    with pytest.raises(ValueError, match="max_distractors must be >= 0"):
        sample_set(data, None, -1)


def test_pair_spearman_follows_cosine_order(tmp_path, encoder):
    left, right = DOCS[:6], DOCS[2:8]
    cosine = (encoder.encode(left, "query") * encoder.encode(right, "query")).sum(axis=1)
    gold = np.argsort(np.argsort(cosine))  # gold grades in the same order as the cosines
    folder = tmp_path / "sts"
    folder.mkdir()
    rows = ["s1\ts2\tscore"] + [f"{a}\t{b}\t{g}" for a, b, g in zip(left, right, gold, strict=True)]
    (folder / "pairs.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert evaluate_folder(encoder, folder) == {"spearman": pytest.approx(1.0)}
    rows = ["s1\ts2\tscore"] + [
        f"{a}\t{b}\t{-g}" for a, b, g in zip(left, right, gold, strict=True)
    ]
    (folder / "pairs.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert pair_spearman(encoder, load_pairs(folder / "pairs.tsv")) == pytest.approx(-1.0)


def test_cli_json_and_markdown(tmp_path, tiny_model_dir, capsys):
    beir = write_beir(
        tmp_path / "tiny-beir", {"q0": DOCS[0], "q1": DOCS[5]}, [("q0", "d0", 1), ("q1", "d5", 1)]
    )
    sts = tmp_path / "tiny-sts"
    sts.mkdir()
    (sts / "pairs.tsv").write_text(
        "s1\ts2\tscore\n"
        + "".join(
            f"{a}\t{b}\t{i}\n" for i, (a, b) in enumerate(zip(DOCS[:4], DOCS[4:], strict=True))
        ),
        encoding="utf-8",
    )
    out, table = tmp_path / "results.json", tmp_path / "table.md"
    argv = [
        "eval",
        str(beir),
        str(sts / "pairs.tsv"),
        "--model",
        str(tiny_model_dir),
        "--pooling",
        "mean",
        "--device",
        "cpu",
        "--output",
        str(out),
        "--markdown",
        str(table),
    ]
    assert main(argv) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["scale"] == "fraction"
    dense = report["results"]["tiny-beir"]["dense"]
    assert dense == {"ndcg@10": 1.0, "mrr@10": 1.0, "recall@10": 1.0, "recall@100": 1.0}
    rho = report["results"]["tiny-sts"]["dense"]["spearman"]
    lines = table.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "| set | method | nDCG@10 | MRR@10 | Recall@10 | Recall@100 | Spearman |"
    assert lines[2] == "| tiny-beir | dense | 100.00 | 100.00 | 100.00 | 100.00 |  |"
    assert lines[3] == f"| tiny-sts | dense |  |  |  |  | {100 * rho:.2f} |"
    assert capsys.readouterr().out.splitlines() == lines


def test_cli_bad_input_fails_before_loading_the_model(tmp_path, capsys):
    folder = write_beir(tmp_path / "bad", {"q0": DOCS[0]}, [("q0", "d0", 1)])
    (folder / "queries.jsonl").write_text('{"_id": "q0"}\n', encoding="utf-8")
    assert main(["eval", str(folder), "--model", str(tmp_path / "no-such-model")]) == 2
    assert "queries.jsonl:1: field 'text': missing" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--model", str(tmp_path / "no-such-model")]) == 2
    assert "is not a BEIR folder" in capsys.readouterr().err
    folder = write_beir(tmp_path / "unjudged", {"q0": DOCS[0]}, [("q9", "d0", 1)])
    assert main(["eval", str(folder), "--model", str(tmp_path / "no-such-model")]) == 2
    assert "lacks, e.g. ['q9']" in capsys.readouterr().err


def test_bm25_and_hybrid_through_the_hybrid_retriever(tmp_path, encoder):
    # "故宫开门" shares words with d2 only; "护照签证" with no document, so BM25 misses it.
    queries = {"q0": "故宫开门", "q1": "护照签证"}
    folder = write_beir(tmp_path / "lex", queries, [("q0", "d2", 1), ("q1", "d1", 1)])
    scores = score_set(encoder, load_set(folder), ["bm25", "hybrid", "dense"])
    assert list(scores) == ["bm25", "hybrid", "dense"]
    assert scores["bm25"] == {"ndcg@10": 0.5, "mrr@10": 0.5, "recall@10": 0.5, "recall@100": 0.5}
    assert scores["hybrid"]["recall@100"] == 1.0  # the dense half returns every document
    assert scores["dense"] == evaluate_folder(encoder, folder)
