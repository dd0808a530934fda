"""backend="onnx": ONNX Runtime runs the torch backend's batches, from the model folder's ONNX
files or from an export cached once per model, CPU and version."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CHINESE_TEXTS, EVAL_DIR, build_tiny_model, build_tiny_reranker

from peg_rag import HybridRetriever, PEGEncoder, Reranker
from peg_rag.cli import main
from peg_rag.core import onnx_backend
from peg_rag.core.cache import ENV_CACHE
from peg_rag.core.onnx_backend import InferenceOnlyError, OnnxFileError

onnx = pytest.importorskip("onnx")

LONG = "医保报销流程说明：" + "参保人员需携带身份证和医保卡到窗口办理。" * 12  # over 128 tokens
TEXTS = [*CHINESE_TEXTS, LONG, "短"]
PAIRS = [(CHINESE_TEXTS[i], CHINESE_TEXTS[(i + 3) % 8] * (1 + 20 * (i % 3))) for i in range(8)]
ISA = onnx_backend.cpu_isa()[0]


def op_counts(path: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module", autouse=True)
def onnx_cache(tmp_path_factory: pytest.TempPathFactory):
    """One cache for the module, so each tiny model is exported once."""
    path = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_CACHE, str(path))
        yield path


@pytest.fixture(scope="module")
def torch_encoder(tiny_model_dir):
    return PEGEncoder.from_pretrained(tiny_model_dir, device="cpu", query_prompt="查询：")


@pytest.fixture(scope="module")
def onnx_encoder(tiny_model_dir):
    return PEGEncoder.from_pretrained(tiny_model_dir, backend="onnx", query_prompt="查询：")


@pytest.fixture(scope="module")
def int8_encoder(tiny_model_dir, onnx_encoder):
    return PEGEncoder.from_pretrained(
        tiny_model_dir, backend="onnx", quantize="int8", query_prompt="查询："
    )


def spread_head(reranker: Reranker, target: Path) -> Path:
    """Save ``reranker`` with a random pooler and head, so that pairs get distinct scores
    (a fresh head scores every pair about alike, and me5-small-zh's pooler is all zeros)."""
    torch.manual_seed(0)
    for name, parameter in reranker.model.named_parameters():
        if "pooler" in name or "classifier" in name:
            torch.nn.init.normal_(parameter, std=1.0)
    reranker.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = build_tiny_reranker(tmp_path_factory.mktemp("rerankers") / "tiny")
    return spread_head(Reranker.from_pretrained(source, device="cpu"), source.parent / "spread")


def test_vectors_and_settings_match_torch(torch_encoder, onnx_encoder):
    for key in ("pooling", "normalize", "query_prompt", "passage_prompt", "max_length", "dim"):
        assert getattr(onnx_encoder, key) == getattr(torch_encoder, key)
    for kind in ("query", "passage", None):
        ours = onnx_encoder.encode(TEXTS, kind, batch_size=3)
        assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 32)
        assert cosines(ours, torch_encoder.encode(TEXTS, kind, batch_size=3)).min() >= 0.9999
    assert onnx_encoder.load_options == {
        "backend": "onnx",
        "device": "cpu",
        "dtype": "float32",
        "quantize": None,
        "trust_remote_code": False,
    }
    assert torch_encoder.load_options["backend"] == "torch"


def test_mean_pooling_without_normalization_matches_torch(tiny_model_dir, torch_encoder):
    options = {"pooling": "mean", "normalize": False}
    ours = PEGEncoder.from_pretrained(tiny_model_dir, backend="onnx", **options).encode(TEXTS)
    theirs = PEGEncoder.from_pretrained(tiny_model_dir, device="cpu", **options).encode(TEXTS)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_attention_and_layer_norms_are_fused(onnx_encoder, int8_encoder):
    layers = onnx_encoder.model.config.num_hidden_layers
    fused = op_counts(onnx_encoder.model.path)
    assert fused["Attention"] == layers and fused["SkipLayerNormalization"] == 2 * layers
    assert fused["EmbedLayerNormalization"] == 1
    assert fused["BiasGelu"] == layers  # exact GELU, its bias folded in
    quantized = op_counts(int8_encoder.model.path)
    assert quantized["QAttention"] == layers and quantized["MatMulInteger"] >= 2 * layers


def test_int8_stays_close(torch_encoder, int8_encoder):
    assert int8_encoder.quantized and int8_encoder.load_options["quantize"] == "int8"
    assert int8_encoder.model.path.name == f"model_qint8_{ISA}.onnx"
    assert (
        cosines(int8_encoder.encode_queries(TEXTS), torch_encoder.encode_queries(TEXTS)).min()
        >= 0.98
    )


