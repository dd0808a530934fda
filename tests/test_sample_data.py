"""The bundled knowledge base loads, is consistent, and its questions are not copies."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from peg_rag.apps.sample_data import load_sample_kb, load_sample_questions
from peg_rag.core.records import DataError


def test_sample_kb_has_three_domains_and_unique_ids():
    kb = load_sample_kb()
    assert len(kb) >= 300
    assert len({p.id for p in kb}) == len(kb)
    domains = Counter(p.metadata["domain"] for p in kb)
    assert set(domains) >= {"医保", "旅游", "政务"}
    assert min(domains.values()) >= 90
    assert all(p.title.strip() and len(p.text) >= 40 for p in kb)


def test_questions_point_at_existing_passages_of_their_domain():
    kb = {p.id: p for p in load_sample_kb()}
    questions = load_sample_questions()
    assert len(questions) >= 60
    assert len({q.id for q in questions}) == len(questions)
    for q in questions:
        assert q.gold_ids and all(g in kb for g in q.gold_ids), q
        assert {kb[g].metadata["domain"] for g in q.gold_ids} == {q.domain}


def test_questions_are_paraphrases_not_copies():
    """No question shares a run of 8 characters with its gold passage."""
    kb = {p.id: p for p in load_sample_kb()}
    for q in load_sample_questions():
        grams = {q.text[i : i + 8] for i in range(len(q.text) - 7)}
        for gold in q.gold_ids:
            passage = kb[gold].title + kb[gold].text
            assert not any(g in passage for g in grams), (q.text, gold)


def test_bad_kb_line_names_file_line_and_field(tmp_path):
    path = tmp_path / "kb.jsonl"
    good = {"id": "a", "title": "t", "text": "x"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"id": "b", "title": "t"}) + "\n")
    with pytest.raises(DataError, match=r"kb.jsonl:2: field 'text': missing"):
        load_sample_kb(path)
