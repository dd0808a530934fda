"""Training data: validation, per-source batches, sampling, negatives, exact positions."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from trainer_utils import make_records, write_lines

from peg_rag.core.records import DataError
from peg_rag.trainer.data import TrainData, permute


def data(paths, **kwargs) -> TrainData:
    options = {"batch_size": 4, "hard_negatives": 2, "seed": 0, **kwargs}
    return TrainData([str(p) for p in paths], **options)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 64, 1000, 4097])
def test_permute_is_a_bijection(n):
    got = permute(np.arange(n), n, key=12345)
    assert sorted(got.tolist()) == list(range(n))
    if n > 10:
        assert not np.array_equal(got, np.arange(n))  # actually shuffled
        assert not np.array_equal(got, permute(np.arange(n), n, key=54321))  # keyed


@pytest.mark.parametrize(
    "line, field, message",
    [
        ('{"query": "问", "pos": ["答"]', None, "invalid JSON"),
        ('["query"]', None, "expected a JSON object"),
        ('{"pos": ["答"]}', "query", "missing"),
        ('{"query": "问", "pos": []}', "pos", "at least 1"),
        ('{"query": "问", "pos": "答"}', "pos", "expected a list"),
        ('{"query": "问", "pos": ["答"], "neg": [3]}', "neg", "item 0"),
        ('{"query": "问", "pos": ["答"], "source": 5}', "source", "expected a string"),
        ('{"query": "问", "pos": ["答"], "prompt": ["x"]}', "prompt", "expected a string"),
        ('{"query": "  ", "pos": ["答"]}', "query", "empty"),
        (
            '{"query": "问", "pos": ["答"], "neg": ["错"], "pos_scores": [1, 2], '
            '"neg_scores": [0]}',
            "pos_scores",
            "has 2 scores for the 1 texts of 'pos'",
        ),
        (
            '{"query": "问", "pos": ["答"], "neg": ["错"], "pos_scores": [1], "neg_scores": []}',
            "neg_scores",
            "has 0 scores for the 1 texts of 'neg'",
        ),
        ('{"query": "问", "pos": ["答"], "pos_scores": [1]}', "neg_scores", "need both"),
        ('{"query": "问", "pos": ["答"], "neg_scores": []}', "pos_scores", "need both"),
        (
            '{"query": "问", "pos": ["答"], "pos_scores": 1.5, "neg_scores": []}',
            "pos_scores",
            "expected a list of numbers, got float",
        ),
        (
            '{"query": "问", "pos": ["答"], "pos_scores": ["2"], "neg_scores": []}',
            "pos_scores",
            "item 0 is not a finite number: '2'",
        ),
        (
            '{"query": "问", "pos": ["答"], "pos_scores": [true], "neg_scores": []}',
            "pos_scores",
            "item 0 is not a finite number: True",
        ),
        (
            '{"query": "问", "pos": ["答"], "neg": ["错"], "pos_scores": [1], "neg_scores": [NaN]}',
            "neg_scores",
            "item 0 is not a finite number: nan",
        ),
        (
            '{"query": "问", "pos": ["答"], "pos_scores": [-Infinity], "neg_scores": []}',
            "pos_scores",
            "not a finite number: -inf",
        ),
        (
            '{"query": "问", "pos": ["答"], "pos_scores": [1e999], "neg_scores": []}',
            "pos_scores",
            "not a finite number: inf",
        ),
        (
            '{"query": "问", "pos": ["答"], "pos_scores": [1' + "0" * 400 + '], "neg_scores": []}',
            "pos_scores",
            "item 0 is not a finite number: 1000",
        ),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, line, field, message):
    good = json.dumps(make_records(1)[0], ensure_ascii=False)
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        data([path])
    text = str(error.value)
    assert f"{path}:3" in text and message in text
    if field:
        assert f"field {field!r}" in text


def test_skip_bad_lines_counts_them(tmp_path, caplog):
    records = [json.dumps(r, ensure_ascii=False) for r in make_records(6)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(records[:3] + ["not json", '{"query": 1}'] + records[3:]) + "\n")
    loaded = data([path], skip_bad_lines=True)
    assert loaded.total_lines == 6
    assert loaded.index.skipped.count == 2
    assert "skipped 2 bad lines" in caplog.text
    loaded.close()


def test_folders_files_and_sources(tmp_path):
    write_lines(tmp_path / "a" / "x.jsonl", make_records(8, source="med"))
    write_lines(tmp_path / "a" / "deeper" / "y.jsonl", make_records(5, source="fin"))
    plain = write_lines(tmp_path / "plain.jsonl", make_records(3))  # no source field
    loaded = data([tmp_path / "a", plain])
    assert dict(zip(loaded.index.sources, loaded.index.sizes, strict=True)) == {
        "med": 8,
        "fin": 5,
        str(plain): 3,
    }
    loaded.close()
    with pytest.raises(ValueError, match="no such file"):
        data([tmp_path / "missing.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .jsonl files"):
        data([tmp_path / "empty"])


def test_every_batch_comes_from_one_source_in_proportion(tmp_path):
    write_lines(tmp_path / "a.jsonl", make_records(300, source="big"))
    write_lines(tmp_path / "b.jsonl", make_records(100, source="small"))
    loaded = data([tmp_path])
    state, counts = loaded.initial_state(), Counter()
    lines = {"big": [], "small": []}
    for _ in range(400):
        batch, state = loaded.batch(state)
        counts[batch.source] += 1
        lines[batch.source].extend(batch.lines)
    share = counts["big"] / 400
    assert 0.68 < share < 0.82  # expected 0.75
    # Each source is read as whole epochs in shuffled order: no line repeats within one.
    assert len(set(lines["big"][:300])) == 300
    assert lines["big"][:300] != sorted(lines["big"][:300])
    # Source weights shift the proportions.
    weighted = data([tmp_path], source_weights={"small": 9.0})
    state, counts = weighted.initial_state(), Counter()
    for _ in range(200):
        batch, state = weighted.batch(state)
        counts[batch.source] += 1
    assert counts["small"] / 200 > 0.65  # expected 0.75
    with pytest.raises(ValueError, match="unknown source"):
        data([tmp_path], source_weights={"nope": 2.0})
    loaded.close()
    weighted.close()


def test_mix_general_gives_each_domain_batch_a_share_of_general_lines(tmp_path):
    write_lines(tmp_path / "med.jsonl", make_records(40, source="med", tag="医"))
    write_lines(tmp_path / "fin.jsonl", make_records(30, source="fin", tag="金"))
    write_lines(tmp_path / "wiki.jsonl", make_records(20, source="wiki", tag="维"))
    write_lines(tmp_path / "news.jsonl", make_records(20, source="news", tag="闻"))
    general = ["wiki", "news"]
    loaded = data([tmp_path], batch_size=8, general_sources=general, mix_general=0.25)
    state, states, wiki, kinds = loaded.initial_state(), [], [], Counter()
    for _ in range(60):
        states.append(state)
        batch, state = loaded.batch(state)
        sources = [o.path.stem for o in batch.origins]
        assert len(sources) == 8 and sources[0] == batch.source
        if batch.source in general:  # a general batch stays whole
            assert set(sources) == {batch.source}
        else:  # 6 lines of its own source, then 2 of one general source
            assert sources[:6] == [batch.source] * 6
            assert len(set(sources[6:])) == 1 and sources[6] in general
            kinds[sources[6]] += 1
        # the texts belong to the lines named: a general line's negatives are its own source's
        texts = zip(batch.queries, batch.negatives, batch.origins, strict=True)
        for query, negatives, origin in texts:
            tag = {"med": "医", "fin": "金", "wiki": "维", "news": "闻"}[origin.path.stem]
            assert query.startswith(tag) and all(n.startswith(tag) for n in negatives)
        wiki += [line for name, line in zip(sources, batch.lines, strict=True) if name == "wiki"]
    assert kinds["wiki"] > 0 and kinds["news"] > 0
    # mixed-in or whole, a source's lines are read as whole epochs: its first 20 are distinct
    assert len(wiki) > 20 and sorted(wiki[:20]) == list(range(20))
    # resuming from a saved position replays the same mixed batches
    again = data([tmp_path], batch_size=8, general_sources=general, mix_general=0.25)
    position = json.loads(json.dumps(states[20]))
    assert again.batch(position)[0].queries == loaded.batch(states[20])[0].queries
    # off by default: the same seed gives whole batches
    plain = data([tmp_path], batch_size=8)
    batch, _ = plain.batch(plain.initial_state())
    assert {o.path.stem for o in batch.origins} == {batch.source}
    with pytest.raises(ValueError, match="general_sources names unknown source"):
        data([tmp_path], general_sources=["nope"], mix_general=0.25)
    for d in (loaded, again, plain):
        d.close()


def test_negatives_come_from_neg_then_filled_from_the_same_source(tmp_path):
    rich = make_records(10, source="rich", negatives=4)
    poor = make_records(10, source="poor", negatives=1, tag="穷")
    write_lines(tmp_path / "rich.jsonl", rich)
    write_lines(tmp_path / "poor.jsonl", poor)
    loaded = data([tmp_path], hard_negatives=3, batch_size=5)
    by_query = {r["query"]: r for r in rich + poor}
    state = loaded.initial_state()
    seen = set()
    for _ in range(12):
        batch, state = loaded.batch(state)
        seen.add(batch.source)
        same_source_pos = {p for r in (rich if batch.source == "rich" else poor) for p in r["pos"]}
        triples = zip(batch.queries, batch.positives, batch.negatives, strict=True)
        for query, positive, negatives in triples:
            record = by_query[query]
            assert positive in record["pos"]
            assert len(negatives) == 3 and len(set(negatives)) == 3
            if batch.source == "rich":
                assert set(negatives) <= set(record["neg"])
            else:
                assert record["neg"][0] in negatives
                fills = set(negatives) - set(record["neg"])
                assert fills <= same_source_pos - set(record["pos"])
    assert seen == {"rich", "poor"}
    loaded.close()


def test_fills_skip_lines_of_the_same_query(tmp_path):
    # One line per (query, positive) pair: each query has three lines, three positives.
    records = make_records(18, negatives=0)
    for i, record in enumerate(records):
        record["query"] = records[i - i % 3]["query"]
    write_lines(tmp_path / "pairs.jsonl", records)
    positives = {}
    for record in records:
        positives.setdefault(record["query"], set()).update(record["pos"])
    loaded = data([tmp_path], hard_negatives=4, batch_size=3)
    state, checked = loaded.initial_state(), 0
    for _ in range(30):
        batch, state = loaded.batch(state)
        for query, negatives in zip(batch.queries, batch.negatives, strict=True):
            assert not set(negatives) & positives[query]
            checked += len(negatives)
    assert checked == 30 * 3 * 4
    loaded.close()


def test_teacher_scores_follow_the_sampled_positive_and_negatives(tmp_path):
    """Each text's score is its own, whatever order the negatives are drawn in; filled-in
    negatives and lines without scores have none (NaN)."""
    records = make_records(12, source="s", negatives=5)
    score_of: dict[tuple[str, str], float] = {}
    for i, record in enumerate(records[:9]):  # the last 3 lines have no scores
        record["pos"].append(f"又一个答案{i}")
        record["pos_scores"] = [10.0 + i, 20.0 + i]
        record["neg"] = record["neg"][: 1 + i % 5]  # short ones get filled in
        record["neg_scores"] = [float(k) + i / 100 for k in range(len(record["neg"]))]
        texts = record["pos"] + record["neg"]
        scores = record["pos_scores"] + record["neg_scores"]
        score_of.update({(record["query"], t): x for t, x in zip(texts, scores, strict=True)})
    write_lines(tmp_path / "t.jsonl", records)
    loaded = data([tmp_path], hard_negatives=3, batch_size=6)
    state = loaded.initial_state()
    checked = filled = unscored = 0
    for _ in range(20):
        batch, state = loaded.batch(state)
        slots = zip(
            batch.queries, batch.positives, batch.negatives, batch.teacher_scores, strict=True
        )
        for query, positive, negatives, scores in slots:
            assert len(scores) == 4
            for text, score in zip([positive, *negatives], scores, strict=True):
                expected = score_of.get((query, text))
                if expected is None:  # a fill, or a line without scores
                    assert math.isnan(score)
                    unscored += 1
                else:
                    assert score == expected
                    checked += 1
            filled += any(math.isnan(x) for x in scores) and not math.isnan(scores[0])
    assert checked > 200 and filled > 10 and unscored > 30
    loaded.close()


def test_origins_name_the_file_and_line_of_each_query(tmp_path):
    records = make_records(7)
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    path = tmp_path / "t.jsonl"
    # A blank line and a skipped bad line still count in the line numbers.
    path.write_text("\n".join(lines[:2] + ["", "not json"] + lines[2:]) + "\n", "utf-8")
    loaded = data([path], batch_size=7, skip_bad_lines=True)
    batch, _ = loaded.batch(loaded.initial_state())
    text = path.read_text("utf-8").splitlines()
    for query, origin in zip(batch.queries, batch.origins, strict=True):
        assert origin.path == path
        assert json.loads(text[origin.line - 1])["query"] == query
    assert sorted(o.line for o in batch.origins) == [1, 2, 5, 6, 7, 8, 9]
    loaded.close()


def test_too_few_texts_to_fill_negatives_is_an_error(tmp_path):
    write_lines(tmp_path / "t.jsonl", make_records(2, negatives=0))
    loaded = data([tmp_path], hard_negatives=3, batch_size=2)
    with pytest.raises(ValueError, match="too few distinct texts"):
        loaded.batch(loaded.initial_state())
    loaded.close()


def test_batches_are_a_pure_function_of_the_position(tmp_path):
    write_lines(tmp_path / "a.jsonl", make_records(23, source="a"))
    write_lines(tmp_path / "b.jsonl", make_records(9, source="b"))
    loaded = data([tmp_path], batch_size=5)
    state, straight, states = loaded.initial_state(), [], []
    for _ in range(15):
        states.append(state)
        batch, state = loaded.batch(state)
        straight.append((batch.source, batch.queries, batch.negatives))
    # Restart from a saved position (through JSON, as a checkpoint stores it).
    again = data([tmp_path], batch_size=5)
    position = json.loads(json.dumps(states[7]))
    replay = []
    for _ in range(8):
        batch, position = again.batch(position)
        replay.append((batch.source, batch.queries, batch.negatives))
    assert replay == straight[7:]
    # A different seed gives a different order.
    other = data([tmp_path], batch_size=5, seed=1)
    assert other.batch(other.initial_state())[0].queries != straight[0][1]
    # The prefetching iterator yields the same sequence.
    batches = loaded.batches(loaded.initial_state(), lambda b: b)
    prefetched = [next(batches)[1].queries for _ in range(15)]
    batches.close()
    assert prefetched == [s[1] for s in straight]
    for d in (loaded, again, other):
        d.close()


def test_index_holds_offsets_not_texts(tmp_path):
    """Memory per line is one 16-byte entry (file and offset, line number), kept in a
    memory-mapped file."""
    write_lines(tmp_path / "a.jsonl", make_records(50))
    loaded = data([tmp_path])
    entries = loaded.index._entries[0]
    assert isinstance(entries, np.memmap) and entries.dtype == np.int64
    assert entries.shape == (50, 2)
    loaded.close()