@pytest.mark.parametrize(
    ("texts", "error"),
    [
        (["ok", None], TypeError),
        (["ok", "  "], ValueError),
        ("one text", TypeError),
        ([1], TypeError),
    ],
)
def test_bad_input_fails_as_on_torch(torch_encoder, onnx_encoder, texts, error):
    with pytest.raises(error) as theirs:
        torch_encoder.encode(texts)
    with pytest.raises(error) as ours:
        onnx_encoder.encode(texts)
    assert str(ours.value) == str(theirs.value)
    assert onnx_encoder.encode([]).shape == (0, 32)


def test_truncation_is_counted_as_on_torch(tiny_model_dir, caplog):
    logs = []
    for backend in ("torch", "onnx"):
        encoder = PEGEncoder.from_pretrained(tiny_model_dir, backend=backend, max_length=16)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="peg_rag"):
            vectors = encoder.encode(TEXTS)
        logs.append([r.getMessage() for r in caplog.records])
        assert vectors.shape == (len(TEXTS), 32)
    assert logs[0] == logs[1] and "were truncated" in logs[0][0]


def test_inference_only(onnx_encoder, tmp_path):
    onnx_encoder.model.eval()  # what batching does: fine
    with pytest.raises(InferenceOnlyError, match="backend='torch' to train"):
        onnx_encoder.model.train()
    with pytest.raises(InferenceOnlyError):
        next(onnx_encoder.model.parameters())
    with pytest.raises(ValueError, match="inference-only and cannot be saved"):
        onnx_encoder.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_runtime_options_are_checked(tiny_model_dir, reranker_dir):
    with pytest.raises(ValueError, match="runs on the CPU"):
        PEGEncoder.from_pretrained(tiny_model_dir, backend="onnx", device="cuda")
    with pytest.raises(ValueError, match="runs float32"):
        PEGEncoder.from_pretrained(tiny_model_dir, backend="onnx", dtype="bfloat16")
    with pytest.raises(ValueError, match="backend must be one of"):
        PEGEncoder.from_pretrained(tiny_model_dir, backend="tensorrt")
    with pytest.raises(ValueError, match="inference-only"):
        Reranker.from_pretrained(tiny_model_dir, backend="onnx", new_head=True)


def test_a_second_load_reuses_the_cache(tiny_model_dir, onnx_encoder, monkeypatch):
    path = onnx_encoder.model.path
    before = path.stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_backend, "_export", no_export)
    again = PEGEncoder.from_pretrained(tiny_model_dir, backend="onnx")
    assert again.model.path == path and path.stat().st_mtime_ns == before


def test_a_changed_model_is_exported_again(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / "cache"))
    model_dir = build_tiny_model(tmp_path / "model", seed=0)
    old = PEGEncoder.from_pretrained(model_dir, backend="onnx")
    old_vectors = old.encode(CHINESE_TEXTS)
    build_tiny_model(model_dir, seed=1)  # same names and sizes, new weights
    new = PEGEncoder.from_pretrained(model_dir, backend="onnx")
    assert new.model.path != old.model.path
    assert len(list((tmp_path / "cache" / "onnx").iterdir())) == 2
    expected = PEGEncoder.from_pretrained(model_dir, device="cpu").encode(CHINESE_TEXTS)
    assert cosines(new.encode(CHINESE_TEXTS), expected).min() >= 0.9999
    assert cosines(old_vectors, expected).min() < 0.99


def test_a_kill_mid_export_leaves_no_entry(tiny_model_dir, tmp_path):
    # The child SIGKILLs itself once the exporter has written its graph, before fusion.
    probe = (
        "import os, signal\nfrom peg_rag import PEGEncoder\nfrom peg_rag.core import onnx_backend\n"
        "onnx_backend._optimize = lambda *args: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"PEGEncoder.from_pretrained({str(tiny_model_dir)!r}, backend='onnx')"
    )
    env = {**os.environ, ENV_CACHE: str(tmp_path)}
    assert subprocess.run([sys.executable, "-c", probe], env=env).returncode == -9
    root = tmp_path / "onnx"
    assert [p.name.startswith(".") and ".tmp-" in p.name for p in root.iterdir()] == [True]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_CACHE, str(tmp_path))
        encoder = PEGEncoder.from_pretrained(tiny_model_dir, backend="onnx")
    assert [p.name for p in root.iterdir()] == [encoder.model.path.parent.name]


def test_a_truncated_cache_file_is_named(tiny_model_dir, onnx_cache, onnx_encoder, tmp_path):
    copy = shutil.copytree(onnx_cache, tmp_path / "cache")
    path = copy / onnx_encoder.model.path.relative_to(onnx_cache)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_CACHE, str(copy))
        with pytest.raises(OnnxFileError, match="truncated") as error:
            PEGEncoder.from_pretrained(tiny_model_dir, backend="onnx")
    assert str(path) in str(error.value) and f"Delete {path.parent}" in str(error.value)


