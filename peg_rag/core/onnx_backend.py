"""The ONNX Runtime backend that PEGEncoder and Reranker share (``backend="onnx"``, CPU).

Where the graph comes from:

1. The model folder's own files, in sentence-transformers' layout: ``onnx/model.onnx`` for
   float32 and ``onnx/model_qint8_<isa>.onnx`` for int8 (``peg-rag export`` writes both;
   sentence-transformers' own AVX2 export, ``onnx/model_quint8_avx2.onnx``, is used too).
2. Otherwise peg-rag's cache (``<cache dir>/onnx/<key>/``, same layout), built once per
   model: the model is exported with torch's TorchScript exporter and eager attention (the
   graph ONNX Runtime's BERT fusions recognize), the transformer optimizer fuses attention,
   GELU and the layer norms, the fused graph is checked against the source on a batch of
   another shape, and int8 is dynamic quantization of the fused graph. When the folder has
   only ``onnx/model.onnx``, int8 is built from that file instead.

The cache key covers the source files (name, size, mtime and ctime: cheap on every load, and
rewriting a file changes its ctime, which nothing sets back), the settings that shape the
graph, the onnxruntime, torch and transformers versions and the CPU's instruction set, so a
changed model is never served from a stale entry (an entry's ``source.json`` names its
model). An entry is written in a temporary directory and renamed into place, so a process
killed mid-export leaves no half entry.

:class:`OnnxModel` runs the same padded batches as the torch backend and returns
transformers' output classes, so pooling, normalization and logits go through the same code.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import platform
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

from .cache import cache_dir
from .encoding import QUANTIZE
from .extras import require
from .files import swap_dir, write_json

logger = logging.getLogger("peg_rag")

ONNX_DIR = "onnx"  # sentence-transformers' folder for ONNX files
FP32_FILE = "model.onnx"
OPSET = 17
BUILD_VERSION = 1  # raise when a change to export, fusion or quantization changes the files
# What each auto class outputs; the graph keeps transformers' output names, as optimum does.
OUTPUTS = {"AutoModel": "last_hidden_state", "AutoModelForSequenceClassification": "logits"}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Instruction sets that change ONNX Runtime's int8 kernels (x86 flags, then ARM's).
ISA_FLAGS = frozenset(
    {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "asimddp", "i8mm"}
)
# sentence-transformers' int8 files by target, and which of them suit each CPU, best first.
COMPATIBLE = {
    "avx512_vnni": ("avx512_vnni", "avx512", "avx2"),
    "avx512": ("avx512", "avx2"),
    "avx2": ("avx2",),
    "arm64": ("arm64",),
}
_MAX_PROTO_BYTES = 2**31  # one ONNX file (a protobuf) holds at most 2 GiB
_INFERENCE_ONLY = (
    "this model runs on ONNX Runtime (backend='onnx'), which is inference-only: load it with "
    "backend='torch' to train or fine-tune it"
)


class OnnxFileError(ValueError):
    """ONNX Runtime cannot use an ONNX file; the message names the file."""


class InferenceOnlyError(RuntimeError):
    """Training was asked of a model that ONNX Runtime runs."""


def cpu_isa() -> tuple[str, tuple[str, ...]]:
    """This CPU's int8 target as sentence-transformers names its files (``avx512_vnni``,
    ``avx512``, ``avx2``, ``arm64``) and the machine plus its flags that matter to int8."""
    machine = platform.machine().lower()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags.update(value.split())
                break
    except OSError:  # not Linux: the machine name alone
        pass
    if machine in ("arm64", "aarch64"):
        name = "arm64"
    elif "avx512_vnni" in flags:
        name = "avx512_vnni"
    elif "avx512f" in flags:
        name = "avx512"
    else:
        name = "avx2"
    return name, (machine, *sorted(flags & ISA_FLAGS))


def quantized_name(isa: str) -> str:
    """File name of int8 weights for ``isa`` as peg-rag writes them (signed weights), in
    sentence-transformers' pattern."""
    return f"model_qint8_{isa}.onnx"


def int8_files(isa: str) -> tuple[str, ...]:
    """The int8 files a model folder may hold for ``isa``: ours and sentence-transformers',
    which for AVX2 is named after its unsigned weights."""
    return (
        (quantized_name(isa), "model_quint8_avx2.onnx") if isa == "avx2" else (quantized_name(isa),)
    )


