"""The training loop end to end: outputs, exact resume, SIGKILL mid-checkpoint, 2 processes,
evaluation during training."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import CHINESE_TEXTS, build_tiny_model
from trainer_utils import kill_while_writing_checkpoint, make_records, weights, write_lines

from peg_rag.core.encoder import PEGEncoder
from peg_rag.trainer import data as data_module
from peg_rag.trainer import make_config, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer-run")
    model = build_tiny_model(root / "model", seed=2, dropout=0.1)
    write_lines(root / "data" / "a.jsonl", make_records(24, source="a"))
    write_lines(root / "data" / "b.jsonl", make_records(16, source="b", tag="乙"))
    return root, model


def settings(root: Path, model: Path, output: str, **overrides) -> dict:
    values = {
        "model": str(model),
        "train": [str(root / "data")],
        "output_dir": str(root / output),
        "batch_size": 4,
        "mini_batch_size": 5,
        "hard_negatives": 2,
        "max_steps": 6,
        "learning_rate": 1e-3,
        "pooling": "mean",
        "logging_steps": 1,
        "report_to": "none",
        "seed": 3,
    }
    return {**values, **overrides}


def recorded_run(config, evaluate=None) -> tuple:
    """Train and record each step's batch (source and line numbers): the data order."""
    order = []
    original = data_module.TrainData.batch

    def recording(self, state):
        batch, after = original(self, state)
        order.append((state["step"], batch.source, tuple(batch.lines)))
        return batch, after

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_module.TrainData, "batch", recording)
        result = train(config, evaluate=evaluate)
    # The data thread builds one batch ahead: keep the batches that were trained on.
    return result, [o for o in order if o[0] < result.step]


@pytest.fixture(scope="module")
def straight(workspace):
    root, model = workspace
    config = make_config(settings(root, model, "straight", save_steps=3, report_to="tensorboard"))
    return recorded_run(config)


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = weights(a), weights(b)
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=1e-5, atol=1e-6)


def test_outputs_load_in_peg_encoder_and_sentence_transformers(workspace, straight):
    root, model = workspace
    result, order = straight
    assert result.step == 6 and len(order) == 6
    out = result.output_dir
    assert (out / "checkpoints" / "checkpoint-3" / "model" / "model.safetensors").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*")), "TensorBoard logs are written"
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    for key in (
        "loss",
        "lr",
        "gamma",
        "weight_mean",
        "weight_min",
        "weight_max",
        "positive_rank",
        "grad_norm",
        "texts_per_second",
    ):
        assert np.isfinite(logged[-1][f"train/{key}"])
    assert logged[0]["train/gamma"] == 0 and logged[-1]["train/gamma"] == 2.0
    # The weights moved, and both libraries load the result identically.
    before, after = weights(model), weights(result.model_dir)
    assert not torch.equal(
        before["encoder.layer.0.output.dense.weight"], after["encoder.layer.0.output.dense.weight"]
    )
    from sentence_transformers import SentenceTransformer

    ours = PEGEncoder.from_pretrained(result.model_dir, device="cpu").encode(
        CHINESE_TEXTS, "passage"
    )
    theirs = SentenceTransformer(str(result.model_dir), device="cpu").encode(CHINESE_TEXTS)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    reloaded = PEGEncoder.from_pretrained(result.model_dir, device="cpu")
    assert reloaded.pooling == "mean" and reloaded.normalize


def test_resume_continues_exactly(workspace, straight):
    root, model = workspace
    result, order = straight
    checkpoint = result.output_dir / "checkpoints" / "checkpoint-3"
    resumed, resumed_order = recorded_run(
        make_config(settings(root, model, "resumed", resume=str(checkpoint)))
    )
    assert resumed.step == 6
    assert resumed_order == order[3:]  # the same data, in the same order
    assert_same_weights(resumed.model_dir, result.model_dir)
    # Settings that decide the data order cannot change on resume.
    with pytest.raises(ValueError, match="batch_size differ from the checkpoint"):
        train(make_config(settings(root, model, "bad", resume=str(checkpoint), batch_size=8)))


def test_sigkill_during_checkpoint_write_resumes_from_the_previous_one(workspace, straight):
    root, model = workspace
    result, _ = straight
    config = settings(root, model, "killed", save_steps=2)
    kill_while_writing_checkpoint(config, "make_config", "train")
    out = root / "killed"
    partial = out / "checkpoints" / ".tmp-checkpoint-4"
    assert (partial / "model.safetensors").is_file()  # really killed mid-write
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == [
        "checkpoint-2"
    ]
    resumed = train(make_config({**config, "resume": "latest"}))
    assert resumed.step == 6
    assert not partial.exists()
    assert_same_weights(resumed.model_dir, result.model_dir)