def test_the_folders_own_files_are_used_as_they_are(
    tiny_model_dir, onnx_encoder, int8_encoder, tmp_path, monkeypatch
):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model_dir / "onnx").mkdir()
    shutil.copy(onnx_encoder.model.path, model_dir / "onnx" / "model.onnx")
    shutil.copy(int8_encoder.model.path, model_dir / "onnx" / f"model_qint8_{ISA}.onnx")
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / "cache"))
    fp32 = PEGEncoder.from_pretrained(model_dir, backend="onnx", query_prompt="查询：")
    int8 = PEGEncoder.from_pretrained(model_dir, backend="onnx", quantize="int8")
    assert fp32.model.path == model_dir / "onnx" / "model.onnx"
    assert int8.model.path == model_dir / "onnx" / f"model_qint8_{ISA}.onnx"
    assert not (tmp_path / "cache").exists()
    np.testing.assert_allclose(fp32.encode_queries(TEXTS), onnx_encoder.encode_queries(TEXTS))
    (model_dir / "onnx" / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(OnnxFileError, match="corrupt") as error:
        PEGEncoder.from_pretrained(model_dir, backend="onnx")
    assert str(model_dir / "onnx" / "model.onnx") in str(error.value)


def test_sentence_transformers_avx2_int8_file_is_used(
    tiny_model_dir, int8_encoder, tmp_path, monkeypatch
):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model_dir / "onnx").mkdir()
    theirs = model_dir / "onnx" / "model_quint8_avx2.onnx"  # its name for AVX2 int8 weights
    shutil.copy(int8_encoder.model.path, theirs)
    monkeypatch.setattr(onnx_backend, "cpu_isa", lambda: ("avx2", ("x86_64", "avx2")))
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / "cache"))
    int8 = PEGEncoder.from_pretrained(model_dir, backend="onnx", quantize="int8")
    assert int8.model.path == theirs and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("blocked", ["onnxruntime", "onnx"])
