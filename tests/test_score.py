"""Teacher scores (``peg-rag score``): the reranker's logits, other fields kept, resuming an
interrupted run, refusing to overwrite, bad lines named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import CHINESE_TEXTS, build_sharp_reranker
from helpers import PASSAGES as ALL_PASSAGES

from peg_rag import Reranker
from peg_rag.cli import main
from peg_rag.core.records import DataError
from peg_rag.trainer.teacher import partial_path, score_file

PASSAGES = ALL_PASSAGES[:8]  # records() cycles through eight


def records() -> list[dict]:
    lines = [
        {
            "query": q,
            "task": "retrieval",
            "pos": [PASSAGES[i]],
            "neg": [PASSAGES[(i + 1) % 8], PASSAGES[(i + 3) % 8]],
            "source": "tiny",
            "id": i,
        }
        for i, q in enumerate(CHINESE_TEXTS)
    ]
    lines[1]["prompt"] = "问题："
    lines[2]["neg"] = []
    lines[3]["pos"].append(PASSAGES[6])
    lines[4]["pos_scores"], lines[4]["neg_scores"] = [9.0], [9.0, 9.0]  # stale: replaced
    return lines


def write_lines(path: Path, lines: list[dict]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines)
    path.write_text(text, encoding="utf-8")
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sharp_reranker(tmp_path_factory.mktemp("teacher") / "reranker", PASSAGES)


@pytest.fixture(scope="module")
def reranker(reranker_dir: Path) -> Reranker:
    return Reranker.from_pretrained(reranker_dir, device="cpu")


class Interrupted(Reranker):
    """Fails on its call number ``calls`` + 1, like a run killed after ``calls`` chunks."""

    calls = 0

    def score_pairs(self, pairs, **options):
        if self.calls == 0:
            raise RuntimeError("interrupted")
        self.calls -= 1
        return super().score_pairs(pairs, **options)


def test_scores_are_the_rerankers_logits_and_other_fields_are_kept(tmp_path, reranker):
    before = records()
    source = write_lines(tmp_path / "train.jsonl", before)
    stats = score_file(reranker, source, tmp_path / "scored.jsonl", chunk_lines=3)
    after = read_lines(tmp_path / "scored.jsonl")
    assert stats.lines == len(before) and stats.resumed == 0
    assert stats.pairs == sum(len(r["pos"]) + len(r["neg"]) for r in before)
    for old, new in zip(before, after, strict=True):
        assert list(new) == list({**old, "pos_scores": None, "neg_scores": None})  # same order
        assert {k: v for k, v in new.items() if not k.endswith("_scores")} == {
            k: v for k, v in old.items() if not k.endswith("_scores")
        }
        for field in ("pos", "neg"):
            expected = reranker.score(old["query"], old[field]) if old[field] else []
            np.testing.assert_allclose(new[f"{field}_scores"], expected, atol=1e-3)
    logits = [s for r in after for s in r["pos_scores"] + r["neg_scores"]]
    assert np.std(logits) > 0.1 and 9.0 not in logits  # line 5's old scores are replaced
    assert not partial_path(tmp_path / "scored.jsonl").exists()


def test_an_interrupted_run_resumes_to_the_same_file(tmp_path, reranker, reranker_dir):
    source = write_lines(tmp_path / "train.jsonl", records())
    score_file(reranker, source, tmp_path / "whole.jsonl", chunk_lines=3)
    target = tmp_path / "resumed.jsonl"
    partial = partial_path(target)
    broken = Interrupted.from_pretrained(reranker_dir, device="cpu")
    broken.calls = 2
    with pytest.raises(RuntimeError, match="interrupted"):
        score_file(broken, source, target, chunk_lines=3)
    assert not target.exists() and len(partial.read_bytes().splitlines()) == 6
    with partial.open("a", encoding="utf-8") as handle:  # a kill -9 in the middle of a write
        handle.write('{"query": "糖尿病')
    stats = score_file(reranker, source, target, chunk_lines=3)
    assert (stats.lines, stats.resumed) == (8, 6)
    assert stats.pairs == sum(len(r["pos"]) + len(r["neg"]) for r in records()[6:])
    assert target.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert not partial.exists()


def test_refuses_a_partial_file_of_other_input(tmp_path, reranker):
    source = write_lines(tmp_path / "train.jsonl", records())
    target = tmp_path / "out.jsonl"
    partial = partial_path(target)
    other = records()
    other[1]["neg"] = other[1]["neg"][:1]
    score_file(reranker, write_lines(tmp_path / "other.jsonl", other[:3]), partial)
    with pytest.raises(ValueError, match=r"out.jsonl.partial:2 is not .*train.jsonl:2"):
        score_file(reranker, source, target)
    write_lines(source, records()[:2])
    score_file(
        reranker, write_lines(tmp_path / "longer.jsonl", records()[:3]), partial, overwrite=True
    )
    with pytest.raises(ValueError, match="has 3 lines but .*train.jsonl only 2"):
        score_file(reranker, source, target)
    assert not target.exists()


def test_refuses_to_overwrite_the_input_or_an_output(tmp_path, reranker, reranker_dir, capsys):
    source = write_lines(tmp_path / "train.jsonl", records())
    original = source.read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite the input"):
        score_file(reranker, source, tmp_path / "." / "train.jsonl", overwrite=True)
    argv = ["score", str(source), "--reranker", str(reranker_dir), "--output", str(source)]
    assert main([*argv, "--overwrite"]) == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err
    existing = tmp_path / "taken.jsonl"
    existing.write_text("keep me\n")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        score_file(reranker, source, existing)
    assert source.read_bytes() == original and existing.read_text() == "keep me\n"
    score_file(reranker, source, existing, overwrite=True)
    assert len(read_lines(existing)) == len(records())


def test_bad_lines_are_named_by_file_line_and_field(tmp_path, reranker):
    lines = records()
    lines[5]["pos"] = []
    source = write_lines(tmp_path / "train.jsonl", lines)
    target = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=r"train.jsonl:6: field 'pos': needs at least 1"):
        score_file(reranker, source, target, chunk_lines=2)
    write_lines(source, records())
    with source.open("a", encoding="utf-8") as handle:
        handle.write("\n{not json\n")
    with pytest.raises(DataError, match=r"train.jsonl:10: invalid JSON"):
        score_file(reranker, source, target)
    assert not target.exists()


def test_cli_scores_with_the_given_max_length(tmp_path, reranker_dir, capsys):
    source = write_lines(tmp_path / "train.jsonl", records())
    out = tmp_path / "scored.jsonl"
    argv = ["score", str(source), "--reranker", str(reranker_dir), "--output", str(out)]
    assert main([*argv, "--device", "cpu", "--batch-size", "3", "--max-length", "12"]) == 0
    assert f"wrote {out}: 8 lines; scored " in capsys.readouterr().out
    short = Reranker.from_pretrained(reranker_dir, device="cpu", max_length=12)
    full = Reranker.from_pretrained(reranker_dir, device="cpu")
    scored = read_lines(out)
    for record in scored:
        ours = record["pos_scores"] + record["neg_scores"]
        passages = record["pos"] + record["neg"]
        np.testing.assert_allclose(ours, short.score(record["query"], passages), atol=1e-3)
    cut = [full.score(r["query"], r["pos"])[0] - r["pos_scores"][0] for r in scored]
    assert np.abs(cut).max() > 0.1  # 12 tokens cut the pairs: the flag reached the model
