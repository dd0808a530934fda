"""What peg-rag 0.1 wrote still loads, and its renamed names still work, with a warning."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peg_rag import HybridRetriever, PEGEncoder
from peg_rag.cli import main
from peg_rag.trainer import make_config

V01 = Path(__file__).parent / "data" / "v0.1"


@pytest.fixture
def v01(tmp_path: Path) -> Path:
    """A copy: loading an index may tidy it, and the committed one must stay as 0.1 wrote it."""
    return Path(shutil.copytree(V01, tmp_path / "v0.1"))


def test_a_model_saved_by_0_1_loads_with_its_settings(v01):
    encoder = PEGEncoder.from_pretrained(v01 / "model")
    assert (encoder.pooling, encoder.query_prompt, encoder.passage_prompt) == (
        "mean",
        "query: ",
        "passage: ",
    )


def test_an_index_written_by_0_1_loads_and_answers_as_it_did(v01):
    expected = json.loads((v01 / "expected.json").read_text(encoding="utf-8"))["results"]
    retriever = HybridRetriever.load(
        v01 / "index", encoder=PEGEncoder.from_pretrained(v01 / "model")
    )
    assert len(retriever) == 4 and retriever.encoder_settings["query_prompt"] == "query: "
    for query, results in expected.items():
        found = retriever.retrieve(query, k=3)
        assert [r.id for r in found] == [r["id"] for r in results]
        assert [{k: r.ranks[k] for k in ("dense", "bm25")} for r in found] == [
            r["ranks"] for r in results
        ]
        assert all(r.ranks["rerank"] is None for r in found)  # no reranker: no such stage
        assert [r.score for r in found] == pytest.approx([r["score"] for r in results], abs=1e-5)
    # It keeps working after a write by this version.
    retriever.delete(["ly-1"])
    again = HybridRetriever.load(v01 / "index", encoder=retriever.encoder)
    assert sorted(again.doc_ids()) == ["yb-1", "yb-2", "zw-1"]


def test_old_prompt_arguments_warn_and_still_apply(v01):
    with pytest.warns(DeprecationWarning, match="'query_instruction' is deprecated"):
        encoder = PEGEncoder.from_pretrained(v01 / "model", query_instruction="问：")
    assert encoder.query_prompt == "问："
    with pytest.warns(DeprecationWarning, match="use 'passage_prompt'"):
        assert encoder.passage_instruction == "passage: "
    with pytest.raises(TypeError, match="give 'query_prompt' only"):
        PEGEncoder.from_pretrained(v01 / "model", query_instruction="a", query_prompt="b")


def test_old_training_key_warns_and_maps(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"query": "问", "pos": ["答"]}\n', encoding="utf-8")
    with pytest.warns(DeprecationWarning, match="'query_instruction' is deprecated"):
        config = make_config(
            model="m", train=[str(data)], output_dir=str(tmp_path), query_instruction="问："
        )
    assert config.query_prompt == "问："


def test_old_cli_flag_warns_and_applies(v01, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "医保报销"}\n', encoding="utf-8")
    common = ["encode", str(texts), "--kind", "query", "--model", str(v01 / "model")]
    with pytest.warns(DeprecationWarning, match="'--query-instruction' is deprecated"):
        assert main([*common, "--query-instruction", "", "--output", str(tmp_path / "a.npy")]) == 0
    assert main([*common, "--query-prompt", "", "--output", str(tmp_path / "b.npy")]) == 0
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()


def test_old_integration_field_warns_and_maps(v01):
    from peg_rag.integrations.langchain import PEGEmbeddings

    with pytest.warns(DeprecationWarning, match="use 'query_prompt'"):
        embeddings = PEGEmbeddings(model_name=str(v01 / "model"), query_instruction="问：")
    assert embeddings.query_prompt == "问：" == embeddings.encoder.query_prompt


def test_old_evaluation_module_warns_and_is_the_new_one():
    code = (
        "import warnings\nwarnings.simplefilter('error')\n"
        "try:\n    import peg_rag.trainer.evaluate\nexcept DeprecationWarning as w:\n    print(w)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "use 'peg_rag.retrieval.evaluate'" in result.stdout
    with pytest.warns(DeprecationWarning):
        sys.modules.pop("peg_rag.trainer.evaluate", None)
        import peg_rag.trainer.evaluate as old
    from peg_rag.retrieval.evaluate import evaluate_folder

    assert old.evaluate_folder is evaluate_folder