def test_a_missing_extra_names_the_pip_command(tiny_model_dir, tmp_path, blocked):
    # None in sys.modules makes an import fail as if the package were not installed; an
    # empty cache makes the load export, which needs onnx.
    probe = (
        f"import sys\nsys.modules[{blocked!r}] = None\nfrom peg_rag import PEGEncoder\n"
        f"PEGEncoder.from_pretrained({str(tiny_model_dir)!r}, backend='onnx')"
    )
    env = {**os.environ, ENV_CACHE: str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "MissingExtraError: " in result.stderr
    assert 'pip install "peg-rag[onnx]"' in result.stderr


def test_reranker_scores_match_torch(reranker_dir):
    theirs = Reranker.from_pretrained(reranker_dir, device="cpu")
    ours = Reranker.from_pretrained(reranker_dir, backend="onnx", batch_size=3)
    int8 = Reranker.from_pretrained(reranker_dir, backend="onnx", quantize="int8")
    expected = theirs.score_pairs(PAIRS)
    assert np.ptp(expected) > 0.05  # scores that differ, so that matching them means something
    np.testing.assert_allclose(ours.score_pairs(PAIRS), expected, atol=1e-4)
    # A random tiny BERT gives every [CLS] almost the same state, so int8's rounding is of the
    # order of the spread here; test_me5_reranker_scores_match checks int8's ranking.
    np.testing.assert_allclose(int8.score_pairs(PAIRS), expected, atol=0.2)
    query, passages = PAIRS[0][0], [p for _, p in PAIRS]
    assert [i for i, _ in ours.rerank(query, passages)] == [
        i for i, _ in theirs.rerank(query, passages)
    ]
    layers = ours.model.config.num_hidden_layers
    fused = op_counts(ours.model.path)
    assert fused["Attention"] == layers and fused["SkipLayerNormalization"] == 2 * layers
    assert ours.load_options["backend"] == "onnx" and int8.quantized
    for bad, error in (([("q", "")], ValueError), ([("q",)], TypeError)):
        with pytest.raises(error) as expected_error:
            theirs.score_pairs(bad)
        with pytest.raises(error) as got:
            ours.score_pairs(bad)
        assert str(got.value) == str(expected_error.value)
    with pytest.raises(ValueError, match="inference-only"):
        ours.save_pretrained(reranker_dir.parent / "unused")


def test_an_index_records_and_reloads_its_backend(onnx_encoder, tmp_path):
    index_dir = tmp_path / "index"
    retriever = HybridRetriever.create(index_dir, onnx_encoder, chunk_size=0)
    retriever.add([{"id": str(i), "text": t} for i, t in enumerate(CHINESE_TEXTS)])
    manifest = json.loads((index_dir / "hybrid.json").read_text(encoding="utf-8"))
    assert manifest["encoder"]["backend"] == "onnx" and manifest["encoder"]["quantize"] is None
    loaded = HybridRetriever.load(index_dir)
    assert loaded.encoder.load_options["backend"] == "onnx"
    assert loaded.retrieve(CHINESE_TEXTS[2], k=1)[0].doc_id == "2"
    assert HybridRetriever.load(index_dir, backend="torch").encoder.load_options["backend"] == (
        "torch"
    )
    # An index written before backends were recorded loads on torch.
    for key in ("backend", "quantize"):
        del manifest["encoder"][key]
    (index_dir / "hybrid.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert HybridRetriever.load(index_dir).encoder.load_options["backend"] == "torch"


def test_cli_encode_with_the_onnx_backend(tiny_model_dir, torch_encoder, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    out = tmp_path / "vectors.npy"
    args = ["encode", str(texts), "--kind", "query", "--model", str(tiny_model_dir)]
    args += ["--query-prompt", "查询：", "--backend", "onnx", "--output", str(out)]
    assert main(args) == 0
    assert cosines(np.load(out), torch_encoder.encode_queries(TEXTS)).min() >= 0.9999
    assert main([*args[:-2], "--device", "cuda", "--output", str(out)]) == 2


def test_integrations_take_the_backend(tiny_model_dir, reranker_dir):
    langchain = pytest.importorskip("peg_rag.integrations.langchain")
    embeddings = langchain.PEGEmbeddings(model_name=str(tiny_model_dir), backend="onnx")
    assert embeddings.backend == "onnx" and embeddings.quantize is None
    assert embeddings.encoder.load_options["backend"] == "onnx"
    assert len(embeddings.embed_query(CHINESE_TEXTS[0])) == 32
    reranker = langchain.PEGReranker(model=str(reranker_dir), backend="onnx", quantize="int8")
    assert reranker.backend == "onnx" and reranker.reranker.load_options["quantize"] == "int8"
    default = langchain.PEGEmbeddings(model_name=str(tiny_model_dir))
    assert default.backend == "torch"


@pytest.fixture(scope="module")
def me5_texts(me5_dir) -> tuple[list[str], list[str]]:
    """Short texts (the shared Chinese queries) and 16 passages of cmrc2018-dev (long)."""
    with open(EVAL_DIR / "cmrc2018-dev" / "corpus.jsonl", encoding="utf-8") as handle:
        passages = [json.loads(line)["text"] for _, line in zip(range(16), handle, strict=False)]
    return CHINESE_TEXTS, passages


@pytest.mark.slow
def test_me5_onnx_matches_torch(me5_dir, me5_texts):
    short, long = me5_texts
    torch_model = PEGEncoder.from_pretrained(me5_dir, device="cpu")
    fp32 = PEGEncoder.from_pretrained(me5_dir, backend="onnx")
    int8 = PEGEncoder.from_pretrained(me5_dir, backend="onnx", quantize="int8")
    fused = op_counts(fp32.model.path)
    assert fused["Attention"] == 12 and fused["SkipLayerNormalization"] == 24
    for texts in (short, long):
        assert cosines(fp32.encode_passages(texts), torch_model.encode_passages(texts)).min() >= (
            0.9999
        )
    assert cosines(int8.encode_queries(short), torch_model.encode_queries(short)).min() >= 0.98


@pytest.mark.slow
def test_me5_reranker_scores_match(me5_dir, me5_texts, tmp_path):
    new_head = Reranker.from_pretrained(me5_dir, new_head=True, device="cpu")
    model_dir = spread_head(new_head, tmp_path / "me5-reranker")
    short, long = me5_texts
    pairs = [(short[i % len(short)], passage) for i, passage in enumerate(long)]
    expected = Reranker.from_pretrained(model_dir, device="cpu").score_pairs(pairs)
    ours = Reranker.from_pretrained(model_dir, backend="onnx").score_pairs(pairs)
    int8 = Reranker.from_pretrained(model_dir, backend="onnx", quantize="int8").score_pairs(pairs)
    assert np.ptp(expected) > 1.0  # scores that differ, so that matching them means something
    np.testing.assert_allclose(ours, expected, atol=1e-3)
    # A random std-1 pooler and head amplify int8 rounding, and it differs between CPUs (VNNI
    # or not): 0.976 on an AMD EPYC without VNNI here, above 0.98 on others.
    assert np.corrcoef(int8, expected)[0, 1] >= 0.95
