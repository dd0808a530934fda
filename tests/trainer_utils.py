"""Helpers shared by the trainer tests: small training files and reference computations."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from helpers import CHINESE_TEXTS
from safetensors.torch import load_file

from peg_rag.core.encoder import PEGEncoder


def write_lines(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


def make_records(
    count: int, source: str | None = None, negatives: int = 1, tag: str = "", scored: bool = False
) -> list[dict]:
    """Distinct (query, positive, negatives) lines built from the shared Chinese texts;
    ``scored``: with teacher scores (``pos_scores``, ``neg_scores``) that differ by line."""
    records = []
    for i in range(count):
        base = CHINESE_TEXTS[i % len(CHINESE_TEXTS)]
        record = {
            "query": f"{tag}{base}（问{i}）",
            "pos": [f"{tag}答{i}：{CHINESE_TEXTS[(i + 1) % len(CHINESE_TEXTS)]}"],
            "neg": [
                f"{tag}无关{i}-{k}：{CHINESE_TEXTS[(i + 3 + k) % 8]}" for k in range(negatives)
            ],
        }
        if source:
            record["source"] = source
        if scored:
            record["pos_scores"] = [3.0 + 0.25 * (i % 5)]
            record["neg_scores"] = [1.5 - 0.5 * k - 0.125 * (i % 3) for k in range(negatives)]
        records.append(record)
    return records


def load_encoder(model_dir: Path, **kwargs) -> PEGEncoder:
    """The tiny model in training mode, fp32 on CPU, mean pooling (well-conditioned scores)."""
    encoder = PEGEncoder.from_pretrained(
        model_dir, dtype="float32", device="cpu", pooling="mean", **kwargs
    )
    encoder.model.train()
    return encoder


def gradients(model: torch.nn.Module) -> torch.Tensor:
    """All parameter gradients as one flat vector (zeros where a parameter has none)."""
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
            for p in model.parameters()
        ]
    )


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def assert_close_vectors(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """allclose with rtol, plus an atol of rtol x the largest entry: float32 rounding noise on
    entries that are mathematically ~0 has no relative scale of its own."""
    atol = rtol * float(expected.abs().max())
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (
        f"max abs difference {float((actual - expected).abs().max()):.3g}, atol {atol:.3g}"
    )


def reference_loss(q, c, pos, tau, mask=None, gamma=0.0, weighting=None):
    """Unchunked weighted InfoNCE by autograd: sum_i w_i l_i / sum_i w_i, and the weights."""
    logits = q @ c.T / tau
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    log_p = logits.log_softmax(dim=1)[torch.arange(len(q)), pos]
    w = torch.ones(len(q)) if weighting is None else weighting(log_p.exp().detach(), gamma)
    return -(w * log_p).sum() / w.sum(), w


def reference_distill(q, c, columns, scores, tau, teacher_temperature):
    """sum_i KL_i and the number of distilled queries, written out row by row: for each query
    with at least two finite scores, KL(softmax(r / T) || softmax(<q_i, c_k> / tau)) over
    those slots only."""
    total, count = torch.zeros(()), 0
    for i in range(len(q)):
        scored = torch.isfinite(scores[i])
        if scored.sum() < 2:
            continue
        t = torch.softmax(scores[i][scored] / teacher_temperature, dim=0)
        log_q = torch.log_softmax(c[columns[i][scored]] @ q[i] / tau, dim=0)
        total = total + (t * (t.log() - log_q)).sum()
        count += 1
    return total, count


def recorded_run(train_fn, config, **kwargs) -> tuple:
    """``train_fn(config, **kwargs)``, recording each step's batch (source and line numbers):
    the data order that was trained on."""
    import pytest

    from peg_rag.trainer import data as data_module

    order = []
    original = data_module.TrainData.batch

    def recording(self, state):
        batch, after = original(self, state)
        order.append((state["step"], batch.source, tuple(batch.lines)))
        return batch, after

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_module.TrainData, "batch", recording)
        result = train_fn(config, **kwargs)
    # The data thread builds one batch ahead: keep the batches that were trained on.
    return result, [o for o in order if o[0] < result.step]


def assert_same_weights(a: Path, b: Path, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """The model.safetensors of two model folders hold the same tensors."""
    left, right = weights(a), weights(b)
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=rtol, atol=atol)


def kill_while_writing_checkpoint(config: dict, make: str, run: str, step: int = 4) -> None:
    """Train ``config`` in a child process (``run(make(config))`` from peg_rag.trainer) that
    SIGKILLs itself in the middle of writing checkpoint ``step``: after accelerate's state and
    the model are on disk, before trainer_state.json and the rename."""
    script = textwrap.dedent(f"""
        import os, signal
        from peg_rag.trainer import checkpoint, {make}, {run}
        write_json = checkpoint.write_json
        def dying(path, value, **kwargs):
            if ".tmp-checkpoint-{step}" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
            write_json(path, value, **kwargs)
        checkpoint.write_json = dying
        {run}({make}({config!r}))
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
