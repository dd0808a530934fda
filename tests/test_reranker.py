"""Reranker: loading, scores equal to sentence-transformers' CrossEncoder, ranking, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CHINESE_TEXTS, build_tiny_model, build_tiny_reranker
from sentence_transformers import CrossEncoder

from peg_rag import Reranker
from peg_rag.core.reranker import NotACrossEncoderError

# Pairs of mixed length; some exceed the tiny model's 128 tokens, so truncation is compared too.
PAIRS = [(CHINESE_TEXTS[i], CHINESE_TEXTS[(i + 3) % 8] * (1 + 20 * (i % 3))) for i in range(8)]


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reranker(tmp_path_factory.mktemp("rerankers") / "tiny")


@pytest.fixture(scope="module")
def reranker(reranker_dir: Path) -> Reranker:
    return Reranker.from_pretrained(reranker_dir, device="cpu")


def test_logits_equal_sentence_transformers_cross_encoder(reranker, reranker_dir):
    ours = reranker.score_pairs(PAIRS)
    theirs = CrossEncoder(str(reranker_dir), activation_fn=torch.nn.Identity(), device="cpu")
    assert theirs.max_seq_length == reranker.max_length == 128
    np.testing.assert_allclose(ours, theirs.predict(PAIRS), atol=1e-5)
    # CrossEncoder's default activation for a one-logit model is the sigmoid: normalize=True.
    default = CrossEncoder(str(reranker_dir), device="cpu").predict(PAIRS)
    np.testing.assert_allclose(reranker.score_pairs(PAIRS, normalize=True), default, atol=1e-6)


def test_batch_size_and_order_do_not_change_scores(reranker):
    one = np.concatenate([reranker.score_pairs([p]) for p in PAIRS])
    np.testing.assert_allclose(reranker.score_pairs(PAIRS, batch_size=3), one, atol=1e-5)
    np.testing.assert_allclose(reranker.score_pairs(PAIRS[::-1])[::-1], one, atol=1e-5)


def test_score_and_rerank(reranker):
    query = CHINESE_TEXTS[0]
    passages = [p for _, p in PAIRS]
    scores = reranker.score(query, passages)
    ranked = reranker.rerank(query, passages)
    assert [i for i, _ in ranked] == list(np.argsort(-scores, kind="stable"))
    assert [s for _, s in ranked] == pytest.approx(sorted(scores, reverse=True), abs=1e-6)
    top = reranker.rerank(query, passages, top_n=3, normalize=True)
    assert len(top) == 3 and all(0 < s < 1 for _, s in top)
    assert [i for i, _ in top] == [i for i, _ in ranked[:3]]


def test_truncation_is_counted_and_logged(reranker, caplog):
    with caplog.at_level(logging.WARNING, logger="peg_rag"):
        reranker.score_pairs(PAIRS)
    long = sum(len(reranker.tokenizer(q, p)["input_ids"]) > reranker.max_length for q, p in PAIRS)
    assert long > 0
    assert f"{long} of 8 pairs were longer than max_length=128" in caplog.text


@pytest.mark.parametrize(
    ("pairs", "error", "message"),
    [
        ([("问", "答"), ("问", "")], ValueError, r"pairs\[1\]\[1\] is empty"),
        ([("问", "答"), (None, "答")], TypeError, r"pairs\[1\]\[0\] is NoneType"),
        ([("问", "答", "多")], TypeError, r"pairs\[0\] must be a \(query, passage\) pair"),
        (("问", "答"), TypeError, "wrap the pair in a list"),
    ],
)
def test_bad_pairs_are_named(reranker, pairs, error, message):
    with pytest.raises(error, match=message):
        reranker.score_pairs(pairs)


def test_bad_passages_and_top_n(reranker):
    with pytest.raises(ValueError, match=r"pairs\[1\]\[1\] is empty"):
        reranker.score("问", ["答", "  "])
    with pytest.raises(TypeError, match="wrap the passage in a list"):
        reranker.score("问", "答")
    with pytest.raises(ValueError, match="top_n must be >= 1"):
        reranker.rerank("问", ["答"], top_n=0)
    assert reranker.score_pairs([]).shape == (0,)


def test_an_embedding_model_is_refused_with_what_is_supported(tiny_model_dir):
    with pytest.raises(NotACrossEncoderError, match="no sequence-classification head") as info:
        Reranker.from_pretrained(tiny_model_dir)
    assert "AutoModelForSequenceClassification" in str(info.value)
    assert "peg-rag train-reranker" in str(info.value)


def test_generative_and_multi_label_models_are_refused(reranker_dir, tmp_path):
    config = json.loads((reranker_dir / "config.json").read_text())
    for architectures, labels, message in (
        (["Qwen2ForCausalLM"], 1, "LLM-based rerankers are not supported"),
        (["BertForSequenceClassification"], 3, "has 3 outputs"),
    ):
        folder = tmp_path / architectures[0]
        folder.mkdir()
        changed = {**config, "architectures": architectures}
        changed["id2label"] = {str(i): f"L{i}" for i in range(labels)}
        changed["label2id"] = {f"L{i}": i for i in range(labels)}
        (folder / "config.json").write_text(json.dumps(changed))
        with pytest.raises(NotACrossEncoderError, match=message):
            Reranker.from_pretrained(folder)


def test_max_length_is_capped_at_512_unless_set(tmp_path):
    from helpers import char_vocab
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    # A model and tokenizer that say 2048 tokens, as bge-reranker-v2-m3 says 8192.
    tokenizer = BertTokenizerFast(vocab=char_vocab(), model_max_length=2048)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=2048,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert Reranker.from_pretrained(tmp_path).max_length == 512
    assert Reranker.from_pretrained(tmp_path, max_length=1024).max_length == 1024
    with pytest.raises(ValueError, match="exceeds the model's limit of 2048"):
        Reranker.from_pretrained(tmp_path, max_length=4096)


def test_int8_scores_stay_close_and_cannot_be_saved(reranker_dir, reranker, tmp_path):
    quantized = Reranker.from_pretrained(reranker_dir, quantize="int8")
    fp32 = reranker.score_pairs(PAIRS)
    assert np.abs(quantized.score_pairs(PAIRS) - fp32).max() < 0.05
    with pytest.raises(ValueError, match="cannot be saved"):
        quantized.save_pretrained(tmp_path / "int8")


def test_a_new_head_makes_an_embedding_model_trainable(tmp_path):
    encoder_dir = build_tiny_model(tmp_path / "encoder", seed=3)
    fresh = Reranker.from_pretrained(encoder_dir, new_head=True)
    assert fresh.model.config.num_labels == 1
    assert fresh.score_pairs(PAIRS[:2]).shape == (2,)


def test_a_new_head_revives_a_blank_pooler(tmp_path):
    """An embedding checkpoint with an all-zero pooler (multilingual-e5 ships one) would give
    every pair the same logit and the encoder no gradient; a new head re-initializes it."""
    from safetensors.torch import load_file, save_file

    encoder_dir = build_tiny_model(tmp_path / "encoder", seed=3)
    weights_file = encoder_dir / "model.safetensors"
    weights = load_file(weights_file)
    kept = {k: v.clone() for k, v in weights.items() if k.startswith("pooler.")}
    assert kept, "the tiny model should have a pooler"
    save_file(
        {k: torch.zeros_like(v) if k in kept else v for k, v in weights.items()},
        weights_file,
        metadata={"format": "pt"},
    )

    torch.manual_seed(0)
    fresh = Reranker.from_pretrained(encoder_dir, new_head=True, device="cpu")
    pooler = fresh.model.base_model.pooler.dense
    assert pooler.weight.abs().max() > 0
    fresh.model.train()
    ids, types, _ = fresh.tokenize(PAIRS[:2])
    features = {"input_ids": torch.tensor([ids[0][:8], ids[1][:8]])}
    fresh.logits(features).sum().backward()
    embeddings = fresh.model.base_model.embeddings.word_embeddings.weight
    assert embeddings.grad is not None and embeddings.grad.abs().max() > 0

    # A pooler with weights is left as it is.
    save_file({**weights, **kept}, weights_file, metadata={"format": "pt"})
    same = Reranker.from_pretrained(encoder_dir, new_head=True, device="cpu")
    assert torch.equal(same.model.base_model.pooler.dense.weight, kept["pooler.dense.weight"])
