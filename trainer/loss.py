"""Chunked, weighted InfoNCE with its gradients written out, so memory stays at chunk x columns.

For query i with positive column p and allowed columns j (unmasked):

    l_i = logsumexp_j(s_ij / tau) - s_ip / tau,    s_ij = <q_i, c_j>

and its gradient is dl_i/ds_ij = (P_ij - [j = p]) / tau, with P the softmax over allowed
columns. Computing that in closed form per chunk of queries takes three matrix products per
chunk and one reused (chunk x columns) buffer; autograd would keep several such buffers alive.
All inputs are treated as constants (embeddings from the gradient cache's first pass); the
returned gradients are what the second pass back-propagates into the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .progressive import Weighting


@dataclass
class LossOutput:
    """Sums over the given queries; the caller normalizes by the global weight sum."""

    weighted_loss: torch.Tensor  # sum_i w_i * l_i (raw weights)
    weights: torch.Tensor  # (n,) raw weights w_i
    grad_queries: torch.Tensor  # (n, d) d(weighted_loss)/d(queries)
    grad_candidates: torch.Tensor  # (m, d) d(weighted_loss)/d(candidates)
    positive_rank: torch.Tensor  # (n,) 1 + number of allowed columns scoring above the positive
    masked: torch.Tensor  # number of (query, column) pairs masked besides the positives


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
) -> LossOutput:
    """InfoNCE of ``queries`` (n, d) against all ``candidates`` (m, d), in chunks of queries.

    ``positive[i]`` is the column of query i's positive. ``(masked_queries, masked_columns)``
    pairs are left out of the softmax. With ``false_negative_margin``, any column scoring above
    score(positive) - margin is left out too, scored by the (query, candidate) embeddings of
    ``guide`` when given, else by these embeddings. ``weighting(p_positive, gamma)`` gives the
    raw per-query weights (all 1 when None).
    """
    n = queries.shape[0]
    device = queries.device
    grad_queries = torch.empty_like(queries)
    grad_candidates = torch.zeros_like(candidates)
    weights = torch.empty(n, device=device)
    ranks = torch.empty(n, dtype=torch.long, device=device)
    losses = torch.empty(n, device=device)
    masked = torch.zeros((), dtype=torch.long, device=device)
    inverse_tau = 1.0 / temperature
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        q = queries[start:end]
        rows = torch.arange(end - start, device=device)
        pos = positive[start:end]
        logits = q @ candidates.T  # the one (chunk, m) buffer, reused in place below
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
        w = (
            torch.ones(end - start, device=device)
            if weighting is None
            else weighting(probs[rows, pos], gamma)
        )
        weights[start:end] = w
        probs[rows, pos] -= 1
        grad_logits = probs.mul_((w * inverse_tau)[:, None])
        grad_queries[start:end] = grad_logits @ candidates
        grad_candidates.addmm_(grad_logits.T, q)
    return LossOutput(
        weighted_loss=(weights * losses).sum(),
        weights=weights,
        grad_queries=grad_queries,
        grad_candidates=grad_candidates,
        positive_rank=ranks,
        masked=masked,
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
