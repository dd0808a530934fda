"""The Python filter evaluator (BM25's mask) must agree with Chroma's ``where``."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peg_rag.retrieval.filters import mask, matches, to_chroma, validate_filter
from peg_rag.retrieval.store import ChromaStore

RECORDS = {
    "r0": {"year": 2020, "lang": "zh", "ok": True, "score": 0.5},
    "r1": {"year": 2021, "lang": "en", "ok": False},
    "r2": {"year": 2022, "score": 2.0},
    "r3": {"lang": "zh", "ok": True, "score": 1},
    "r4": {"year": 2021, "lang": "zh", "ok": False, "score": -1.5},
    "r5": {"doc_id": "x"},
}

values = st.sampled_from([2020, 2021, 2022, 1, 0.5, 2.0, -1.5, "zh", "en", "fr", True, False])
numbers = st.sampled_from([2020, 2021, 2021.5, 1, 0.5, 0, -1.5])
fields = st.sampled_from(["year", "lang", "ok", "score", "missing"])


@st.composite
def conditions(draw):
    name = draw(fields)
    kind = draw(
        st.sampled_from(["bare", "$eq", "$ne", "$in", "$nin", "$gt", "$gte", "$lt", "$lte"])
    )
    if kind == "bare":
        return {name: draw(values)}
    if kind in ("$in", "$nin"):  # Chroma wants one type per list
        first = draw(values)
        kind_of_first = type(first)
        same = values.filter(lambda v: type(v) is kind_of_first)
        return {name: {kind: [first, *draw(st.lists(same, max_size=2))]}}
    return {name: {kind: draw(numbers if kind.startswith(("$g", "$l")) else values)}}


where_filters = st.recursive(
    conditions(),
    lambda inner: st.builds(
        lambda op, items: {op: items},
        st.sampled_from(["$and", "$or"]),
        st.lists(inner, min_size=2, max_size=3),
    ),
    max_leaves=5,
)


@pytest.fixture(scope="module")
def chroma():
    import numpy as np

    store = ChromaStore.ephemeral()
    ids = list(RECORDS)
    store.upsert(ids, np.eye(len(ids), 4, dtype=np.float32) + 0.1, ids, list(RECORDS.values()))
    return store.collection


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(where_filters)
def test_python_filters_agree_with_chroma(chroma, where):
    expected = set(chroma.get(where=to_chroma(where), include=[])["ids"])
    ours = {i for i, metadata in RECORDS.items() if matches(where, metadata)}
    assert ours == expected, where


def test_several_fields_mean_all_of_them(chroma):
    where = {"lang": "zh", "ok": True}
    assert to_chroma(where) == {"$and": [{"lang": "zh"}, {"ok": True}]}
    ids = [i for i, m in RECORDS.items() if matches(where, m)]
    assert ids == ["r0", "r3"] == sorted(chroma.get(where=to_chroma(where), include=[])["ids"])
    assert mask(where, list(RECORDS.values())).tolist() == [1, 0, 0, 1, 0, 0]
    # Chroma truncates a float bound compared with an integer value; so do we.
    quirk = {"year": {"$gte": 2021.5}}
    assert matches(quirk, RECORDS["r1"])
    assert "r1" in chroma.get(where=quirk, include=[])["ids"]


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"year": {"$regex": "x"}},
        {"year": {"$gt": "2020"}},
        {"year": {"$in": []}},
        {"year": {"$in": [2020, 0.5]}},
        {"year": {"$eq": 1, "$ne": 2}},
        {"$and": [{"year": 1}]},
        {"$not": {"year": 1}},
        {"year": [1, 2]},
    ],
)
def test_unsupported_filters_are_rejected(bad):
    with pytest.raises(ValueError):
        validate_filter(bad)
