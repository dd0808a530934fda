"""Distillation from a teacher's scores: KL(teacher || student) over each query's own candidates.

A training line may carry a teacher's raw scores (``pos_scores``, ``neg_scores``: typically a
cross-encoder reranker's logits) for its texts. Query i is trained on K slots, its positive
and its hard negatives, and slot k lies in the candidate column ``c_ik`` of the batch. The
teacher's distribution over the slots is

    t_ik = softmax_k(r_ik / T),        r_ik = the teacher's score of slot k, T = its temperature,

and the student's is the softmax of the same logits InfoNCE uses, restricted to those slots,

    q_ik = softmax_k(z_ik),            z_ik = <q_i, c_{c_ik}> / tau   (tau: ``temperature``).

The term of query i is

    KL_i = sum_k t_ik (log t_ik - log q_ik),   with gradient   dKL_i/dz_ik = q_ik - t_ik,

so each slot's logit moves towards the teacher's share: a negative the teacher scores high (a
likely false negative) is pushed down only as far as the teacher says, unlike in InfoNCE.
Slots without a teacher score (NaN: a negative filled in from another line's positive) leave
both softmaxes; a query with fewer than two scored slots has nothing to match and is not
distilled (KL_i = 0, gradient 0). T only shapes the teacher's distribution: T > 1 flattens
it, T < 1 sharpens it towards its top slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TeacherScores:
    """The teacher's side of the distillation term, for a set of queries."""

    columns: torch.Tensor  # (n, K) candidate column of each slot: the positive, then negatives
    scores: torch.Tensor  # (n, K) the teacher's raw score of each slot, NaN where it has none
    temperature: float  # T: the teacher's scores are divided by it before their softmax


@dataclass
class Distillation:
    """KL_i and its gradient for each query of a (n, K) block of slots."""

    kl: torch.Tensor  # (n,) KL_i; 0 for queries not distilled
    grad: torch.Tensor  # (n, K) dKL_i/dz_ik = q_ik - t_ik; 0 on unscored slots
    distilled: torch.Tensor  # (n,) bool: the query has at least two scored slots


def distill_kl(
    student_logits: torch.Tensor, teacher_scores: torch.Tensor, teacher_temperature: float
) -> Distillation:
    """KL(teacher || student) per query of (n, K) student logits z and teacher scores r.

    ``kl`` is differentiable in ``student_logits``; ``grad`` is its gradient in closed form,
    computed without a graph (what the chunked loss back-propagates).
    """
    scored = torch.isfinite(teacher_scores)
    distilled = scored.sum(dim=1) >= 2
    kept = scored & distilled[:, None]
    # Unkept slots leave both softmaxes (-inf); a row with none kept gets zeros instead, so
    # that its softmax stays finite; its t is then zeroed, which zeroes its KL and gradient.
    idle = ~distilled[:, None]
    teacher = (teacher_scores / teacher_temperature).masked_fill(~kept, float("-inf"))
    student = student_logits.masked_fill(~kept, float("-inf"))
    log_t = teacher.masked_fill(idle, 0.0).log_softmax(dim=1)
    log_q = student.masked_fill(idle, 0.0).log_softmax(dim=1)
    t = log_t.exp().masked_fill(~kept, 0.0)
    # xlogy(0, 0) = 0 and the masked log q: no 0 * -inf on the slots outside the softmax.
    kl = (torch.xlogy(t, t) - t * log_q.masked_fill(~kept, 0.0)).sum(dim=1)
    grad = (log_q.detach().exp() - t).masked_fill(~kept, 0.0)
    return Distillation(kl=kl, grad=grad, distilled=distilled)
