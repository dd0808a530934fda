"""Hard-negative mining against a brute-force reference, and the ``mine`` command."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import CHINESE_TEXTS, PASSAGES, build_sharp_reranker

from peg_rag import Reranker
from peg_rag.cli import main
from peg_rag.core.encoder import PEGEncoder
from peg_rag.core.records import DataError
from peg_rag.trainer.data import parse_example
from peg_rag.trainer.mine import (
    MiningOptions,
    encode_queries,
    mine_file,
    mine_negatives,
    own_pool,
)


def write_lines(path: Path, records: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return path


def training_records() -> list[dict]:
    records = [
        {
            "query": q,
            "pos": [PASSAGES[i]],
            "neg": [PASSAGES[i + 8]] if i < 4 else [],
            "task": "retrieval",
            "source": "tiny",
        }
        for i, q in enumerate(CHINESE_TEXTS)
    ]
    records[1]["prompt"] = "问题："
    records[2]["query"] = PASSAGES[5]  # a query equal to another line's positive
    records[3]["pos"].append(PASSAGES[9])  # two positives (PASSAGES[9] is also line 1's neg)
    return records


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return PEGEncoder.from_pretrained(tiny_model_dir, device="cpu", pooling="mean")


def examples_of(records):
    return [parse_example(r, None) for r in records]


def reference(encoder, examples, pool, options: MiningOptions) -> list[list[str]]:
    """Every eligible window candidate of each line, computed from the full score matrix."""
    pool_vectors = encoder.encode(pool, "passage")
    eligible = []
    for e in examples:
        text, kind = (e.prompt + e.query, None) if e.prompt else (e.query, "query")
        q = encoder.encode([text], kind)[0]
        scores = pool_vectors @ q
        order = np.lexsort((np.arange(len(pool)), -scores))[options.range_min : options.range_max]
        ceiling = options.max_score_ratio * min(encoder.encode(e.pos, "passage") @ q)
        excluded = {e.query, *e.pos}
        eligible.append(
            [pool[j] for j in order if pool[j] not in excluded and scores[j] <= ceiling]
        )
    return eligible


@pytest.mark.parametrize("window", [(0, 100), (2, 7), (5, 6)])
def test_all_eligible_candidates_when_asking_for_many(encoder, window):
    examples = examples_of(training_records())
    pool = own_pool(examples)
    options = MiningOptions(
        negatives=100, range_min=window[0], range_max=window[1], max_score_ratio=10.0
    )
    chosen, stats = mine_negatives(encoder, examples, pool, options)
    assert chosen == reference(encoder, examples, pool, options)
    width = min(window[1], len(pool)) - window[0]
    assert all(len(negs) <= width for negs in chosen)
    assert stats.negatives == sum(map(len, chosen)) and stats.short_lines == len(examples)


def test_skips_positives_and_the_query(encoder):
    examples = examples_of(training_records())
    pool = own_pool(examples)
    options = MiningOptions(negatives=100, range_min=0, range_max=100, max_score_ratio=10.0)
    chosen, stats = mine_negatives(encoder, examples, pool, options)
    for example, negatives in zip(examples, chosen, strict=True):
        assert not {example.query, *example.pos} & set(negatives)
        assert len(negatives) == len(pool) - len({example.query, *example.pos} & set(pool))
    # each line's positives are in the pool; line 2's query is line 5's positive
    assert stats.skipped_equal == sum(len(e.pos) for e in examples) + 1
    assert stats.skipped_score == 0


def test_skips_positives_of_other_lines_with_the_same_query(encoder):
    records = training_records()
    # one line per (query, positive) pair: line 0's query again, with a second positive
    records.append({**records[0], "pos": [PASSAGES[6]], "neg": []})
    examples = examples_of(records)
    pool = own_pool(examples)
    options = MiningOptions(negatives=100, range_min=0, range_max=100, max_score_ratio=10.0)
    chosen, _ = mine_negatives(encoder, examples, pool, options)
    for line in (0, len(records) - 1):
        assert not {PASSAGES[0], PASSAGES[6]} & set(chosen[line])
    assert PASSAGES[6] in chosen[1] and PASSAGES[0] in chosen[1]  # other queries draw them


def test_score_ratio_guard(encoder):
    examples = examples_of(training_records())
    pool = own_pool(examples)
    loose = MiningOptions(negatives=100, range_min=0, range_max=100, max_score_ratio=10.0)
    # A ratio inside the observed spread, so the guard drops some candidates, not all.
    query_vectors, rows = encode_queries(encoder, examples)
    positives = encoder.encode([e.pos[0] for e in examples], "passage")
    pos_scores = (query_vectors[rows] * positives).sum(axis=1)
    ratios = (query_vectors[rows] @ encoder.encode(pool, "passage").T) / pos_scores[:, None]
    assert (pos_scores > 0).all()
    strict = MiningOptions(
        negatives=100, range_min=0, range_max=100, max_score_ratio=float(np.median(ratios))
    )
    chosen, stats = mine_negatives(encoder, examples, pool, strict)
    all_chosen, _ = mine_negatives(encoder, examples, pool, loose)
    assert chosen == reference(encoder, examples, pool, strict)
    assert 0 < stats.skipped_score < sum(map(len, all_chosen))
    assert sum(map(len, chosen)) + stats.skipped_score == sum(map(len, all_chosen))


def test_seeded_sampling_is_deterministic(encoder):
    examples = examples_of(training_records())
    pool = own_pool(examples)
    options = MiningOptions(negatives=3, range_min=1, range_max=12, max_score_ratio=10.0)
    first, stats = mine_negatives(encoder, examples, pool, options)
    again, _ = mine_negatives(encoder, examples, pool, options)
    other, _ = mine_negatives(
        encoder,
        examples,
        pool,
        MiningOptions(negatives=3, range_min=1, range_max=12, max_score_ratio=10.0, seed=1),
    )
    every = reference(encoder, examples, pool, options)
    assert first == again and first != other
    for negatives, eligible in zip(first, every, strict=True):
        assert len(negatives) == min(3, len(eligible))
        assert negatives == [t for t in eligible if t in negatives]  # a subset, in rank order
    assert stats.short_lines == sum(len(e) < 3 for e in every)


def test_mine_file_keeps_fields_and_uses_a_corpus(tmp_path, encoder):
    records = training_records()
    source = write_lines(tmp_path / "train.jsonl", records)
    corpus = write_lines(
        tmp_path / "corpus.jsonl",
        [{"_id": str(i), "title": "", "text": t} for i, t in enumerate(PASSAGES[6:])],
    )
    options = MiningOptions(negatives=2, range_min=0, range_max=4)
    stats = mine_file(encoder, source, tmp_path / "out.jsonl", corpus=[corpus], options=options)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").open(encoding="utf-8")]
    assert stats.pool == len(PASSAGES) - 6 and stats.lines == len(records)
    for before, after in zip(records, out, strict=True):
        assert list(after) == list(before)  # same fields, same order
        assert {k: v for k, v in after.items() if k != "neg"} == {
            k: v for k, v in before.items() if k != "neg"
        }
        assert set(after["neg"]) <= set(PASSAGES[6:]) - set(before["pos"])


def test_refuses_to_overwrite(tmp_path, encoder, capsys):
    source = write_lines(tmp_path / "train.jsonl", training_records())
    original = source.read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite the input"):
        mine_file(encoder, source, tmp_path / "." / "train.jsonl", overwrite=True)
    existing = tmp_path / "taken.jsonl"
    existing.write_text("keep me\n")
    argv = ["mine", str(source), "--model", "unused", "--output", str(existing)]
    assert main(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert source.read_bytes() == original and existing.read_text() == "keep me\n"


def test_bad_lines_name_file_line_and_field(tmp_path, encoder):
    records = training_records()
    records[2]["pos"] = []
    source = write_lines(tmp_path / "train.jsonl", records)
    with pytest.raises(DataError, match=r"train.jsonl:3: field 'pos': needs at least 1"):
        mine_file(encoder, source, tmp_path / "out.jsonl")
    records[2]["pos"] = ["好"]
    write_lines(source, records)
    with source.open("a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    with pytest.raises(DataError, match=rf"train.jsonl:{len(records) + 1}: invalid JSON"):
        mine_file(encoder, source, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_mines(tmp_path, tiny_model_dir, capsys):
    source = write_lines(tmp_path / "train.jsonl", training_records())
    out = tmp_path / "mined.jsonl"
    argv = [
        "mine",
        str(source),
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--output",
        str(out),
        "--negatives",
        "2",
        "--range-min",
        "1",
        "--range-max",
        "8",
        "--max-score-ratio",
        "2",
    ]
    assert main(argv) == 0
    assert "negatives for 8 lines from a pool of" in capsys.readouterr().out
    mined = [json.loads(line)["neg"] for line in out.open(encoding="utf-8")]
    assert len(mined) == 8 and all(1 <= len(negs) <= 2 for negs in mined)


class Recording(Reranker):
    """A reranker that keeps every pair it is asked to score, in ``scored``."""

    scored: list[tuple[str, str]]

    def score_pairs(self, pairs, **options):
        self.scored.extend(pairs)
        return super().score_pairs(pairs, **options)


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory):
    return build_sharp_reranker(tmp_path_factory.mktemp("guard") / "reranker", PASSAGES)


@pytest.fixture(scope="module")
def loaded_guard(reranker_dir):
    return Recording.from_pretrained(reranker_dir, device="cpu")


@pytest.fixture
def guard(loaded_guard):
    loaded_guard.scored = []
    return loaded_guard


def split_point(values) -> float:
    """A cut through the widest gap in the middle half of ``values``, clear of all of them."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    low, high = len(v) // 4, 3 * len(v) // 4
    i = low + int(np.argmax(np.diff(v[low : high + 1])))
    assert v[i + 1] - v[i] > 2e-3, "no clear cut: batching noise could flip a candidate"
    return float(v[i] + v[i + 1]) / 2