# A child process of the 2-process test: trains from a config file, counting backward passes
# and recording in which of them DDP's gradient all-reduce (its communication hook) ran.
COUNTING_SYNCS = textwrap.dedent("""
    import logging
    import sys
    import torch.distributed as dist
    from accelerate import Accelerator
    from peg_rag.trainer import make_config, train

    backwards, synced = [0], []
    prepare, backward = Accelerator.prepare, Accelerator.backward

    def counting_backward(self, loss, **kwargs):
        backwards[0] += 1
        return backward(self, loss, **kwargs)

    def hook(state, bucket):
        synced.append(backwards[0])
        future = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return future.then(lambda f: f.value()[0].div_(dist.get_world_size()))

    def hooked_prepare(self, *objects):
        prepared = prepare(self, *objects)
        prepared[0].register_comm_hook(None, hook)
        return prepared

    Accelerator.prepare, Accelerator.backward = hooked_prepare, counting_backward
    logging.basicConfig(level=logging.INFO)
    train(make_config(config_file=sys.argv[1]))
    print(f"BACKWARDS {backwards[0]} SYNCED {sorted(set(synced))}")
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_two_gloo_processes_equal_one_process_with_the_combined_batch(workspace, tmp_path):
    root, _ = workspace
    model = build_tiny_model(tmp_path / "no-dropout", seed=4, dropout=0.0)
    # Every other line has teacher scores: the distillation term's normalization is global.
    records = make_records(24, source="a", scored=True)
    for record in records[1::2]:
        del record["pos_scores"], record["neg_scores"]
    write_lines(tmp_path / "data" / "a.jsonl", records)
    values = settings(
        root,
        model,
        "single",
        train=[str(tmp_path / "data")],
        batch_size=8,
        max_steps=1,
        mini_batch_size=3,
        false_negative_margin=0.01,
        adam_epsilon=1e-3,
        warmup_ratio=0.0,
        distill_weight=0.5,
        log_line_weights=str(tmp_path / "single-lines.jsonl"),
    )
    single = train(make_config(values))
    assert single.last_step["train/loss"] > 0 and single.last_step["train/masked"] > 0
    assert 0 < single.last_step["train/distilled"] < 1
    config_file = tmp_path / "two.yaml"
    two_lines = tmp_path / "two-lines.jsonl"
    config_file.write_text(
        yaml.safe_dump(
            {**values, "output_dir": str(root / "two"), "log_line_weights": str(two_lines)}
        )
    )
    port = str(free_port())
    children = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", COUNTING_SYNCS, str(config_file)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = [child.communicate(timeout=300)[0].decode() for child in children]
    assert [c.returncode for c in children] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "on 2 processes" in outputs[0]
    # DDP all-reduced gradients only in the step's last backward (the other mini-batches
    # accumulated locally under no_sync).
    for output in outputs:
        backwards, synced = re.search(r"BACKWARDS (\d+) SYNCED \[([\d, ]*)\]", output).groups()
        assert int(backwards) >= 3
        assert [int(i) for i in synced.split(",")] == [int(backwards)]
    two = root / "two" / "model"
    assert_same_weights(two, single.model_dir)
    # The main process alone logs every query of the global batch, as one process does.
    one, both = read_rows(tmp_path / "single-lines.jsonl"), read_rows(two_lines)
    assert len(both) == 8
    assert [(r["file"], r["line"]) for r in both] == [(r["file"], r["line"]) for r in one]
    for key in ("weight", "p_positive"):
        assert [r[key] for r in both] == pytest.approx([r[key] for r in one], rel=1e-4)
    # The control: a step on half the batch gives different weights, so the test can fail.
    half = train(
        make_config(
            {
                **values,
                "batch_size": 4,
                "output_dir": str(root / "half"),
                "log_line_weights": None,
            }
        )
    )
    left, right = weights(half.model_dir), weights(single.model_dir)
    assert not all(torch.allclose(left[k], right[k], rtol=1e-5, atol=1e-6) for k in left)


def test_distillation_anchor_self_paced_weighting_and_line_weights_in_a_run(workspace, tmp_path):
    root, model = workspace
    folder = tmp_path / "scored"
    write_lines(folder / "s.jsonl", make_records(12, source="s", negatives=2, scored=True))
    log = tmp_path / "weights" / "lines.jsonl"
    values = settings(
        root,
        model,
        "distilled",
        train=[str(folder)],
        max_steps=3,
        weighting="self_paced",
        gamma_start=0.5,
        distill_weight=0.5,
        teacher_temperature=2.0,
        anchor_weight=0.5,
        log_line_weights=str(log),
    )
    result = train(make_config(values))
    logged = read_rows(result.output_dir / "log.jsonl")
    assert [r["train/distilled"] for r in logged] == [1.0, 1.0, 1.0]
    assert all(r["train/distill_kl"] > 0 for r in logged)
    # The anchor term is on (the gradient is checked in test_trainer_grad_cache.py).
    assert all(r["train/anchor_distance"] > 0 for r in logged)
    # One row per query and step, naming the lines the data reader gave each step.
    rows = read_rows(log)
    assert [r["step"] for r in rows] == [1] * 4 + [2] * 4 + [3] * 4
    reader = data_module.TrainData([str(folder)], batch_size=4, hard_negatives=2, seed=3)
    state, expected = reader.initial_state(), []
    for _ in range(3):
        batch, state = reader.batch(state)
        expected.extend((str(where.path), where.line) for where in batch.origins)
    reader.close()
    assert [(r["file"], r["line"]) for r in rows] == expected
    # The weighting selected by name is self_paced: w = p ** gamma, gamma rising 0.5 -> 2.
    assert [r["gamma"] for r in rows[::4]] == pytest.approx([0.5, 1.25, 2.0])
    for row in rows:
        assert 0 < row["p_positive"] < 1
        assert row["weight"] == pytest.approx(row["p_positive"] ** row["gamma"], rel=1e-5)


def test_evaluation_during_training_keeps_the_best_model(workspace, tmp_path):
    root, model = workspace
    (tmp_path / "set-a").mkdir()
    scores = iter([0.2, 0.7, 0.4])  # evaluations at steps 2, 4 and the end (6)
    calls = []

    def evaluate(encoder, folder):
        calls.append(folder)
        return {"ndcg@10": next(scores)}

    result = train(
        make_config(
            settings(
                root,
                model,
                "evaluated",
                eval_dirs=[str(tmp_path / "set-a")],
                eval_steps=2,
                save_steps=2,
                metric_for_best="set-a/ndcg@10",
            )
        ),
        evaluate=evaluate,
    )
    assert len(calls) == 3
    assert result.best == {"step": 4, "metric": "set-a/ndcg@10", "value": 0.7}
    assert result.metrics == {"set-a/ndcg@10": 0.4}
    assert_same_weights(
        result.best_model_dir, result.output_dir / "checkpoints" / "checkpoint-4" / "model"
    )
    logged = [
        json.loads(line) for line in (result.output_dir / "log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in logged if "eval/set-a/ndcg@10" in r] == [2, 4, 6]


def test_real_evaluation_on_beir_and_pairs_folders(workspace, tmp_path):
    root, model = workspace
    beir = tmp_path / "tiny-beir"
    write_lines(
        beir / "corpus.jsonl", [{"_id": f"d{i}", "text": t} for i, t in enumerate(CHINESE_TEXTS)]
    )
    write_lines(
        beir / "queries.jsonl", [{"_id": f"q{i}", "text": CHINESE_TEXTS[i][:6]} for i in range(4)]
    )
    (beir / "qrels").mkdir()
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(4))
    )
    pairs = tmp_path / "sts"
    pairs.mkdir()
    (pairs / "pairs.tsv").write_text(
        "".join(
            f"{CHINESE_TEXTS[i]}\t{CHINESE_TEXTS[(i + k) % 8]}\t{5 - k}\n"
            for i in range(4)
            for k in range(3)
        )
    )
    result = train(
        make_config(
            settings(
                root,
                model,
                "real-eval",
                max_steps=2,
                eval_dirs=[str(beir), str(pairs)],
                metric_for_best="tiny-beir/ndcg@10",
            )
        )
    )
    assert set(result.metrics) >= {"tiny-beir/ndcg@10", "tiny-beir/recall@100", "sts/spearman"}
    assert 0 <= result.metrics["tiny-beir/ndcg@10"] <= 1
    assert (result.best_model_dir / "best.json").is_file()
    with pytest.raises(ValueError, match="metric_for_best 'tiny-beir/ndcg@5' is not among"):
        train(
            make_config(
                settings(
                    root,
                    model,
                    "bad-metric",
                    max_steps=1,
                    eval_dirs=[str(beir)],
                    metric_for_best="tiny-beir/ndcg@5",
                )
            )
        )
    shutil.rmtree(root / "bad-metric", ignore_errors=True)


def test_bad_training_line_stops_the_command_with_file_line_and_field(workspace, capsys):
    root, model = workspace
    bad = root / "bad" / "train.jsonl"
    bad.parent.mkdir(exist_ok=True)
    bad.write_text(
        json.dumps(make_records(1)[0], ensure_ascii=False) + '\n{"query": "问", "pos": "答"}\n'
    )
    from peg_rag.trainer.__main__ import main

    argv = [
        "--model",
        str(model),
        "--train",
        str(bad),
        "--output-dir",
        str(root / "bad-out"),
        "--report-to",
        "none",
    ]
    assert main(argv) == 2
    assert f"{bad}:2: field 'pos': expected a list" in capsys.readouterr().err
    assert not (root / "bad-out" / "model").exists()
