"""``peg-rag merge``: weighted averages of tiny models built on the spot, the checks that
refuse models that cannot be merged, and the weight search on a BEIR folder built so that one
model is clearly better than the other."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CHINESE_TEXTS, build_tiny_model, char_vocab
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    BertTokenizerFast,
)

from peg_rag.cli import main
from peg_rag.core.encoder import PEGEncoder
from peg_rag.retrieval.evaluate import evaluate_folder
from peg_rag.trainer import merge_models
from peg_rag.trainer.merge import check_tensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def with_tokenizer_of(source: Path, model: torch.nn.Module, directory: Path) -> Path:
    """Save ``model`` to ``directory`` with the tokenizer of the model folder ``source``."""
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def first(root: Path, tiny_model_dir: Path) -> Path:
    """The tiny BERT saved by PEGEncoder with mean pooling, prompts and max length 64."""
    encoder = PEGEncoder.from_pretrained(
        tiny_model_dir,
        pooling="mean",
        query_prompt="问：",
        passage_prompt="答：",
        max_length=64,
        device="cpu",
    )
    encoder.save_pretrained(root / "first")
    return root / "first"


@pytest.fixture(scope="module")
def second(root: Path) -> Path:
    """Another seed: a plain Hugging Face folder with no sentence-transformers files."""
    return build_tiny_model(root / "second", seed=1)


@pytest.fixture(scope="module")
def blind(root: Path, second: Path) -> Path:
    """``second`` with every word embedding zeroed: it sees only how long a text is."""
    model = BertModel.from_pretrained(second)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.zero_()
    return with_tokenizer_of(second, model, root / "blind")


@pytest.fixture(scope="module")
def beir(root: Path) -> Path:
    """Eight 8-character documents, each the answer to a query with its own text: ``second``
    finds every one, ``blind`` cannot tell them apart."""
    folder = root / "beir"
    (folder / "qrels").mkdir(parents=True)
    texts = [text[:8] for text in CHINESE_TEXTS]
    for name, prefix in (("corpus", "d"), ("queries", "q")):
        lines = [json.dumps({"_id": f"{prefix}{i}", "text": t}) for i, t in enumerate(texts)]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    qrels = "".join(f"q{i}\td{i}\t1\n" for i in range(len(texts)))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    return folder


def test_merged_tensors_are_the_normalized_weighted_average(first, second, tmp_path):
    result = merge_models([first, second], [1, 3], tmp_path / "merged")
    assert result.weights == (0.25, 0.75) and result.metric is None and result.scores == {}
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert set(merged) == set(a) == set(b)
    for key, tensor in merged.items():
        expected = (0.25 * a[key].double() + 0.75 * b[key].double()).float()
        assert torch.equal(tensor, expected), key
    assert not [p for p in (tmp_path / "merged").iterdir() if p.suffix in (".bin", ".pt")]


def test_merged_folder_loads_with_the_first_models_settings(first, second, tmp_path):
    from sentence_transformers import SentenceTransformer

    merge_models([first, second], [0.5, 0.5], tmp_path / "merged")
    ours = PEGEncoder.from_pretrained(tmp_path / "merged", device="cpu")
    settings = (ours.pooling, ours.query_prompt, ours.passage_prompt, ours.max_length)
    assert settings == ("mean", "问：", "答：", 64)
    theirs = SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    for kind in ("query", "passage"):
        np.testing.assert_allclose(
            theirs.encode(CHINESE_TEXTS, prompt_name=kind),
            ours.encode(CHINESE_TEXTS, kind),
            atol=1e-5,
        )


def wider(root: Path, second: Path) -> Path:
    config = BertConfig.from_pretrained(second)
    config.hidden_size = 48
    return with_tokenizer_of(second, BertModel(config), root / "wider")


def masked_lm(root: Path, second: Path) -> Path:
    config = BertConfig.from_pretrained(second)
    return with_tokenizer_of(second, BertForMaskedLM(config), root / "masked-lm")


def swapped_vocab(root: Path, second: Path) -> Path:
    """``second``'s weights with a vocabulary of the same size where 'a' and 'b' trade ids."""
    vocab = char_vocab()
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    directory = root / "swapped-vocab"
    BertTokenizerFast(vocab=vocab).save_pretrained(directory)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(second / name, directory / name)
    return directory


