"""``peg-rag export``: a model folder with ONNX files in sentence-transformers' layout, which
sentence-transformers (torch backend), ONNX Runtime itself and ``backend="onnx"`` all load
with the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CHINESE_TEXTS, build_tiny_reranker
from transformers import PreTrainedTokenizerFast

from peg_rag import PEGEncoder, Reranker
from peg_rag.cli import main
from peg_rag.core.cache import ENV_CACHE
from peg_rag.core.onnx_backend import cpu_isa
from peg_rag.core.torch_backend import collate

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

PAIRS = [(CHINESE_TEXTS[i], CHINESE_TEXTS[(i + 5) % 8]) for i in range(8)]
INT8 = f"onnx/model_qint8_{cpu_isa()[0]}.onnx"


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    """Exports never go through the cache: it stays empty."""
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / "cache"))
    yield
    assert not (tmp_path / "cache").exists()


def tokenizer_class(folder: Path) -> str:
    return json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"]


def run_onnx(path: Path, features: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of the ONNX file, run by onnxruntime itself."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = {name: features.get(name, np.zeros_like(features["input_ids"])) for name in names}
    return session.run(None, feed)[0]


def test_an_exported_encoder_loads_everywhere_with_the_same_vectors(tiny_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    source = tmp_path / "source"  # mean pooling and prompts, written as sentence-transformers files
    PEGEncoder.from_pretrained(
        tiny_model_dir, device="cpu", pooling="mean", query_prompt="查询：", passage_prompt="文档："
    ).save_pretrained(source)
    # transformers 5's generic tokenizer class, which transformers 4 cannot load by that name
    PreTrainedTokenizerFast.from_pretrained(source).save_pretrained(source)
    assert tokenizer_class(source) == "TokenizersBackend"
    out = tmp_path / "exported"
    assert main(["export", str(source), "--output", str(out), "--quantize", "int8"]) == 0
    for name in ("config.json", "model.safetensors", "modules.json", "onnx/model.onnx", INT8):
        assert (out / name).is_file(), name
    assert tokenizer_class(out) == "PreTrainedTokenizerFast"  # the name both versions read
    expected = PEGEncoder.from_pretrained(source, device="cpu").encode_queries(CHINESE_TEXTS)

    st = SentenceTransformer(str(out), device="cpu")
    theirs = st.encode(CHINESE_TEXTS, prompt_name="query", normalize_embeddings=True)
    np.testing.assert_allclose(theirs, expected, atol=1e-5)

    onnx = PEGEncoder.from_pretrained(out, backend="onnx")
    assert onnx.model.path == out / "onnx" / "model.onnx"
    assert (onnx.encode_queries(CHINESE_TEXTS) * expected).sum(axis=1).min() >= 0.9999

    encoder = PEGEncoder.from_pretrained(out, device="cpu")
    ids, _ = encoder.tokenize(CHINESE_TEXTS, "query")
    batch = encoder.collate(ids)
    features = {k: v.numpy() for k, v in batch.items()}
    with torch.inference_mode():
        hidden = encoder.model(**batch).last_hidden_state.numpy()
    mask = features["attention_mask"].astype(bool)
    for name, atol in (("onnx/model.onnx", 1e-4), (INT8, 0.1)):
        got = run_onnx(out / name, features)
        np.testing.assert_allclose(got[mask], hidden[mask], atol=atol)


def test_an_exported_reranker_scores_the_same(tmp_path):
    from sentence_transformers import CrossEncoder

    source = build_tiny_reranker(tmp_path / "reranker")
    out = tmp_path / "exported"
    assert main(["export", str(source), "--output", str(out)]) == 0
    assert (out / "onnx" / "model.onnx").is_file() and not (out / INT8).exists()
    reranker = Reranker.from_pretrained(out, device="cpu")
    expected = reranker.score_pairs(PAIRS)
    crossencoder = CrossEncoder(str(out), activation_fn=torch.nn.Identity(), device="cpu")
    np.testing.assert_allclose(crossencoder.predict(PAIRS), expected, atol=1e-5)
    onnx = Reranker.from_pretrained(out, backend="onnx")
    assert onnx.model.path == out / "onnx" / "model.onnx"
    np.testing.assert_allclose(onnx.score_pairs(PAIRS), expected, atol=1e-4)
    ids, types, _ = reranker.tokenize(PAIRS)
    batch = collate(ids, reranker.tokenizer.pad_token_id, torch.device("cpu"), types)
    logits = run_onnx(out / "onnx" / "model.onnx", {k: v.numpy() for k, v in batch.items()})
    np.testing.assert_allclose(logits[:, 0], expected, atol=1e-4)


def test_export_refuses_to_overwrite_without_being_asked(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    assert main(["export", str(tiny_model_dir), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text(encoding="utf-8") == "mine"