@pytest.mark.parametrize("rule", ["threshold", "margin"])
def test_reranker_guard_drops_exactly_the_relevant_sampled_candidates(encoder, guard, rule):
    examples = examples_of(training_records())
    pool = own_pool(examples)
    options = MiningOptions(negatives=3, range_min=0, range_max=100, max_score_ratio=10.0)
    every = reference(encoder, examples, pool, options)
    # What the rule looks at, for every window candidate: its sigmoid score, or that minus
    # the line's weakest positive's.
    value = {}
    for e, candidates in zip(examples, every, strict=True):
        lowest = guard.score(e.query, e.pos, normalize=True).min() if rule == "margin" else 0
        scores = guard.score(e.query, candidates, normalize=True)
        for c, p in zip(candidates, scores, strict=True):
            value[e.query, c] = float(p - lowest)
    cut = split_point(list(value.values()))
    if rule == "threshold":  # drop when sigmoid >= T
        options = replace(options, reranker_threshold=cut)
    else:  # drop when sigmoid > lowest positive's - M
        options = replace(options, reranker_margin=-cut)
    guard.scored = []
    chosen, stats = mine_negatives(encoder, examples, pool, options, reranker=guard)
    sampled_lines, dropped = [], 0
    for e, candidates, negatives in zip(examples, every, chosen, strict=True):
        asked = [c for q, c in guard.scored if q == e.query]
        sampled = [c for c in asked if c not in e.pos]
        # positives are scored only for the margin rule, once, and only where candidates are
        assert [c for c in asked if c in e.pos] == (e.pos if rule == "margin" else [])
        assert len(set(sampled)) == len(sampled) and set(sampled) <= set(candidates)
        kept = [c for c in candidates if c in sampled and value[e.query, c] < cut]
        assert negatives == kept  # kept: the sampled candidates on the right side, by rank
        assert len(negatives) == 3 or set(sampled) == set(candidates)  # short: window spent
        dropped += len(sampled) - len(kept)
        sampled_lines.append(len(sampled))
    assert stats.skipped_reranker == dropped > 0
    assert stats.reranker_scored == sum(sampled_lines) < sum(map(len, every))  # only sampled
    assert max(sampled_lines) > 3  # dropped candidates were replaced by further draws
    assert stats.negatives == sum(map(len, chosen))
    assert (
        f"the reranker scored {stats.reranker_scored} sampled candidates and dropped "
        f"{dropped} as relevant" in stats.summary()
    )


