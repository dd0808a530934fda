"""``peg-rag demo``: model lookup order, the offline fallback, indexing and answering."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import build_tiny_reranker

import peg_rag.apps.demo as demo
import peg_rag.apps.model_choice as model_choice
from peg_rag.apps.kb_model import Recipe, build_tokenizer, training_pairs
from peg_rag.apps.sample_data import kb_documents, load_sample_kb, load_sample_questions
from peg_rag.cli import main

# A fallback recipe small enough for a test: the real one trains for minutes.
TINY = Recipe(
    hidden_size=32,
    layers=1,
    heads=2,
    intermediate_size=64,
    max_length=128,
    steps=3,
    batch_size=8,
)


@pytest.fixture(autouse=True)
def no_hub_reranker(monkeypatch) -> None:
    """The hub reranker is never fetched by a test: as offline, unless a test says otherwise."""
    monkeypatch.setattr(demo, "find_pretrained", lambda name: None)


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory) -> Path:
    return build_tiny_reranker(tmp_path_factory.mktemp("demo") / "reranker")


@pytest.fixture
def offline(monkeypatch) -> None:
    """No hub model and no $PEG_RAG_MODEL: the demo must fall back."""
    monkeypatch.delenv(model_choice.ENV_MODEL, raising=False)
    monkeypatch.setattr(model_choice, "find_pretrained", lambda name=model_choice.HUB_MODEL: None)
    monkeypatch.setattr(demo, "QUICK", TINY)


def test_quick_demo_with_a_given_model_answers_and_reports_hit_at_k(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv(model_choice.ENV_MODEL, raising=False)
    args = ["demo", "--quick", "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"Model: {tiny_model_dir} (given with --model)" in out
    assert "300 passages in embedded Chroma + jieba BM25 (300 added" in out
    assert "hit@5 over 9 questions:" in out
    answered = [line for line in out.splitlines() if line[:2] in ("✓ ", "✗ ")]
    assert len(answered) == 9 and sum(line.count("[") for line in answered) == 9
    for method in ("hybrid", "dense", "bm25"):
        assert f"  {method:<7} " in out
    # Without a reranker (none given, none reachable) one line says so and how to add one.
    [notice] = [line for line in out.splitlines() if "reranker" in line.lower()]
    assert notice == (
        "No reranker: BAAI/bge-reranker-base is neither reachable on the Hugging Face Hub nor "
        "in the local cache; give --reranker MODEL (a hub id or directory) to add one."
    )
    assert "hybrid+rerank" not in out and "rerank #" not in out
    # A rerun reuses the index: nothing is embedded again.
    assert main(args) == 0
    assert (
        "(0 added, 0 replaced, 300 unchanged); relative fusion, weights dense 0.7 / BM25 0.3"
        in (capsys.readouterr().out)
    )


def test_report_counts_hits_against_gold_ids(tiny_model_dir, tmp_path):
    from peg_rag import PEGEncoder

    report = demo.run_demo(
        str(tiny_model_dir),
        load_encoder=PEGEncoder.from_pretrained,
        quick=True,
        cache=tmp_path,
        out=lambda line: None,
    )
    assert report.questions == 9 and report.k == 5
    assert set(report.hit_at_k) == {"hybrid", "dense", "bm25"}
    # The passage a question was written for shares words with it: BM25 finds most.
    assert report.hit_at_k["bm25"] >= 5 / 9
    assert all(0 <= v <= 1 for v in report.hit_at_k.values())


def test_quick_demo_with_a_reranker_reports_hit_at_k_with_and_without_it(
    tiny_model_dir, reranker_dir, tmp_path, capsys
):
    args = ["demo", "--quick", "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path)]
    assert main([*args, "--reranker", str(reranker_dir), "--rerank-top-n", "3"]) == 0
    out = capsys.readouterr().out
    assert f"Reranker: {reranker_dir} (given with --reranker)" in out
    answered = out.split("hit@5 over 9 questions:")[0]
    # Of each question's 5 answers, the first 3 are the reranked hybrid top 3.
    assert answered.count("rerank #3") == 9 and "rerank #4" not in answered
    report = out.split("hit@5 over 9 questions:")[1].splitlines()
    assert [line.split()[0] for line in report[1:5]] == ["hybrid+rerank", "hybrid", "dense", "bm25"]


def test_a_reranker_in_the_hub_cache_is_used(tiny_model_dir, reranker_dir, tmp_path, monkeypatch):
    from peg_rag import PEGEncoder

    hub = {demo.DEFAULT_RERANKER: reranker_dir}
    monkeypatch.setattr(demo, "find_pretrained", lambda name: hub.get(name))
    lines: list[str] = []
    report = demo.run_demo(
        str(tiny_model_dir),
        load_encoder=PEGEncoder.from_pretrained,
        quick=True,
        cache=tmp_path,
        out=lines.append,
    )
    found = f"Reranker: {reranker_dir} (BAAI/bge-reranker-base, Hugging Face Hub or local cache)"
    assert found in lines
    assert report.reranker == str(reranker_dir)
    assert set(report.hit_at_k) == {"hybrid+rerank", "hybrid", "dense", "bm25"}
    assert all(0 <= v <= 1 for v in report.hit_at_k.values())


def test_model_from_environment_variable(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(model_choice.ENV_MODEL, str(tiny_model_dir))
    assert main(["demo", "--quick", "--cache-dir", str(tmp_path), "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert f"(from ${model_choice.ENV_MODEL})" in out and "hit@3 over 9 questions" in out


def test_hub_model_from_the_local_cache_comes_before_the_fallback(
    tiny_model_dir, tmp_path, monkeypatch
):
    import huggingface_hub.constants as hub

    repo = tmp_path / "models--TownsWu--PEG"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(model_choice.ENV_MODEL, raising=False)
    name, how = model_choice.resolve_model(None, cache=tmp_path, recipe=TINY, out=print)
    assert Path(name) == repo / "snapshots" / ("0" * 40) and model_choice.HUB_MODEL in how


def test_fallback_trains_loudly_once_and_is_cached(offline, tmp_path, capsys):
    args = ["demo", "--quick", "--cache-dir", str(tmp_path)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "!! FALLBACK: training a small PEG model from the sample knowledge base" in captured.out
    assert "Training" in captured.err  # the trainer's progress bar
    [model_dir] = (tmp_path / "fallback-models").iterdir()
    assert {"config.json", "model.safetensors", "tokenizer.json", "modules.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    assert "(fallback trained on the knowledge base)" in captured.out
    assert "weights dense 0.3 / BM25 0.7" in captured.out  # BM25 leads a KB-only model
    assert "hit@5 over 9 questions" in captured.out
    assert main(args) == 0
    again = capsys.readouterr()
    assert "trained on the knowledge base earlier" in again.out and "!!" not in again.out
    assert "Training" not in again.err


def test_fallback_never_reads_the_questions(offline, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the fallback model must not see the sample questions")

    monkeypatch.setattr(demo, "load_sample_questions", forbidden)
    monkeypatch.setattr("peg_rag.apps.sample_data.load_sample_questions", forbidden)
    model_dir = model_choice.fallback_model(tmp_path, TINY, out=lambda line: None)
    assert (model_dir / "config.json").is_file()


def test_training_pairs_come_from_titles_and_sentences_only():
    documents = [(p.title, f"{p.title} {p.text}") for p in load_sample_kb()[:20]]
    pairs = training_pairs(documents, seed=0)
    wholes = {x for _, x in documents}
    questions = {q.text for q in load_sample_questions()}
    assert not questions & {p["query"] for p in pairs}
    titles = {t for t, _ in documents}
    assert titles <= {p["query"] for p in pairs}
    for pair in pairs:
        [positive] = pair["pos"]
        if pair["query"] in titles or positive in wholes:
            assert pair["query"] in positive
        else:  # the held-out sentence is not in its positive
            assert pair["query"] not in positive


def test_tokenizer_built_from_the_kb_covers_it(tmp_path):
    texts = [d.text for d in kb_documents()]
    tokenizer = build_tokenizer(texts, TINY)
    unk = tokenizer.unk_token_id
    assert all(unk not in ids for ids in tokenizer(texts)["input_ids"])
    assert unk not in tokenizer("？！")["input_ids"]
    assert len(tokenizer) < 5000  # characters of the KB, not all of Unicode


def test_chat_mode_answers_typed_questions_with_sources(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    typed = iter(["故宫周一开门吗", "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    args = ["demo", "--chat", "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Sources:\n[1] " in out and "hit@" not in out


@pytest.mark.slow
def test_pretrained_model_answers_most_sample_questions(me5_dir, tmp_path):
    """With a real pretrained model the sample questions are mostly answerable: the
    questions are paraphrases, but fair ones."""
    from peg_rag import PEGEncoder

    report = demo.run_demo(
        str(me5_dir), load_encoder=PEGEncoder.from_pretrained, cache=tmp_path, out=print
    )
    assert report.questions == 90
    assert report.hit_at_k["hybrid"] >= 0.9
    assert report.hit_at_k["hybrid"] >= report.hit_at_k["bm25"]


def test_no_rerank_turns_off_the_hub_reranker(tiny_model_dir, reranker_dir, tmp_path, monkeypatch):
    from peg_rag import PEGEncoder

    monkeypatch.setattr(demo, "find_pretrained", lambda name: reranker_dir)
    lines: list[str] = []
    report = demo.run_demo(
        str(tiny_model_dir),
        load_encoder=PEGEncoder.from_pretrained,
        reranker=False,
        quick=True,
        cache=tmp_path,
        out=lines.append,
    )
    assert "Reranker: off (--no-rerank)" in lines and report.reranker is None
    assert set(report.hit_at_k) == {"hybrid", "dense", "bm25"}
    args = ["demo", "--quick", "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path)]
    assert main([*args, "--no-rerank", "--reranker", str(reranker_dir)]) == 2
