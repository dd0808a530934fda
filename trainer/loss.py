"""Chunked, weighted InfoNCE with its gradients written out, so memory stays at chunk x columns.

For query i with positive column p and allowed columns j (unmasked):

    l_i = logsumexp_j(s_ij / tau) - s_ip / tau,    s_ij = <q_i, c_j>

and its gradient is dl_i/ds_ij = (P_ij - [j = p]) / tau, with P the softmax over allowed
columns. Computing that in closed form per chunk of queries takes three matrix products per
chunk and one reused (chunk x columns) buffer; autograd would keep several such buffers alive.
All inputs are treated as constants (embeddings from the gradient cache's first pass); the
returned gradients are what the second pass back-propagates into the model.

With a teacher (distill_loss.py), each chunk also reads the logits z_ik = s_{i c_ik} / tau of
query i's own slots (its positive and hard negatives) from the same buffer, before any mask:
the distillation term covers every slot the teacher scored, including those InfoNCE masks as
duplicates or false negatives. Its sums and gradients are returned apart from InfoNCE's, since
the two are normalized differently (by the weight sum, by the number of distilled queries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .distill_loss import TeacherScores, distill_kl
from .progressive import Weighting


@dataclass
class DistillSums:
    """The distillation term over the given queries; the caller normalizes by the global
    number of distilled queries."""

    kl: torch.Tensor  # sum_i KL_i
    count: torch.Tensor  # queries distilled (with at least two scored slots)
    grad_queries: torch.Tensor  # (n, d) d(kl)/d(queries)
    grad_candidates: torch.Tensor  # (m, d) d(kl)/d(candidates)


@dataclass
class LossOutput:
    """Sums over the given queries; the caller normalizes by the global weight sum."""

    weighted_loss: torch.Tensor  # sum_i w_i * l_i (raw weights)
    weights: torch.Tensor  # (n,) raw weights w_i
    p_positive: torch.Tensor  # (n,) softmax probability of the positive, as the weighting saw it
    grad_queries: torch.Tensor  # (n, d) d(weighted_loss)/d(queries)
    grad_candidates: torch.Tensor  # (m, d) d(weighted_loss)/d(candidates)
    positive_rank: torch.Tensor  # (n,) 1 + number of allowed columns scoring above the positive
    masked: torch.Tensor  # number of (query, column) pairs masked besides the positives
    distill: DistillSums | None = None  # with a teacher


@torch.no_grad()
def chunked_infonce(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    positive: torch.Tensor,
    *,
    temperature: float,
    chunk_size: int,
    masked_queries: torch.Tensor | None = None,
    masked_columns: torch.Tensor | None = None,
    false_negative_margin: float | None = None,
    guide: tuple[torch.Tensor, torch.Tensor] | None = None,
    weighting: Weighting | None = None,
    gamma: float = 0.0,
    teacher: TeacherScores | None = None,
) -> LossOutput:
    """InfoNCE of ``queries`` (n, d) against all ``candidates`` (m, d), in chunks of queries.

    ``positive[i]`` is the column of query i's positive. ``(masked_queries, masked_columns)``
    pairs are left out of the softmax. With ``false_negative_margin``, any column scoring above
    score(positive) - margin is left out too, scored by the (query, candidate) embeddings of
    ``guide`` when given, else by these embeddings. ``weighting(p_positive, gamma)`` gives the
    raw per-query weights (all 1 when None). ``teacher`` (its columns and scores, one row per
    query) adds the distillation sums.
    """
    n = queries.shape[0]
    device = queries.device
    grad_queries = torch.empty_like(queries)
    grad_candidates = torch.zeros_like(candidates)
    weights = torch.empty(n, device=device)
    p_positive = torch.empty(n, device=device)
    ranks = torch.empty(n, dtype=torch.long, device=device)
    losses = torch.empty(n, device=device)
    masked = torch.zeros((), dtype=torch.long, device=device)
    inverse_tau = 1.0 / temperature
    distill = None
    if teacher is not None:
        distill = DistillSums(
            kl=torch.zeros((), device=device),
            count=torch.zeros((), dtype=torch.long, device=device),
            grad_queries=torch.empty_like(queries),
            grad_candidates=torch.zeros_like(candidates),
        )
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        q = queries[start:end]
        rows = torch.arange(end - start, device=device)
        pos = positive[start:end]
        logits = q @ candidates.T  # the one (chunk, m) buffer, reused in place below
        if teacher is not None and distill is not None:
            _distill_chunk(logits, q, candidates, teacher, start, end, inverse_tau, distill)
        mask = _mask(
            logits,
            rows,
            pos,
            start,
            end,
            masked_queries,
            masked_columns,
            false_negative_margin,
            guide,
        )
        logits.mul_(inverse_tau)
        if mask is not None:
            masked += mask.sum()
            logits.masked_fill_(mask, float("-inf"))
            del mask
        positive_logit = logits[rows, pos]
        ranks[start:end] = (logits > positive_logit[:, None]).sum(dim=1) + 1
        # Softmax in place (logsumexp would allocate more chunk x m temporaries).
        row_max = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(row_max).exp_()
        total = probs.sum(dim=1, keepdim=True)
        probs.div_(total)
        losses[start:end] = (total.log_() + row_max).squeeze(1) - positive_logit
        p_positive[start:end] = probs[rows, pos]
        w = (
            torch.ones(end - start, device=device)
            if weighting is None
            else weighting(p_positive[start:end], gamma)
        )
        weights[start:end] = w
        probs[rows, pos] -= 1
        grad_logits = probs.mul_((w * inverse_tau)[:, None])
        grad_queries[start:end] = grad_logits @ candidates
        grad_candidates.addmm_(grad_logits.T, q)
    return LossOutput(
        weighted_loss=(weights * losses).sum(),
        weights=weights,
        p_positive=p_positive,
        grad_queries=grad_queries,
        grad_candidates=grad_candidates,
        positive_rank=ranks,
        masked=masked,
        distill=distill,
    )


def _distill_chunk(
    scores: torch.Tensor,
    q: torch.Tensor,
    candidates: torch.Tensor,
    teacher: TeacherScores,
    start: int,
    end: int,
    inverse_tau: float,
    out: DistillSums,
) -> None:
    """Add queries start..end's distillation term, from their unmasked (chunk, m) ``scores``.

    By the chain rule through z_ik = <q_i, c_{c_ik}> / tau, with g_ik = dKL_i/dz_ik / tau:
    dKL/dq_i = sum_k g_ik c_{c_ik}, and dKL/dc_j sums g_ik q_i over the slots in column j.
    """
    columns = teacher.columns[start:end]
    term = distill_kl(
        scores.gather(1, columns) * inverse_tau, teacher.scores[start:end], teacher.temperature
    )
    out.kl += term.kl.sum()
    out.count += term.distilled.sum()
    g = term.grad.mul_(inverse_tau)  # (chunk, K)
    out.grad_queries[start:end] = torch.einsum("ik,ikd->id", g, candidates[columns])
    out.grad_candidates.index_add_(
        0, columns.flatten(), (g[:, :, None] * q[:, None, :]).flatten(0, 1)
    )


def _mask(
    scores: torch.Tensor,
    rows: torch.Tensor,
    pos: torch.Tensor,
    start: int,
    end: int,
    masked_queries: torch.Tensor | None,
    masked_columns: torch.Tensor | None,
    margin: float | None,
    guide: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor | None:
    """The (chunk, m) mask of columns left out for queries start..end, or None for none."""
    mask = None
    if margin is not None:
        reference = scores if guide is None else guide[0][start:end] @ guide[1].T
        mask = reference > (reference[rows, pos] - margin)[:, None]
    if masked_queries is not None and masked_columns is not None and len(masked_queries):
        inside = (masked_queries >= start) & (masked_queries < end)
        if inside.any():
            if mask is None:
                mask = torch.zeros_like(scores, dtype=torch.bool)
            mask[masked_queries[inside] - start, masked_columns[inside]] = True
    if mask is not None:
        mask[rows, pos] = False
    return mask