WIDER = (
    r"tensors \(name, shape, dtype\) differ at 'embeddings.word_embeddings.weight' "
    r"\('\(21\d+, 32\) float32' vs '\(21\d+, 48\) float32'\)"
)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (wider, WIDER),
        (masked_lm, r"architectures differ at 'architectures' \(\['BertModel'\] vs \['BertForM"),
        (swapped_vocab, r"""tokenizers differ at "vocab\['a'\]" \(69 vs 70\)"""),
    ],
)
def test_refuses_models_that_differ(root, second, tmp_path, build, message):
    other = build(root, second)
    with pytest.raises(ValueError, match=message) as info:
        merge_models([second, other], [0.5, 0.5], tmp_path / "merged")
    assert f"cannot merge {second} and {other}:" in str(info.value)
    assert not (tmp_path / "merged").exists()


def test_refuses_integer_tensors_that_differ():
    first = {"w": torch.ones(2), "ids": torch.arange(3)}
    check_tensors(first, {"w": torch.zeros(2), "ids": torch.arange(3)}, ("A", "B"))
    with pytest.raises(ValueError, match="A and B: their integer tensor 'ids' differs"):
        check_tensors(first, {"w": torch.zeros(2), "ids": torch.arange(3) + 1}, ("A", "B"))


def test_refuses_a_cross_encoder(root, second, tmp_path):
    config = BertConfig.from_pretrained(second, num_labels=1)
    reranker = with_tokenizer_of(second, BertForSequenceClassification(config), root / "reranker")
    with pytest.raises(ValueError, match="reranker is a cross-encoder .*ForSequenceClassification"):
        merge_models([reranker, second], [0.5, 0.5], tmp_path / "merged")


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0], "got 1 weights for 2 models"),
        ([1.0, 1.0, 1.0], "got 3 weights for 2 models"),
        ([1.0, -0.5], r"weights must be finite numbers >= 0, got \[1.0, -0.5\]"),
        ([0.5, float("nan")], "weights must be finite numbers >= 0"),
        ([0.0, 0.0], "are all zero"),
        ("best", "weights must be numbers or 'auto', got 'best'"),
    ],
)
def test_refuses_bad_weights(first, second, tmp_path, weights, message):
    with pytest.raises(ValueError, match=message):
        merge_models([first, second], weights, tmp_path / "merged")


