"""Trainer settings: YAML keys equal CLI flags, and bad settings give clear errors."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_utils import make_records, write_lines

from peg_rag.cli import build_parser
from peg_rag.trainer import ConfigError, TrainConfig, config_from_args, make_config
from peg_rag.trainer.config import FIELDS, add_arguments

PEG_YAML = Path(__file__).resolve().parents[1] / "trainer" / "configs" / "peg.yaml"


@pytest.fixture
def train_file(tmp_path) -> Path:
    return write_lines(tmp_path / "train.jsonl", make_records(4))


def parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def required(train_file: Path, tmp_path: Path) -> list[str]:
    return ["--model", "m", "--train", str(train_file), "--output-dir", str(tmp_path / "o")]


def test_yaml_keys_are_cli_flags(tmp_path, train_file):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        f"model: m\ntrain: [{train_file}]\noutput_dir: {tmp_path / 'o'}\n"
        "batch_size: 12\nmini_batch_size: 3\nhard_negatives: 2\ntemperature: 0.05\n"
        "progressive: cosine\ngamma_end: 1.5\nmax_steps: 7\nsave_steps: 2\n"
        "learning_rate: 3e-5\nmax_length: 64\nseed: 5\nmask_duplicates: false\n"
        "source_weights: {a: 2}\n"
    )
    from_file = parse(["--config", str(config_file)])
    from_flags = parse(
        required(train_file, tmp_path)
        + "--batch-size 12 --mini-batch-size 3 --hard-negatives 2 --temperature 0.05 "
        "--progressive cosine --gamma-end 1.5 --max-steps 7 --save-steps 2 "
        "--learning-rate 3e-5 --max-length 64 --seed 5 --no-mask-duplicates "
        "--source-weights a=2".split()
    )
    assert from_file == from_flags
    assert from_file.learning_rate == 3e-5  # YAML reads "3e-5" as a string; accepted
    # Flags win over the file.
    assert parse(["--config", str(config_file), "--batch-size", "6"]).batch_size == 6
    # Kebab-case keys are accepted in the file too.
    kebab = tmp_path / "k.yaml"
    kebab.write_text(config_file.read_text().replace("batch_size", "batch-size"))
    assert parse(["--config", str(kebab)]).batch_size == 12


def test_resume_flag_defaults_to_latest(tmp_path, train_file):
    assert parse(required(train_file, tmp_path) + ["--resume"]).resume == "latest"
    assert parse(required(train_file, tmp_path) + ["--resume", "ckpt"]).resume == "ckpt"
    assert parse(required(train_file, tmp_path)).resume is None


def test_required_cli_flags_exist():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {a for action in parser._actions for a in action.option_strings}
    for flag in (
        "--model",
        "--train",
        "--output-dir",
        "--batch-size",
        "--mini-batch-size",
        "--hard-negatives",
        "--temperature",
        "--progressive",
        "--gamma-end",
        "--max-steps",
        "--save-steps",
        "--learning-rate",
        "--max-length",
        "--resume",
        "--seed",
        "--config",
    ):
        assert flag in flags
    assert {f"--{name.replace('_', '-')}" for name in FIELDS} <= flags


@pytest.mark.parametrize(
    "text, message",
    [
        ("batchsize: 4\n", "unknown key 'batchsize' (did you mean 'batch_size'?)"),
        ("batch_size: many\n", "key 'batch_size': expected an integer, got 'many'"),
        ("batch_size: 0\n", "key 'batch_size': must be >= 1, got 0"),
        ("temperature: -1\n", "key 'temperature': must be > 0"),
        ("progressive: fast\n", "key 'progressive': must be one of off, linear, cosine, step"),
        ("mask_duplicates: sometimes\n", "key 'mask_duplicates': expected true or false"),
        ("max_steps: 3\nepochs: 1\n", "set max_steps or epochs, not both"),
        ("warmup_ratio: 1.5\n", "key 'warmup_ratio': must be in [0, 1)"),
        ("weighting: nope\n", "key 'weighting': must be one of focal, self_paced"),
        ("distill_weight: -1\n", "key 'distill_weight': must be >= 0"),
        ("teacher_temperature: 0\n", "key 'teacher_temperature': must be > 0"),
        ("anchor_weight: -0.5\n", "key 'anchor_weight': must be >= 0"),
        ("mix_general: 1\ngeneral_sources: [wiki]\n", "key 'mix_general': must be in [0, 1)"),
        ("mix_general: 0.25\n", "key 'mix_general': needs general_sources"),
        ("distill_weight: 0.5\nhard_negatives: 0\n", "distillation needs hard_negatives >= 1"),
        ("guide_model: m\n", "set false_negative_margin"),
        ("metric_for_best: x/ndcg@10\n", "needs eval_dirs"),
        ("eval_dirs: [/no/such/folder]\n", "path does not exist: /no/such/folder"),
        ("source_weights: {a: 0}\n", "weight of 'a' must be > 0"),
        ("- a\n- b\n", "expected a mapping"),
        ("batch_size: [1\n", "invalid YAML"),
    ],
)
def test_bad_config_files_name_file_and_key(tmp_path, train_file, text, message):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(text)
    with pytest.raises(ConfigError) as error:
        parse(["--config", str(config_file)] + required(train_file, tmp_path))
    assert message in str(error.value)
    if "key '" in message or "unknown" in message or "YAML" in message or "mapping" in message:
        assert str(config_file) in str(error.value)


def test_bad_flags_and_missing_settings(tmp_path, train_file):
    with pytest.raises(ConfigError, match="--mini-batch-size: key 'mini_batch_size': must be >= 1"):
        parse(required(train_file, tmp_path) + ["--mini-batch-size", "0"])
    with pytest.raises(ConfigError, match="missing required setting 'model'"):
        parse(["--train", str(train_file), "--output-dir", "o"])
    with pytest.raises(ConfigError, match="path does not exist: nowhere.jsonl"):
        parse(["--model", "m", "--train", "nowhere.jsonl", "--output-dir", "o"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse(["--config", str(tmp_path / "absent.yaml")])
    with pytest.raises(ConfigError, match="argument batch_size"):
        make_config(model="m", train=[str(train_file)], output_dir="o", batch_size="x")


def test_weighting_and_distillation_keys(tmp_path, train_file):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        "weighting: self_paced\ndistill_weight: 0.5\nteacher_temperature: 2\n"
        f"log_line_weights: {tmp_path / 'weights.jsonl'}\n"
    )
    config = parse(["--config", str(config_file)] + required(train_file, tmp_path))
    assert config.weighting == "self_paced"
    assert (config.distill_weight, config.teacher_temperature) == (0.5, 2.0)
    assert config.log_line_weights == str(tmp_path / "weights.jsonl")
    defaults = parse(required(train_file, tmp_path))
    assert (defaults.distill_weight, defaults.teacher_temperature) == (0.0, 1.0)
    assert defaults.log_line_weights is None and defaults.weighting == "focal"
    # An existing weights file is never appended to by a new run, only by a resumed one.
    (tmp_path / "weights.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="key 'log_line_weights': .*weights.jsonl exists"):
        parse(["--config", str(config_file)] + required(train_file, tmp_path))
    resumed = parse(["--config", str(config_file), "--resume"] + required(train_file, tmp_path))
    assert resumed.log_line_weights == str(tmp_path / "weights.jsonl")


def test_mix_general_flags(tmp_path, train_file):
    config = parse(
        required(train_file, tmp_path)
        + ["--mix-general", "0.25", "--general-sources", "cmrc2018-trial", "drcd"]
    )
    assert (config.mix_general, config.general_sources) == (0.25, ["cmrc2018-trial", "drcd"])
    assert {"general_sources", "mix_general"} <= set(TrainConfig.DATA_ORDER_KEYS)


def test_shipped_peg_config_is_valid_and_has_the_paper_setting(tmp_path, train_file):
    config = parse(["--config", str(PEG_YAML)] + required(train_file, tmp_path))
    assert config.batch_size * (1 + config.hard_negatives) >= 80_000
    assert config.hard_negatives == 5
    assert config.progressive != "off"
    assert config.weighting == "self_paced"  # chosen by the noise study (issue 14)
    assert config.temperature == 0.02


def test_train_command_is_registered(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "--mini-batch-size" in capsys.readouterr().out


def test_module_entry_point_reports_config_errors(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "peg_rag.trainer",
            "--model",
            "m",
            "--train",
            "x.jsonl",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "path does not exist: x.jsonl" in result.stderr
