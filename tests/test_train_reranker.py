"""Reranker training (peg-rag train-reranker): the losses against hand-computed values, the
step's gradient accumulation, exact resume after kill -9, learning a toy task,
sentence-transformers compatibility of the saved model, held-out evaluation, config errors
and the command line."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import CHINESE_TEXTS, build_tiny_model, build_tiny_reranker
from trainer_utils import (
    assert_close_vectors,
    assert_same_weights,
    gradients,
    kill_while_writing_checkpoint,
    make_records,
    recorded_run,
    weights,
    write_lines,
)

from peg_rag import Reranker
from peg_rag.cli import main as cli_main
from peg_rag.trainer import ConfigError, make_reranker_config, train_reranker
from peg_rag.trainer.config import add_arguments, fields_of
from peg_rag.trainer.data import Batch
from peg_rag.trainer.listwise_loss import listwise_loss
from peg_rag.trainer.pointwise_loss import pointwise_loss
from peg_rag.trainer.reranker_config import LOSSES, RerankerConfig, reranker_config_from_args
from peg_rag.trainer.reranker_eval import RerankEvaluation, held_out_lines, rerank_scores
from peg_rag.trainer.reranker_step import LOSSES as LOSS_FUNCTIONS
from peg_rag.trainer.reranker_step import RerankerStep, build_pair_inputs

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "trainer" / "configs" / "reranker.yaml"
PAIRS = [(CHINESE_TEXTS[i], CHINESE_TEXTS[(i + 3) % 8] + "。" * i) for i in range(8)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reranker-run")
    model = build_tiny_model(root / "model", seed=2, dropout=0.1)
    write_lines(root / "data" / "a.jsonl", make_records(24, source="a", negatives=3))
    # Source b has one negative per line: the other two are filled with other lines' positives.
    write_lines(root / "data" / "b.jsonl", make_records(16, source="b", tag="乙"))
    write_lines(root / "held.jsonl", make_records(6, negatives=4, tag="留"))
    return root, model


def settings(root: Path, model: Path, output: str, **overrides) -> dict:
    values = {
        "model": str(model),
        "train": [str(root / "data")],
        "output_dir": str(root / output),
        "batch_size": 4,
        "mini_batch_size": 3,  # mini-batches of 3 and 1 groups: gradients are accumulated
        "group_size": 3,
        "max_steps": 6,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "report_to": "none",
        "seed": 3,
    }
    return {**values, **overrides}


# --- Losses -------------------------------------------------------------------------------

LOGITS = [[2.0, 1.0, -0.5], [0.3, 1.2, 0.0]]


def test_listwise_loss_is_the_cross_entropy_of_the_group_softmax():
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    losses = listwise_loss(logits)
    for row, loss in zip(LOGITS, losses.tolist(), strict=True):
        expected = -math.log(math.exp(row[0]) / sum(math.exp(s) for s in row))
        assert loss == pytest.approx(expected, rel=1e-12)
    assert losses.tolist() == pytest.approx(
        torch.nn.functional.cross_entropy(
            logits, torch.zeros(2, dtype=torch.long), reduction="none"
        )
        .detach()
        .tolist()
    )
    # d l / d s_j = softmax(s)_j - [j = 0], summed over the groups' losses.
    losses.sum().backward()
    for row, grad in zip(LOGITS, logits.grad.tolist(), strict=True):
        total = sum(math.exp(s) for s in row)
        expected = [math.exp(s) / total - (j == 0) for j, s in enumerate(row)]
        assert grad == pytest.approx(expected, rel=1e-12)
    # Shifting every logit of a group changes nothing: only differences are trained.
    shifted = listwise_loss(torch.tensor(LOGITS, dtype=torch.float64) + 5.0)
    assert shifted.tolist() == pytest.approx(losses.tolist())


def test_pointwise_loss_is_the_mean_binary_cross_entropy_of_the_pairs():
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    losses = pointwise_loss(logits)

    def sigmoid(s: float) -> float:
        return 1 / (1 + math.exp(-s))

    for row, loss in zip(LOGITS, losses.tolist(), strict=True):
        terms = [-math.log(sigmoid(row[0]))] + [-math.log(1 - sigmoid(s)) for s in row[1:]]
        assert loss == pytest.approx(sum(terms) / len(row), rel=1e-12)
    # d l / d s_j = (sigmoid(s_j) - y_j) / G.
    losses.sum().backward()
    for row, grad in zip(LOGITS, logits.grad.tolist(), strict=True):
        expected = [(sigmoid(s) - (j == 0)) / len(row) for j, s in enumerate(row)]
        assert grad == pytest.approx(expected, rel=1e-12)


def test_the_config_names_every_loss_function():
    assert tuple(LOSS_FUNCTIONS) == LOSSES


# --- The step -----------------------------------------------------------------------------


def toy_batch(groups: int, group_size: int) -> Batch:
    negatives = [
        [CHINESE_TEXTS[(i + k + 2) % 8] * (1 + (i + k) % 3) for k in range(group_size - 1)]
        for i in range(groups)
    ]
    return Batch(
        source="toy",
        queries=[CHINESE_TEXTS[i % 8][: 4 + i % 5] for i in range(groups)],
        prompts=[None] * groups,
        positives=[CHINESE_TEXTS[(i + 1) % 8] for i in range(groups)],
        negatives=negatives,
        lines=list(range(groups)),
    )


@pytest.mark.parametrize("loss", LOSSES)
def test_mini_batches_accumulate_the_gradient_of_the_mean_batch_loss(tmp_path, loss):
    reranker_dir = build_tiny_reranker(tmp_path / "reranker", seed=5)  # no dropout
    reranker = Reranker.from_pretrained(reranker_dir, device="cpu")
    reranker.model.train()
    inputs = build_pair_inputs(toy_batch(5, 4), reranker.tokenize)
    assert (inputs.groups, inputs.group_size, inputs.n_texts) == (5, 4, 20)
    # The pairs are laid out group by group, the positive first.
    assert (
        reranker.tokenize([(toy_batch(5, 4).queries[1], CHINESE_TEXTS[2])])[0][0] == (inputs.ids[4])
    )

    # Reference: all pairs in one forward pass, the mean of the groups' losses, autograd.
    from peg_rag.core.torch_backend import collate

    reranker.model.zero_grad()
    pad = reranker.tokenizer.pad_token_id
    logits = reranker.logits(collate(inputs.ids, pad, reranker.device, inputs.token_types))
    expected_loss = LOSS_FUNCTIONS[loss](logits.view(5, 4)).mean()
    expected_loss.backward()
    expected_loss = expected_loss.detach()
    expected = gradients(reranker.model)
    for size in (1, 2, 5, 8):
        reranker.model.zero_grad()
        log = RerankerStep(reranker, mini_batch_size=size, loss=loss)(inputs)
        assert log.values["loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
        assert log.texts == 20
        assert_close_vectors(gradients(reranker.model), expected, rtol=1e-4)
    # Mini-batches hold whole groups, longest first.
    batches = RerankerStep(reranker, mini_batch_size=2).mini_batches(inputs, 0, 1)
    assert sorted(np.concatenate(batches).tolist()) == list(range(5))
    longest = [max(len(inputs.ids[g * 4 + j]) for j in range(4)) for g in range(5)]
    assert [longest[g] for g in np.concatenate(batches)] == sorted(longest, reverse=True)


# --- Training runs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(workspace):
    root, model = workspace
    config = make_reranker_config(
        settings(root, model, "straight", save_steps=3, report_to="tensorboard")
    )
    return recorded_run(train_reranker, config)


def test_run_writes_logs_checkpoints_and_a_cross_encoder(workspace, straight):
    root, model = workspace
    result, order = straight
    assert result.step == 6 and len(order) == 6
    out = result.output_dir
    assert {source for _, source, _ in order} == {"a", "b"}
    assert (out / "checkpoints" / "checkpoint-3" / "model" / "model.safetensors").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*")), "TensorBoard logs are written"
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    for key in (
        "loss",
        "positive_rank",
        "accuracy",
        "positive_logit",
        "negative_logit",
        "lr",
        "grad_norm",
        "texts_per_second",
    ):
        assert np.isfinite(logged[-1][f"train/{key}"])
    assert 1 <= logged[-1]["train/positive_rank"] <= 3
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["group_size"] == 3 and saved["loss"] == "listwise"
    # A new head was trained on top of the encoder, whose weights moved too.
    after = weights(result.model_dir)
    assert "classifier.weight" in after and "classifier.weight" not in weights(model)
    assert not torch.equal(
        weights(model)["encoder.layer.0.output.dense.weight"],
        after["bert.encoder.layer.0.output.dense.weight"],
    )
    # The model loads in sentence-transformers' CrossEncoder with the same logits.
    from sentence_transformers import CrossEncoder

    ours = Reranker.from_pretrained(result.model_dir, device="cpu").score_pairs(PAIRS)
    theirs = CrossEncoder(str(result.model_dir), activation_fn=torch.nn.Identity(), device="cpu")
    np.testing.assert_allclose(ours, theirs.predict(PAIRS), atol=1e-5)
    assert len(set(np.round(ours, 6).tolist())) > 1


def test_resume_continues_exactly(workspace, straight):
    root, model = workspace
    result, order = straight
    checkpoint = result.output_dir / "checkpoints" / "checkpoint-3"
    resumed, resumed_order = recorded_run(
        train_reranker,
        make_reranker_config(settings(root, model, "resumed", resume=str(checkpoint))),
    )
    assert resumed.step == 6
    assert resumed_order == order[3:]  # the same data, in the same order
    assert_same_weights(resumed.model_dir, result.model_dir)
    # The group size decides the data order (how many negatives are drawn): it cannot change.
    with pytest.raises(ValueError, match="group_size differ from the checkpoint"):
        train_reranker(
            make_reranker_config(settings(root, model, "bad", resume=str(checkpoint), group_size=4))
        )


def test_sigkill_mid_checkpoint_then_resume_gives_the_same_weights(workspace, straight):
    root, model = workspace
    result, _ = straight
    config = settings(root, model, "killed", save_steps=2)
    kill_while_writing_checkpoint(config, "make_reranker_config", "train_reranker")
    out = root / "killed"
    assert (out / "checkpoints" / ".tmp-checkpoint-4" / "model.safetensors").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == [
        "checkpoint-2"
    ]
    resumed = train_reranker(make_reranker_config({**config, "resume": "latest"}))
    assert resumed.step == 6
    assert_same_weights(resumed.model_dir, result.model_dir)


def test_a_cross_encoder_keeps_its_head(workspace, tmp_path):
    root, _ = workspace
    start = build_tiny_reranker(tmp_path / "cross-encoder", seed=7)
    result = train_reranker(
        make_reranker_config(
            settings(root, start, "from-cross-encoder", max_steps=1, learning_rate=1e-9)
        )
    )
    before, after = weights(start), weights(result.model_dir)
    assert before.keys() == after.keys()
    # One step at lr 1e-9 moves nothing measurably: the head was loaded, not drawn anew.
    torch.testing.assert_close(
        after["classifier.weight"], before["classifier.weight"], atol=1e-6, rtol=0
    )


def toy_records(count: int, seed: int) -> list[dict]:
    """Queries of three characters from one half of a character set; the positive holds the
    query's characters and three more of that half, the negatives six of the other half.

    A fresh tiny model ranks the positive at random; learning which characters mark a
    positive (a signal the passage alone carries) takes a few dozen steps. It shows that the
    loop optimizes the ranking, not what a real cross-encoder learns."""
    chars = list("甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未申酉戌亥")
    near, far = chars[:12], chars[12:]
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        query = rng.sample(near, 3)
        positive = query + rng.sample([c for c in near if c not in query], 3)
        rng.shuffle(positive)
        negatives = ["".join(rng.sample(far, 6)) for _ in range(3)]
        records.append({"query": "".join(query), "pos": ["".join(positive)], "neg": negatives})
    return records


@pytest.mark.parametrize("loss", LOSSES)
def test_a_few_dozen_steps_learn_a_toy_task_far_above_chance(tmp_path, loss):
    model = build_tiny_model(tmp_path / "model", seed=0)
    write_lines(tmp_path / "toy.jsonl", toy_records(400, seed=1))
    held = write_lines(tmp_path / "toy-held.jsonl", toy_records(40, seed=2))
    torch.manual_seed(0)
    fresh = Reranker.from_pretrained(model, new_head=True, device="cpu")
    before = rerank_scores(fresh, held_out_lines(held))
    result = train_reranker(
        make_reranker_config(
            model=str(model),
            train=[str(tmp_path / "toy.jsonl")],
            output_dir=str(tmp_path / "out"),
            batch_size=8,
            mini_batch_size=4,
            group_size=4,
            max_steps=40,
            learning_rate=1e-3,
            loss=loss,
            report_to="none",
            eval_dirs=[str(held)],
            metric_for_best="toy-held/mrr@10",
        )
    )
    # Chance: the positive at a random one of 4 places, MRR (1 + 1/2 + 1/3 + 1/4) / 4 = 0.52.
    assert before["mrr@10"] < 0.75
    assert result.metrics["toy-held/mrr@10"] >= 0.95
    assert result.best["value"] >= 0.95
    assert result.last_step["train/accuracy"] >= 0.9
    trained = Reranker.from_pretrained(result.best_model_dir, device="cpu")
    assert rerank_scores(trained, held_out_lines(held))["mrr@10"] >= 0.95


# --- Held-out evaluation ------------------------------------------------------------------


class ConstantReranker:
    """Scores every pair alike, as a fresh or collapsed head may."""

    def score_pairs(self, pairs, **options):
        return np.zeros(len(pairs), dtype=np.float32)


def test_held_out_lines_rank_ties_at_random_not_positive_first(workspace):
    root, _ = workspace
    data = held_out_lines(root / "held.jsonl")
    assert data.name == "held" and len(data.queries) == 6
    assert all(len(ids) == 5 for ids in data.candidates.values())  # the positive + 4 negatives
    constant = rerank_scores(ConstantReranker(), data)
    assert set(constant) == {"ndcg@10", "mrr@10", "recall@10"}
    assert constant["mrr@10"] < 0.9 and constant["recall@10"] == 1.0
    bad = write_lines(root / "no-candidates.jsonl", [{"query": "问", "pos": ["答"], "neg": []}])
    with pytest.raises(ValueError, match="no-candidates.jsonl:1: field 'neg': a held-out line"):
        held_out_lines(bad)


def test_beir_folders_are_reranked_over_their_bm25_candidates(tmp_path):
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
    evaluation = RerankEvaluation(top_n=3)
    data = evaluation.load(beir)
    assert data.name == "tiny-beir" and set(data.queries) == {"q0", "q1", "q2", "q3"}
    assert all(0 < len(ids) <= 3 for ids in data.candidates.values())
    assert all(f"d{q[1:]}" in ids for q, ids in data.candidates.items())  # BM25 finds them
    reranker = Reranker.from_pretrained(build_tiny_reranker(tmp_path / "rr"), device="cpu")
    metrics = evaluation(reranker, str(beir))
    assert evaluation.load(beir) is data  # read once
    assert set(metrics) == {"ndcg@10", "mrr@10", "recall@10"} and metrics["recall@10"] == 1.0


def test_evaluation_during_training_keeps_the_best_model(workspace, tmp_path):
    root, model = workspace
    scores = iter([0.2, 0.7, 0.4])  # evaluations at steps 2, 4 and the end (6)
    calls = []

    def evaluate(reranker, path):
        assert isinstance(reranker, Reranker)
        calls.append(path)
        return {"mrr@10": next(scores)}

    result = train_reranker(
        make_reranker_config(
            settings(
                root,
                model,
                "evaluated",
                eval_dirs=[str(root / "held.jsonl")],
                eval_steps=2,
                save_steps=2,
                metric_for_best="held/mrr@10",
            )
        ),
        evaluate=evaluate,
    )
    assert len(calls) == 3
    assert result.best == {"step": 4, "metric": "held/mrr@10", "value": 0.7}
    assert_same_weights(
        result.best_model_dir, result.output_dir / "checkpoints" / "checkpoint-4" / "model"
    )
    # The default evaluation reranks the held-out lines; an unknown metric names the known ones.
    with pytest.raises(ValueError, match="'held/ndcg@5' is not among the metrics: held/mrr@10"):
        train_reranker(
            make_reranker_config(
                settings(
                    root,
                    model,
                    "bad-metric",
                    max_steps=1,
                    eval_dirs=[str(root / "held.jsonl")],
                    metric_for_best="held/ndcg@5",
                )
            )
        )


# --- Settings and the command line ---------------------------------------------------------


def parse(argv: list[str]) -> RerankerConfig:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser, RerankerConfig)
    return reranker_config_from_args(parser.parse_args(argv))


def required(root: Path) -> list[str]:
    return ["--model", "m", "--train", str(root / "data"), "--output-dir", str(root / "o")]


def test_yaml_keys_are_flags_and_embedder_only_keys_are_unknown(workspace, tmp_path):
    root, _ = workspace
    config_file = tmp_path / "r.yaml"
    config_file.write_text(
        "group_size: 6\nloss: pointwise\nbatch_size: 12\nmini_batch_size: 2\nmax_length: 64\n"
        "learning_rate: 3e-5\neval_top_n: 20\nsource_weights: {a: 2}\n"
    )
    from_file = parse(["--config", str(config_file), *required(root)])
    from_flags = parse(
        required(root)
        + "--group-size 6 --loss pointwise --batch-size 12 --mini-batch-size 2 "
        "--max-length 64 --learning-rate 3e-5 --eval-top-n 20 --source-weights a=2".split()
    )
    assert from_file == from_flags and from_file.learning_rate == 3e-5
    assert parse(required(root)).group_size == 8  # FlagEmbedding's train_group_size
    shared = set(fields_of(RerankerConfig)) & {"hard_negatives", "temperature", "pooling"}
    assert not shared, "embedder-only keys are not reranker keys"


@pytest.mark.parametrize(
    "text, message",
    [
        ("group_size: 1\n", "key 'group_size': must be >= 2, got 1"),
        ("loss: hinge\n", "key 'loss': must be one of listwise, pointwise, got 'hinge'"),
        ("mini_batch_size: 0\n", "key 'mini_batch_size': must be >= 1, got 0"),
        ("eval_top_n: zero\n", "key 'eval_top_n': expected an integer, got 'zero'"),
        ("temperature: 0.05\n", "unknown key 'temperature'"),
        ("groupsize: 4\n", "unknown key 'groupsize' (did you mean 'group_size'?)"),
        ("metric_for_best: held/mrr@10\n", "key 'metric_for_best': needs eval_dirs"),
    ],
)
def test_bad_config_files_name_file_and_key(workspace, tmp_path, text, message):
    root, _ = workspace
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(text)
    with pytest.raises(ConfigError) as error:
        parse(["--config", str(config_file), *required(root)])
    assert message in str(error.value)
    assert str(config_file) in str(error.value)


def test_bad_flags_name_the_flag(workspace, tmp_path):
    root, _ = workspace
    with pytest.raises(ConfigError, match="--group-size: key 'group_size': must be >= 2"):
        parse([*required(root), "--group-size", "1"])
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("a\tb\t1\n")
    with pytest.raises(ConfigError, match="key 'eval_dirs': expected a BEIR folder or a .jsonl"):
        parse([*required(root), "--eval-dirs", str(pairs)])


def test_shipped_recipe_is_valid_and_sized_for_an_hour_on_two_cores(workspace):
    root, _ = workspace
    config = parse(["--config", str(RECIPE), "--train", str(root / "data"), "--output-dir", "o"])
    assert config.model == "../shared/models/me5-small-zh"
    assert (config.group_size, config.loss, config.max_length) == (8, "listwise", 256)
    assert 2e-5 <= config.learning_rate <= 3e-5
    # About 20 pair forwards + backwards per second: 60 minutes are ~72k pairs, less evaluation.
    assert config.max_steps * config.batch_size * config.group_size <= 72_000 * 0.9
    assert config.mini_batch_size <= config.batch_size
    assert "--range-min" in RECIPE.read_text()  # how to mine for a reranker is documented


def test_cli_trains_end_to_end_and_reports_bad_lines(workspace, capsys):
    root, model = workspace
    output = root / "cli"
    argv = [
        "train-reranker",
        "--model",
        str(model),
        "--train",
        str(root / "data"),
        "--output-dir",
        str(output),
        "--group-size",
        "3",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--report-to",
        "none",
        "--eval-dirs",
        str(root / "held.jsonl"),
        "--metric-for-best",
        "held/ndcg@10",
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert f"trained 2 steps; model saved to {output / 'model'}" in printed
    assert "best held/ndcg@10 = " in printed
    assert Reranker.from_pretrained(output / "model", device="cpu").max_length == 128
    bad = root / "bad" / "train.jsonl"
    bad.parent.mkdir(exist_ok=True)
    bad.write_text('{"query": "问", "pos": "答"}\n')
    argv = ["train-reranker", "--model", str(model), "--train", str(bad), "--output-dir"]
    assert cli_main([*argv, str(root / "bad-out"), "--report-to", "none"]) == 2
    assert f"peg-rag train-reranker: error: {bad}:1: field 'pos'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["train-reranker", "--help"])
    assert "--group-size" in capsys.readouterr().out


def test_module_entry_point_reports_config_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "peg_rag.trainer.reranker", "--model", "m", "--train", "x.jsonl"]
        + ["--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "python -m peg_rag.trainer.reranker: error:" in result.stderr
    assert "path does not exist: x.jsonl" in result.stderr


def test_importing_the_reranker_trainer_leaves_train_a_function():
    # A package attribute named like a submodule is replaced by the submodule once that is
    # imported; the reranker's modules must not import trainer/train.py.
    code = (
        "from peg_rag.trainer import TrainResult, train_reranker\n"
        "from peg_rag.trainer import train\n"
        "print(type(train).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "function", result.stderr[-2000:]
