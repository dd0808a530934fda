"""Chunked InfoNCE, its masks, and progressive weighting against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import CHINESE_TEXTS as T
from trainer_utils import reference_loss

from peg_rag.trainer.collate import build_inputs
from peg_rag.trainer.data import Batch
from peg_rag.trainer.loss import chunked_infonce
from peg_rag.trainer.progressive import (
    WEIGHTINGS,
    focal,
    gamma_at,
    register_weighting,
    self_paced,
)


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=-1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_chunked_loss_and_gradients_equal_unchunked(chunk, gamma):
    q, c = unit(7, 16, 0), unit(19, 16, 1)
    pos = torch.tensor([0, 3, 5, 5, 9, 18, 2])
    out = chunked_infonce(
        q, c, pos, temperature=0.05, chunk_size=chunk, weighting=focal, gamma=gamma
    )
    qr, cr = q.clone().requires_grad_(), c.clone().requires_grad_()
    loss, w = reference_loss(qr, cr, pos, 0.05, gamma=gamma, weighting=focal)
    loss.backward()
    total = out.weights.sum()
    assert torch.allclose(out.weighted_loss / total, loss, rtol=1e-5)
    assert torch.allclose(out.weights, w, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.grad_queries / total, qr.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(out.grad_candidates / total, cr.grad, rtol=1e-4, atol=1e-6)
    # Ranks: 1 + columns scoring above the positive.
    scores = q @ c.T
    expected = (scores > scores[torch.arange(7), pos][:, None]).sum(1) + 1
    assert torch.equal(out.positive_rank, expected)


@pytest.mark.parametrize("margin", [0.1, -0.05])  # negative: only clearly above the positive
def test_false_negative_margin_masks_candidates_close_to_the_positive(margin):
    q, c = unit(5, 8, 2), unit(12, 8, 3)
    pos = torch.tensor([1, 4, 4, 7, 0])
    scores = q @ c.T
    expected_mask = scores > (scores[torch.arange(5), pos] - margin)[:, None]
    expected_mask[torch.arange(5), pos] = False
    assert expected_mask.any(), "the fixture must contain near-positive candidates"
    out = chunked_infonce(q, c, pos, temperature=0.1, chunk_size=2, false_negative_margin=margin)
    qr, cr = q.clone().requires_grad_(), c.clone().requires_grad_()
    loss, _ = reference_loss(qr, cr, pos, 0.1, mask=expected_mask)
    loss.backward()
    assert int(out.masked) == int(expected_mask.sum())
    assert torch.allclose(out.weighted_loss / 5, loss, rtol=1e-5)
    assert torch.allclose(out.grad_candidates / 5, cr.grad, rtol=1e-4, atol=1e-6)
    # Masking changes the loss: the test can fail.
    unmasked = chunked_infonce(q, c, pos, temperature=0.1, chunk_size=2)
    assert not torch.allclose(unmasked.weighted_loss, out.weighted_loss)


def test_false_negatives_scored_by_a_guide_encoder():
    q, c = unit(4, 8, 4), unit(9, 8, 5)
    gq, gc = unit(4, 8, 6), unit(9, 8, 7)
    pos = torch.tensor([0, 1, 2, 3])
    margin = 0.3
    guide_scores = gq @ gc.T
    expected_mask = guide_scores > (guide_scores[torch.arange(4), pos] - margin)[:, None]
    expected_mask[torch.arange(4), pos] = False
    out = chunked_infonce(
        q, c, pos, temperature=0.1, chunk_size=3, false_negative_margin=margin, guide=(gq, gc)
    )
    loss, _ = reference_loss(q, c, pos, 0.1, mask=expected_mask)
    assert int(out.masked) == int(expected_mask.sum()) > 0
    assert torch.allclose(out.weighted_loss / 4, loss, rtol=1e-5)


def test_explicit_mask_pairs_leave_the_softmax():
    q, c = unit(3, 8, 8), unit(6, 8, 9)
    pos = torch.tensor([0, 1, 2])
    rows, cols = torch.tensor([0, 2, 2]), torch.tensor([4, 0, 5])
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[rows, cols] = True
    out = chunked_infonce(
        q, c, pos, temperature=0.1, chunk_size=2, masked_queries=rows, masked_columns=cols
    )
    loss, _ = reference_loss(q, c, pos, 0.1, mask=mask)
    assert torch.allclose(out.weighted_loss / 3, loss, rtol=1e-5)
    assert int(out.masked) == 3


def passthrough_tokenize(texts, kind):
    """One token per character: enough to test indexing without a model."""
    return [[ord(ch) % 1000 for ch in t] for t in texts], 0


def test_identical_texts_are_one_column_and_never_negatives():
    # Query 1's negative is query 0's positive text; queries 2 and 3 share their text.
    batch = Batch(
        "s",
        queries=[T[0], T[1], T[2], T[2]],
        prompts=[None] * 4,
        positives=[T[4], T[5], T[6], T[7]],
        negatives=[[T[5]], [T[4]], [T[3]], [T[3]]],
        lines=[0, 1, 2, 3],
    )
    inputs = build_inputs(batch, passthrough_tokenize)
    # Distinct texts: 3 queries + T4..T7 + T3 as passages.
    assert len(inputs.ids) == 8
    assert inputs.n_texts == 12
    columns = [inputs.keys[r] for r in inputs.column_rows.tolist()]
    assert len(columns) == len(set(columns)) == 5
    # Query 2's and 3's positives are known positives of each other, so masked.
    pairs = set(zip(inputs.masked_queries.tolist(), inputs.masked_columns.tolist(), strict=True))
    assert pairs == {(2, int(inputs.positive_columns[3])), (3, int(inputs.positive_columns[2]))}

    plain = build_inputs(batch, passthrough_tokenize, mask_duplicates=False)
    assert len(plain.column_rows) == 8  # every slot a column: duplicates count as negatives
    assert len(plain.masked_queries) == 0


def test_duplicate_masking_changes_the_loss_as_defined():
    """Slot-level InfoNCE with identical-text slots masked equals the de-duplicated loss."""
    batch = Batch("s", [T[0], T[1]], [None, None], [T[4], T[5]], [[T[5]], [T[4]]], [0, 1])
    inputs = build_inputs(batch, passthrough_tokenize)
    plain = build_inputs(batch, passthrough_tokenize, mask_duplicates=False)
    emb = unit(len(inputs.ids), 8, 10)
    got = chunked_infonce(
        emb[inputs.query_rows],
        emb[inputs.column_rows],
        inputs.positive_columns,
        temperature=0.1,
        chunk_size=1,
    )
    # Slot-level: columns [pos0, pos1, neg0, neg1] = [T4, T5, T5, T4]; for query 0, slot 3
    # (T4, its own positive's text) and slot 2 (a second copy of T5) are masked.
    slot_rows = plain.column_rows
    mask = torch.tensor([[False, False, True, True], [False, False, True, True]])
    expected, _ = reference_loss(
        emb[plain.query_rows], emb[slot_rows], plain.positive_columns, 0.1, mask
    )
    assert torch.allclose(got.weighted_loss / 2, expected, rtol=1e-5)
    unmasked = chunked_infonce(
        emb[plain.query_rows], emb[slot_rows], plain.positive_columns, temperature=0.1, chunk_size=1
    )
    assert not torch.allclose(unmasked.weighted_loss, got.weighted_loss)


def test_progressive_weights_follow_the_formula():
    p = torch.tensor([0.0, 0.25, 0.5, 0.99, 1.0])
    for gamma in (0.0, 0.5, 2.0):
        expected = torch.tensor([(1 - x) ** gamma for x in p.tolist()])
        assert torch.allclose(focal(p, gamma), expected)
    assert torch.equal(focal(p, 0.0), torch.ones(5))  # gamma 0: plain InfoNCE
    # In the loss: weights normalized to mean 1 give sum_i w_i l_i / sum_i w_i.
    q, c = unit(6, 8, 11), unit(6, 8, 12)
    pos = torch.arange(6)
    out = chunked_infonce(q, c, pos, temperature=0.1, chunk_size=4, weighting=focal, gamma=2.0)
    probs = (q @ c.T / 0.1).softmax(dim=1).diagonal()
    assert torch.allclose(out.weights, (1 - probs) ** 2, rtol=1e-5)


def test_self_paced_weights_follow_the_formula():
    p = torch.tensor([0.0, 0.04, 0.25, 0.5, 1.0])
    assert self_paced(p, 0.5).tolist() == pytest.approx([0.0, 0.2, 0.5, 0.5**0.5, 1.0])
    assert self_paced(p, 2.0).tolist() == pytest.approx([0.0, 0.0016, 0.0625, 0.25, 1.0])
    assert torch.equal(self_paced(p, 0.0), torch.ones(5))  # gamma 0: plain InfoNCE, even at p=0
    # Increasing in p (the hardest queries count least), the opposite of focal.
    grid = torch.linspace(0.01, 0.99, 50)
    for gamma in (0.5, 1.0, 3.0):
        assert (self_paced(grid, gamma).diff() > 0).all()
        assert (focal(grid, gamma).diff() < 0).all()
    # A hard query's weight relative to an easy one's shrinks as gamma grows.
    ratios = [
        float(self_paced(torch.tensor(0.1), g) / self_paced(torch.tensor(0.9), g))
        for g in (0, 1, 2)
    ]
    assert ratios == pytest.approx([1.0, 1 / 9, 1 / 81])
    # In the loss, with the probability of each positive.
    q, c = unit(6, 8, 11), unit(6, 8, 12)
    out = chunked_infonce(
        q, c, torch.arange(6), temperature=0.1, chunk_size=4, weighting=self_paced, gamma=1.5
    )
    probs = (q @ c.T / 0.1).softmax(dim=1).diagonal()
    assert torch.allclose(out.p_positive, probs, rtol=1e-5)
    assert torch.allclose(out.weights, probs**1.5, rtol=1e-5)
    assert WEIGHTINGS["self_paced"] is self_paced


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("linear", [0.0, 0.5, 1.0, 1.5, 2.0]),
        ("cosine", [2 * (1 - math.cos(math.pi * t)) / 2 for t in (0, 0.25, 0.5, 0.75, 1)]),
        ("off", [0.0] * 5),
    ],
)
def test_gamma_schedules(schedule, expected):
    got = [gamma_at(schedule, s, 5, 0.0, 2.0) for s in range(5)]
    assert got == pytest.approx(expected)


def test_step_schedule_climbs_equal_stairs():
    got = [gamma_at("step", s, 9, 0.0, 3.0, stairs=4) for s in range(9)]
    assert got == pytest.approx([0, 0, 1, 1, 2, 2, 3, 3, 3])
    assert gamma_at("linear", 0, 1, 1.0, 2.0) == 1.0  # a one-step run starts at gamma_start


def test_weightings_are_pluggable():
    register_weighting("test-hard-only", lambda p, gamma: (p < 0.5).float())
    try:
        q, c = unit(4, 8, 13), unit(4, 8, 14)
        out = chunked_infonce(
            q,
            c,
            torch.arange(4),
            temperature=1.0,
            chunk_size=4,
            weighting=WEIGHTINGS["test-hard-only"],
        )
        assert set(out.weights.tolist()) <= {0.0, 1.0}
    finally:
        del WEIGHTINGS["test-hard-only"]