def test_a_reranker_that_drops_nothing_changes_nothing(encoder, guard):
    examples = examples_of(training_records())
    pool = own_pool(examples)
    options = MiningOptions(negatives=3, range_min=1, range_max=12, max_score_ratio=10.0)
    plain, plain_stats = mine_negatives(encoder, examples, pool, options)
    keep_all = replace(options, reranker_threshold=1.0)  # the sigmoid of these logits is < 1
    guarded, stats = mine_negatives(encoder, examples, pool, keep_all, reranker=guard)
    assert guarded == plain and stats.skipped_reranker == 0
    assert stats.reranker_scored == len(guard.scored) == plain_stats.negatives


def test_reranker_rules_are_checked(encoder):
    with pytest.raises(ValueError, match="not both"):
        MiningOptions(reranker_threshold=0.5, reranker_margin=0.1)
    with pytest.raises(ValueError, match=r"reranker_threshold is a sigmoid score in \[0, 1\]"):
        MiningOptions(reranker_threshold=1.5)
    with pytest.raises(ValueError, match=r"reranker_margin .* in \[-1, 1\]"):
        MiningOptions(reranker_margin=-2)
    examples = examples_of(training_records())
    with pytest.raises(ValueError, match="need a reranker"):
        mine_negatives(encoder, examples, own_pool(examples), MiningOptions(reranker_margin=0))