def test_refuses_bad_arguments_before_loading_anything(first, second, beir, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match="at least two models, got 1"):
        merge_models([first], [1.0], out)
    with pytest.raises(ValueError, match="needs validation BEIR folders"):
        merge_models([first, second], "auto", out)
    with pytest.raises(ValueError, match="used only with weights='auto'"):
        merge_models([first, second], [1, 1], out, validation=[beir])
    with pytest.raises(ValueError, match="metric must be one of .*'ndcg@10'.*got 'ndcg@5'"):
        merge_models([first, second], "auto", out, validation=[beir], metric="ndcg@5")
    with pytest.raises(ValueError, match="max_queries must be >= 1"):
        merge_models([first, second], "auto", out, validation=[beir], max_queries=0)
    with pytest.raises(ValueError, match="max_distractors must be >= 0"):
        merge_models([first, second], "auto", out, validation=[beir], max_distractors=-1)
    with pytest.raises(ValueError, match="would replace the input model"):
        merge_models([first, second], [1, 1], second, overwrite=True)
    with pytest.raises(ValueError, match="would replace the input model"):
        merge_models([first, second], [1, 1], second.parent, overwrite=True)
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge_models([first, second], [1, 1], out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_missing_or_corrupt_weights_file_is_named(first, second, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(second, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"cannot load model {broken}: .*deserializ"):
        merge_models([first, broken], [1, 1], tmp_path / "merged")
    weights.unlink()
    with pytest.raises(ValueError, match=f"cannot load model {broken}: .*model.safetensors"):
        merge_models([first, broken], [1, 1], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_auto_weights_keep_the_model_that_retrieves(second, blind, beir, tmp_path):
    result = merge_models(
        [second, blind], "auto", tmp_path / "merged", validation=[beir], max_length=16, device="cpu"
    )
    grid = [((10 - t) / 10, t / 10) for t in range(11)]
    assert list(result.scores) == grid  # the weight of the last model from 0 to 1
    assert result.weights == (1.0, 0.0) and result.metric == "ndcg@10"
    assert result.scores[1.0, 0.0] == 1.0 > result.scores[0.0, 1.0]
    assert result.set_scores[0.0, 1.0] == {"beir": result.scores[0.0, 1.0]}
    assert "| 1.0 | 0.0 | 100.00 | 100.00 | chosen |" in result.table()
    assert 0 < result.search_seconds < result.seconds
    saved = PEGEncoder.from_pretrained(tmp_path / "merged", device="cpu")
    assert saved.max_length == 128  # the first model's, not the search's
    assert evaluate_folder(saved, beir)["ndcg@10"] == 1.0
    # A candidate scored in memory scores the same once written and loaded again.
    merge_models([second, blind], [0.1, 0.9], tmp_path / "mix")
    mix = PEGEncoder.from_pretrained(tmp_path / "mix", device="cpu")
    assert evaluate_folder(mix, beir)["ndcg@10"] == result.scores[0.1, 0.9] < 1.0


def test_auto_weights_of_four_models_climb_from_the_best_single_model(
    second, blind, beir, tmp_path
):
    result = merge_models(
        [blind, second, blind, blind],
        "auto",
        tmp_path / "merged",
        validation=[beir],
        max_queries=4,
        device="cpu",
    )
    singles = [(1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0)]
    singles.append((0.0, 0.0, 0.0, 1.0))
    moves = [(0.1, 0.9, 0.0, 0.0), (0.0, 0.9, 0.1, 0.0), (0.0, 0.9, 0.0, 0.1)]
    # No move beats the second model alone (they tie), so the climb stops there.
    assert list(result.scores) == singles + moves
    assert result.weights == (0.0, 1.0, 0.0, 0.0)


def test_command_line(first, second, tmp_path, capsys):
    out = tmp_path / "merged"
    args = ["merge", str(first), str(second), "--weights", "1", "3", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    wrote = f"wrote {out}: 0.25 {first}, 0.75 {second}"
    assert re.search(f"{re.escape(wrote)} \\([0-9.]+ s\\)\n", printed)
    assert PEGEncoder.from_pretrained(out, device="cpu").pooling == "mean"
    assert main(args) == 2  # the output exists now
    assert "merge: error: " in capsys.readouterr().err
    assert main([*args[:4], "half", "half", *args[6:], "--overwrite"]) == 2
    assert "--weights takes numbers or 'auto', got half half" in capsys.readouterr().err
    search = ["--weights", "auto", "--validation", str(tmp_path), "--max-distractors", "-1"]
    assert main([*args[:3], *search, *args[6:], "--overwrite"]) == 2
    assert "max_distractors must be >= 0 (or None: all), got -1" in capsys.readouterr().err


def test_command_line_auto_prints_the_search_time(second, blind, beir, tmp_path, capsys):
    out = tmp_path / "merged"
    args = ["merge", str(second), str(blind), "--weights", "auto", "--output", str(out)]
    assert main([*args, "--validation", str(beir), "--max-length", "16", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| 1.0 | 0.0 | 100.00 | 100.00 | chosen |" in printed
    timing = re.search(r"\(([0-9.]+) s, of which ([0-9.]+) s scoring 11 candidates\)", printed)
    assert timing and float(timing[2]) <= float(timing[1])