def folder_file(model_dir: Path, quantize: str | None) -> Path | None:
    """The model folder's own ONNX file for this precision and CPU, if it has one."""
    folder = model_dir / ONNX_DIR
    names = (
        [FP32_FILE]
        if quantize is None
        else [name for isa in COMPATIBLE[cpu_isa()[0]] for name in int8_files(isa)]
    )
    return next((folder / name for name in names if (folder / name).is_file()), None)


def _source_files(model_dir: Path) -> list[Path]:
    """What a cache entry is built from: the folder's float32 ONNX file when it has one,
    else the config, weights and any model code."""
    own = model_dir / ONNX_DIR / FP32_FILE
    if own.is_file():
        return [model_dir / "config.json", own]
    patterns = ("config.json", "*.safetensors", "*.bin", "*.index.json", "*.py")
    return sorted({path for pattern in patterns for path in model_dir.glob(pattern)})


def cache_key(model_dir: Path, output: str, trust_remote_code: bool) -> str:
    """The cache entry's name: a hash of everything that decides its files (see above)."""
    ort = require("onnxruntime", "onnx", "backend='onnx'")
    stats = {str(path.relative_to(model_dir)): path.stat() for path in _source_files(model_dir)}
    described = {
        "files": [[name, s.st_size, s.st_mtime_ns, s.st_ctime_ns] for name, s in stats.items()],
        "output": output,
        "trust_remote_code": trust_remote_code,
        "build": [BUILD_VERSION, OPSET],
        "versions": [ort.__version__, torch.__version__, transformers.__version__],
        "cpu": cpu_isa(),
    }
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:24]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_abandoned(root: Path) -> None:
    """Delete temporary files of builds whose process is gone (killed mid-export)."""
    for tmp in [*root.glob(".*.tmp-*"), *root.glob("*/.tmp-*")]:
        try:
            os.kill(int(tmp.name.split(".tmp-", 1)[1].split("-", 1)[0]), 0)
        except (ValueError, ProcessLookupError):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


@contextmanager
def _quiet() -> Iterator[None]:
    """Mute logging below ERROR: ONNX Runtime's optimizer and quantizer log every step,
    some of it on the root logger."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class _Graph(torch.nn.Module):
    """The model with positional tensor inputs and one output, as the exporter traces it."""

    def __init__(self, model: torch.nn.Module, inputs: tuple[str, ...], output: str) -> None:
        super().__init__()
        self.model, self.inputs, self.output = model, inputs, output

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(**dict(zip(self.inputs, tensors, strict=True))), self.output)


def _example(
    config: PretrainedConfig, inputs: tuple[str, ...], rows: int, width: int, seed: int
) -> tuple[torch.Tensor, ...]:
    """A padded batch of random ids, the last rows shorter, so masking is traced and checked."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (rows, width), generator=generator)
    mask = torch.ones(rows, width, dtype=torch.int64)
    for row in range(1, rows):
        mask[row, width - 2 * row :] = 0
    ids[mask == 0] = config.pad_token_id or 0
    tensors = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(tensors[name] for name in inputs)


def _export(
    model_dir: Path,
    auto_class: Any,
    config: PretrainedConfig,
    trust_remote_code: bool,
    target: Path,
) -> None:
    """Export, fuse and check the float32 graph of the model in ``model_dir`` to ``target``."""
    model = auto_class.from_pretrained(
        model_dir,
        config=config,
        attn_implementation="eager",  # SDPA exports as one opaque op the fusions miss
        dtype=torch.float32,
        trust_remote_code=trust_remote_code,
    ).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size >= _MAX_PROTO_BYTES:
        raise ValueError(
            f"{model_dir} holds {size / 2**30:.1f} GiB of float32 weights, more than one ONNX "
            "file can hold (2 GiB); the ONNX backend does not split files: use backend='torch'"
        )
    output = OUTPUTS[auto_class.__name__]
    takes = inspect.signature(model.forward).parameters
    inputs = INPUTS if "token_type_ids" in takes else INPUTS[:2]
    # The wrapper must be in eval mode too: the exporter restores its mode on the children.
    graph = _Graph(model, inputs, output).eval()
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in (*inputs, output)}
    if output == "logits":
        axes[output] = {0: "batch_size"}
    raw = target.with_name(".raw-" + target.name)
    with warnings.catch_warnings():  # tracer and deprecation warnings are expected here
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            _example(config, inputs, 2, 8, seed=0),
            str(raw),
            input_names=list(inputs),
            output_names=[output],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    try:
        _optimize(raw, target, config)
    finally:
        raw.unlink(missing_ok=True)
    check = _example(config, inputs, 3, 11, seed=1)  # another shape than the traced one
    with torch.no_grad():
        expected = graph(*check).numpy()
    features = dict(zip(inputs, check, strict=True))
    _check_close(OnnxModel(open_session(target), config, target, output), features, expected)