def test_mining_drops_teacher_scores_of_the_old_negatives(tmp_path, encoder):
    records = training_records()
    records[0]["pos_scores"], records[0]["neg_scores"] = [2.0], [0.5]
    source = write_lines(tmp_path / "train.jsonl", records)
    mine_file(encoder, source, tmp_path / "out.jsonl", options=MiningOptions(range_min=0))
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").open(encoding="utf-8")]
    assert list(out[0]) == [k for k in records[0] if not k.endswith("_scores")]
    assert not any("pos_scores" in r or "neg_scores" in r for r in out)


def test_cli_mines_with_a_reranker_guard(tmp_path, tiny_model_dir, reranker_dir, capsys):
    source = write_lines(tmp_path / "train.jsonl", training_records())
    argv = ["mine", str(source), "--model", str(tiny_model_dir), "--device", "cpu"]
    argv += ["--range-min", "0", "--negatives", "3", "--max-score-ratio", "10"]
    guarded = [*argv, "--reranker", str(reranker_dir)]
    assert (
        main([*guarded, "--output", str(tmp_path / "margin.jsonl"), "--reranker-margin", "0"]) == 0
    )
    summary = capsys.readouterr().out
    found = re.search(r"the reranker scored (\d+) sampled candidates and dropped (\d+)", summary)
    assert found and int(found[1]) >= int(found[2]) > 0
    stats = mine_file(
        PEGEncoder.from_pretrained(tiny_model_dir, device="cpu"),
        source,
        tmp_path / "library.jsonl",
        options=MiningOptions(range_min=0, negatives=3, max_score_ratio=10, reranker_margin=0),
        reranker=Reranker.from_pretrained(reranker_dir, device="cpu"),
    )
    assert stats.summary() in summary
    assert main([*guarded, "--output", str(tmp_path / "default.jsonl")]) == 0  # margin 0
    for name in ("margin.jsonl", "default.jsonl"):
        assert (tmp_path / name).read_bytes() == (tmp_path / "library.jsonl").read_bytes()
    assert main([*argv, "--output", str(tmp_path / "x.jsonl"), "--reranker-threshold", "0.5"]) == 2
    assert "--reranker-threshold and --reranker-margin need --reranker" in capsys.readouterr().err
