"""Distillation from teacher scores: the KL term, its closed-form gradient, and the chunked loss."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_utils import reference_distill

from peg_rag.trainer.distill_loss import TeacherScores, distill_kl
from peg_rag.trainer.loss import chunked_infonce

NAN = math.nan


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=-1)


def test_kl_matches_hand_computation():
    student = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, math.log(3), NAN], [2.0, NAN, NAN], [1.0, 1.0, 1.0]])
    got = distill_kl(student, teacher, teacher_temperature=2.0)
    # Row 0: slot 2 has no teacher score and leaves both softmaxes. Teacher at T = 2:
    # softmax([0, ln 3] / 2) = [1, sqrt 3] / (1 + sqrt 3); student: softmax([1, 0]).
    t = [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]
    q = [math.e / (math.e + 1), 1 / (math.e + 1)]
    kl = sum(ti * math.log(ti / qi) for ti, qi in zip(t, q, strict=True))
    assert float(got.kl[0]) == pytest.approx(kl, rel=1e-6)
    assert got.grad[0].tolist() == pytest.approx([q[0] - t[0], q[1] - t[1], 0.0], abs=1e-6)
    # Row 1: one scored slot is no distribution to match: not distilled, no gradient.
    # Row 2: identical uniform distributions: distilled, with KL 0.
    assert got.distilled.tolist() == [True, False, True]
    assert got.kl[1:].tolist() == pytest.approx([0.0, 0.0], abs=1e-7)
    assert torch.count_nonzero(got.grad[1]) == 0
    # The teacher temperature matters: at T = 1 the same scores give another KL.
    assert float(distill_kl(student, teacher, 1.0).kl[0]) != pytest.approx(kl, rel=1e-3)


def test_closed_form_gradient_equals_autograd():
    generator = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(6, 5, generator=generator)).requires_grad_()
    teacher = 2 * torch.randn(6, 5, generator=generator)
    teacher[1, 3:] = NAN  # a filled-in negative or two
    teacher[2] = NAN  # a line without scores
    teacher[4, 1:] = NAN  # only the positive scored: not distilled
    got = distill_kl(student, teacher, teacher_temperature=0.7)
    got.kl.sum().backward()
    assert got.distilled.tolist() == [True, True, False, True, False, True]
    assert torch.isfinite(got.kl).all() and (got.kl >= 0).all()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert torch.allclose(got.grad, student.grad, atol=1e-6)
    assert got.grad[1, 3:].abs().sum() == 0 and got.grad[2].abs().sum() == 0


def slots() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """7 queries against 19 candidates; each query's slots: its positive and two negatives."""
    q, c = unit(7, 16, 0), unit(19, 16, 1)
    positive = torch.tensor([0, 3, 5, 5, 9, 18, 2])
    columns = torch.stack([positive, (positive + 4) % 19, (positive + 11) % 19], dim=1)
    generator = torch.Generator().manual_seed(2)
    scores = 3 * torch.randn(7, 3, generator=generator)
    scores[2] = NAN  # a line without teacher scores
    scores[5, 2] = NAN  # a filled-in negative
    return q, c, positive, columns, scores


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_distillation_equals_autograd_and_ignores_infonce_masks(chunk):
    q, c, positive, columns, scores = slots()
    # InfoNCE masks query 0's first negative slot; the teacher still scores it.
    masked = {"masked_queries": torch.tensor([0]), "masked_columns": columns[0, 1:2]}
    teacher = TeacherScores(columns, scores, temperature=2.0)
    out = chunked_infonce(
        q, c, positive, temperature=0.05, chunk_size=chunk, teacher=teacher, **masked
    )
    qr, cr = q.clone().requires_grad_(), c.clone().requires_grad_()
    kl, count = reference_distill(qr, cr, columns, scores, 0.05, 2.0)
    kl.backward()
    assert out.distill is not None
    assert int(out.distill.count) == count == 6
    assert torch.allclose(out.distill.kl, kl, rtol=1e-5)
    assert torch.allclose(out.distill.grad_queries, qr.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(out.distill.grad_candidates, cr.grad, rtol=1e-4, atol=1e-5)
    # The InfoNCE part is the same with or without a teacher.
    plain = chunked_infonce(q, c, positive, temperature=0.05, chunk_size=chunk, **masked)
    assert plain.distill is None
    assert torch.equal(plain.weighted_loss, out.weighted_loss)
    assert torch.equal(plain.grad_candidates, out.grad_candidates)


def test_queries_without_teacher_scores_add_nothing():
    q, c, positive, columns, scores = slots()
    scores[4] = NAN
    options = {"temperature": 0.05, "chunk_size": 2}
    out = chunked_infonce(
        q, c, positive, teacher=TeacherScores(columns, scores, 1.0), **options
    ).distill
    keep = torch.isfinite(scores).any(dim=1)
    alone = chunked_infonce(
        q[keep],
        c,
        positive[keep],
        teacher=TeacherScores(columns[keep], scores[keep], 1.0),
        **options,
    ).distill
    assert out is not None and alone is not None
    assert int(out.count) == int(alone.count) == 5
    assert torch.allclose(out.kl, alone.kl, rtol=1e-6)
    assert torch.allclose(out.grad_candidates, alone.grad_candidates, rtol=1e-5, atol=1e-7)
    assert torch.allclose(out.grad_queries[keep], alone.grad_queries, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(out.grad_queries[~keep]) == 0
    # No query with scores: nothing at all.
    none = chunked_infonce(
        q, c, positive, teacher=TeacherScores(columns, torch.full((7, 3), NAN), 1.0), **options
    ).distill
    assert none is not None
    assert int(none.count) == 0 and float(none.kl) == 0.0
    assert torch.count_nonzero(none.grad_queries) == torch.count_nonzero(none.grad_candidates) == 0