def _optimize(source: Path, target: Path, config: PretrainedConfig) -> None:
    """Fuse attention, GELU and layer norms with ONNX Runtime's transformer optimizer."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    with _quiet():
        fused = optimizer.optimize_model(
            str(source),
            model_type="bert",  # BERT-style encoders, RoBERTa and XLM-R included
            num_heads=getattr(config, "num_attention_heads", 0),  # 0: found in the graph
            hidden_size=getattr(config, "hidden_size", 0),
            optimization_options=FusionOptions("bert"),  # exact GELU: no approximation
            opt_level=0,  # fusions only; the session applies ONNX Runtime's own at load
        )
        fused.save_model_to_file(str(target))


def _check_close(model: OnnxModel, features: dict[str, torch.Tensor], expected: np.ndarray) -> None:
    """Raise unless ``model`` gives ``expected`` on ``features`` (real tokens only)."""
    got = model(**features)[model.output].numpy()
    if model.output != "logits":
        mask = features["attention_mask"].numpy().astype(bool)
        got, expected = got[mask], expected[mask]
    error = float(np.abs(got - expected).max())
    if error > 1e-3 * (1.0 + float(np.abs(expected).max())):
        raise ValueError(
            f"the ONNX graph {model.path} differs from the model it was exported from (max "
            f"error {error:.2g} on a check batch): backend='onnx' does not support this "
            "architecture; use backend='torch'"
        )


def _quantize(source: Path, target: Path) -> None:
    """Dynamic int8 quantization of the float32 graph at ``source``."""
    onnx = require("onnx", "onnx", "building ONNX files")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    machine, *flags = cpu_isa()[1]
    # Per-channel weight scales: on me5-small-zh the worst cosine to float32 was 0.9956 with
    # them and 0.9869 (short texts) / 0.9800 (long) with one scale per tensor, at equal speed.
    # x86 without VNNI multiplies u8 x s8 pairs into int16, which can saturate: 7-bit weights
    # (reduce_range) avoid that, as ONNX Runtime advises; VNNI and ARM need no such care.
    vnni = bool({"avx512_vnni", "avx_vnni"} & set(flags))
    with _quiet():
        quantize_dynamic(
            source,
            target,
            per_channel=True,
            reduce_range=machine in ("x86_64", "amd64") and not vnni,
            weight_type=QuantType.QInt8,
            # Shapes are not inferred through ONNX Runtime's fused ops: they are float tensors.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


def build_files(
    model_dir: Path,
    auto_class: Any,
    config: PretrainedConfig,
    target_dir: Path,
    *,
    quantize: str | None,
    trust_remote_code: bool,
) -> list[Path]:
    """Write ``model.onnx`` (fused float32) and, with ``quantize="int8"``, this CPU's
    ``model_qint8_<isa>.onnx`` into ``target_dir``; returns the paths written."""
    require("onnx", "onnx", "building ONNX files")
    target_dir.mkdir(parents=True, exist_ok=True)
    fp32 = target_dir / FP32_FILE
    own = model_dir / ONNX_DIR / FP32_FILE
    if own.is_file():
        _optimize(own, fp32, config)
    else:
        _export(model_dir, auto_class, config, trust_remote_code, fp32)
    written = [fp32]
    if quantize:
        written.append(target_dir / quantized_name(cpu_isa()[0]))
        _quantize(fp32, written[-1])
    return written


def cached_file(
    model_dir: Path,
    auto_class: Any,
    config: PretrainedConfig,
    *,
    quantize: str | None,
    trust_remote_code: bool,
) -> Path:
    """The cache's ONNX file for this model, precision and CPU, built on first use."""
    output = OUTPUTS[auto_class.__name__]
    root = cache_dir() / ONNX_DIR
    entry = root / cache_key(model_dir, output, trust_remote_code)
    fp32 = entry / FP32_FILE
    if not fp32.is_file():
        root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(root)
        logger.info("building the ONNX graph of %s in %s (once)", model_dir, entry)
        tmp = root / f".{entry.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build_files(
                model_dir,
                auto_class,
                config,
                tmp,
                quantize=None,
                trust_remote_code=trust_remote_code,
            )
            write_json(tmp / "source.json", {"model": str(model_dir), "output": output})
            _fsync(tmp / FP32_FILE)
            try:
                swap_dir(tmp, entry)
            except OSError:  # another process published the same entry first
                if not fp32.is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if quantize is None:
        return fp32
    int8 = entry / quantized_name(cpu_isa()[0])
    if not int8.is_file():
        tmp = entry / f".tmp-{os.getpid()}-{int8.name}"
        try:
            _quantize(fp32, tmp)
            _fsync(tmp)
            os.replace(tmp, int8)
        finally:
            tmp.unlink(missing_ok=True)
    return int8


