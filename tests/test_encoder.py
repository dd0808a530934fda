"""PEGEncoder: pooling, settings detection, round trips and bad input."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from helpers import CHINESE_TEXTS

from peg_rag import ModelNotFoundError, PEGEncoder
from peg_rag.core.encoder import pool
from peg_rag.core.torch_backend import sorted_batches


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return PEGEncoder.from_pretrained(tiny_model_dir, device="cpu")


def test_defaults_without_sentence_transformers_files(encoder):
    assert encoder.pooling == "cls"
    assert encoder.normalize is True
    assert encoder.query_prompt is None and encoder.passage_prompt is None
    assert encoder.max_length == 128
    assert encoder.dim == 32


@pytest.mark.parametrize("mode", ["cls", "mean"])
def test_pooling_matches_hand_computation(tiny_model_dir, mode):
    enc = PEGEncoder.from_pretrained(tiny_model_dir, pooling=mode, normalize=False, device="cpu")
    texts = ["医保报销", "高血压患者日常饮食应该注意什么"]
    got = enc.encode(texts)
    for text, row in zip(texts, got, strict=True):
        features = enc.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = enc.model(**features).last_hidden_state[0]
        expected = hidden[0] if mode == "cls" else hidden.mean(dim=0)
        np.testing.assert_allclose(row, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]


def test_vectors_are_normalized_and_order_is_kept(encoder):
    texts = ["短", "这是一个长得多的句子，用来打乱长度排序"] * 3 + ["中等长度句子"]
    vectors = encoder.encode(texts, batch_size=2)
    assert vectors.dtype == np.float32 and vectors.shape == (7, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    one_by_one = np.stack([encoder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(vectors, one_by_one, atol=1e-5)


def test_batches_are_cut_where_lengths_drop_sharply():
    lengths = [60, 512, 8, 500, 55, 12, 400]
    batches = [list(b) for b in sorted_batches(lengths, batch_size=32)]
    # 512 and 500 share a batch; 400 would be padded by 112 > 20% of 512; the short ones
    # batch freely, since their padding stays within 16 tokens.
    assert batches == [[1, 3], [6], [0, 4], [5, 2]]
    assert [list(b) for b in sorted_batches([9, 9, 9], batch_size=2)] == [[0, 1], [2]]
    assert sorted_batches([], batch_size=4) == []


def test_instructions_prefix_only_their_kind(tiny_model_dir):
    enc = PEGEncoder.from_pretrained(
        tiny_model_dir, query_prompt="查询：", passage_prompt="文档：", device="cpu"
    )
    np.testing.assert_allclose(enc.encode_queries(["血压"]), enc.encode(["查询：血压"]), atol=1e-6)
    np.testing.assert_allclose(enc.encode_passages(["血压"]), enc.encode(["文档：血压"]), atol=1e-6)
    assert not np.allclose(enc.encode_queries(["血压"]), enc.encode_passages(["血压"]))


def write_st_files(directory, *, pooling, prompts, max_seq_length=64, normalize=True):
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
            }
        )
    )
    (directory / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts}))
    (directory / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length})
    )


def test_settings_detected_from_sentence_transformers_files(tiny_model_dir, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "m")
    write_st_files(
        model_dir, pooling="mean", prompts={"query": "q: ", "document": "d: "}, normalize=False
    )
    enc = PEGEncoder.from_pretrained(model_dir, device="cpu")
    assert (enc.pooling, enc.normalize, enc.max_length) == ("mean", False, 64)
    assert (enc.query_prompt, enc.passage_prompt) == ("q: ", "d: ")
    explicit = PEGEncoder.from_pretrained(
        model_dir, pooling="cls", normalize=True, query_prompt="", max_length=32, device="cpu"
    )
    assert (explicit.pooling, explicit.normalize, explicit.max_length) == ("cls", True, 32)
    assert explicit.query_prompt == ""


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_round_trip_through_peg_and_sentence_transformers(tiny_model_dir, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    enc = PEGEncoder.from_pretrained(
        tiny_model_dir,
        pooling=pooling,
        query_prompt="问：",
        passage_prompt="答：",
        max_length=100,
        device="cpu",
    )
    enc.save_pretrained(tmp_path / "saved")
    again = PEGEncoder.from_pretrained(tmp_path / "saved", device="cpu")
    assert (again.pooling, again.max_length, again.query_prompt) == (pooling, 100, "问：")
    st = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    for kind, prompt in (("query", "query"), ("passage", "passage")):
        ours = enc.encode(CHINESE_TEXTS, kind)
        np.testing.assert_allclose(again.encode(CHINESE_TEXTS, kind), ours, atol=1e-5)
        theirs = st.encode(CHINESE_TEXTS, prompt_name=prompt)
        np.testing.assert_allclose(theirs, ours, atol=1e-5)
    assert st.max_seq_length == 100


def test_saving_after_encoding_leaves_no_truncation_in_tokenizer_json(tiny_model_dir, tmp_path):
    # Tools that read tokenizer.json directly (the tokenizers library, ONNX servers) would
    # otherwise cut every text at the length of the last encode call.
    enc = PEGEncoder.from_pretrained(tiny_model_dir, max_length=16, device="cpu")
    before = enc.encode(CHINESE_TEXTS)
    enc.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer.json").read_text(encoding="utf-8"))
    assert (saved["truncation"], saved["padding"]) == (None, None)
    np.testing.assert_allclose(enc.encode(CHINESE_TEXTS), before, atol=1e-6)


def test_empty_list_gives_empty_matrix(encoder):
    assert encoder.encode([]).shape == (0, 32)
    assert encoder.encode_queries([]).dtype == np.float32


@pytest.mark.parametrize(
    ("texts", "error", "needle"),
    [
        (["好", None], TypeError, "texts[1]"),
        (["好", 3], TypeError, "texts[1] is int"),
        (["好", "好", ""], ValueError, "texts[2]"),
        (["  \n\t"], ValueError, "texts[0]"),
        ("一个字符串", TypeError, "single string"),
    ],
)
def test_bad_texts_name_the_index(encoder, texts, error, needle):
    with pytest.raises(error) as info:
        encoder.encode(texts)
    assert needle in str(info.value)


def test_truncation_is_counted_and_warned_once_per_call(tiny_model_dir, caplog):
    enc = PEGEncoder.from_pretrained(tiny_model_dir, max_length=8, device="cpu")
    texts = ["一二三四五六七八九十", "短", "一二三四五六七八九十一二"]
    with caplog.at_level(logging.WARNING, logger="peg_rag"):
        vectors = enc.encode(texts)
        enc.encode(texts)
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 2
    assert "2 of 3 texts" in warnings[0].getMessage()
    ids, count = enc.tokenize(texts)
    assert count == 2 and max(len(row) for row in ids) == 8
    # truncation keeps the leading tokens plus [SEP]
    np.testing.assert_allclose(vectors[0], enc.encode(["一二三四五六"])[0], atol=1e-6)


def test_max_length_above_model_limit_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="exceeds the model's limit of 128"):
        PEGEncoder.from_pretrained(tiny_model_dir, max_length=4096, device="cpu")


def test_unknown_model_says_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as info:
        PEGEncoder.from_pretrained(str(missing))
    message = str(info.value)
    assert str(missing) in message and "Hugging Face Hub" in message


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        PEGEncoder.from_pretrained(tmp_path)


def test_int8_quantization_stays_close(tiny_model_dir):
    fp32 = PEGEncoder.from_pretrained(tiny_model_dir, device="cpu")
    int8 = PEGEncoder.from_pretrained(tiny_model_dir, quantize="int8", device="cpu")
    assert int8.quantized
    assert any("quantized" in type(m).__module__ for m in int8.model.modules())
    cos = (fp32.encode(CHINESE_TEXTS) * int8.encode(CHINESE_TEXTS)).sum(axis=1)
    assert cos.min() > 0.95
    with pytest.raises(ValueError, match="cannot be saved"):
        int8.save_pretrained("unused")


@pytest.mark.slow
def test_me5_matches_sentence_transformers(me5_dir):
    from sentence_transformers import SentenceTransformer

    texts = []
    with open(
        me5_dir.parents[1] / "data" / "eval" / "cmrc2018-dev" / "queries.jsonl", encoding="utf-8"
    ) as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            if len(texts) == 50:
                break
    ours = PEGEncoder.from_pretrained(me5_dir, device="cpu").encode_queries(texts)
    theirs = SentenceTransformer(str(me5_dir), device="cpu").encode(
        texts, prompt_name="query", normalize_embeddings=True
    )
    assert ours.shape == (50, 384)
    assert (ours * theirs).sum(axis=1).min() >= 0.9999