def open_session(path: Path, remedy: str = "") -> Any:
    """An ONNX Runtime CPU session of ``path``; a file it cannot load raises OnnxFileError
    naming it."""
    ort = require("onnxruntime", "onnx", "backend='onnx'")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch uses
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail...)
        lines = str(exc).strip().splitlines()
        raise OnnxFileError(
            f"{path}: ONNX Runtime cannot load this file; it is corrupt, truncated or not an "
            f"ONNX model ({lines[0] if lines else type(exc).__name__}).{remedy}"
        ) from exc


class OnnxModel(torch.nn.Module):
    """An ONNX Runtime session behind the calls PEGEncoder and Reranker make of a model:
    ``model(**features)`` returns transformers' output (``last_hidden_state`` or
    ``logits``), ``config`` is the model's config. Inference only: ``train()`` and
    ``parameters()`` raise InferenceOnlyError."""

    def __init__(self, session: Any, config: PretrainedConfig, path: Path, output: str) -> None:
        super().__init__()
        self.session, self.config, self.path, self.output = session, config, path, output
        self.training = False
        found = {i.name: i.type for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        unknown = sorted(set(found) - set(INPUTS))
        if unknown or "input_ids" not in found or output not in outputs:
            raise OnnxFileError(
                f"{path} takes {sorted(found)} and gives {outputs}; peg-rag needs inputs among "
                f"{list(INPUTS)} (input_ids included) and the output {output!r}"
            )
        self._inputs = {
            name: np.int32 if kind == "tensor(int32)" else np.int64 for name, kind in found.items()
        }

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, **features: torch.Tensor) -> BaseModelOutput | SequenceClassifierOutput:
        feed = {}
        for name, dtype in self._inputs.items():
            tensor = features.get(name)
            if tensor is None:  # BERT-style graphs take token types; one text is all zeros
                tensor = torch.zeros_like(features["input_ids"])
            feed[name] = tensor.numpy().astype(dtype, copy=False)
        values = torch.from_numpy(self.session.run([self.output], feed)[0])
        if self.output == "logits":
            return SequenceClassifierOutput(logits=values)
        return BaseModelOutput(last_hidden_state=values)

    def train(self, mode: bool = True) -> OnnxModel:
        if mode:
            raise InferenceOnlyError(_INFERENCE_ONLY)
        return self

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        raise InferenceOnlyError(_INFERENCE_ONLY)

    def extra_repr(self) -> str:
        return str(self.path)


def load(
    model_dir: Path,
    auto_class: Any,
    *,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    quantize: str | None,
    trust_remote_code: bool,
    config: PretrainedConfig | None = None,
) -> tuple[OnnxModel, Any, dict[str, Any]]:
    """Model (an ONNX Runtime session of the folder's or the cache's file), tokenizer, and
    the options that load them again; as ``torch_backend.load`` for ``backend="onnx"``."""
    require("onnxruntime", "onnx", "backend='onnx'")
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(
            f"backend='onnx' runs on the CPU; for device={str(device)!r} use backend='torch'"
        )
    if dtype not in (None, "float32", torch.float32):
        raise ValueError(
            f"backend='onnx' runs float32 (int8 with quantize='int8'); for dtype={dtype!r} use "
            "backend='torch'"
        )
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    config = config or AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    path = folder_file(model_dir, quantize)
    remedy = " Replace it, e.g. with peg-rag export, or remove it to let peg-rag export the model."
    if path is None:
        path = cached_file(
            model_dir, auto_class, config, quantize=quantize, trust_remote_code=trust_remote_code
        )
        remedy = f" Delete {path.parent} and it is rebuilt on the next load."
    model = OnnxModel(open_session(path, remedy), config, path, OUTPUTS[auto_class.__name__])
    options = {"backend": "onnx", "device": "cpu", "dtype": "float32", "quantize": quantize}
    return model, tokenizer, {**options, "trust_remote_code": trust_remote_code}
