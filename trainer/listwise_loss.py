"""Listwise softmax cross-entropy for rerankers, as FlagEmbedding's reranker fine-tuning uses.

Each query comes as a group of G candidates scored by the cross-encoder, the positive in
column 0 and G - 1 negatives after it: logits ``s_0 .. s_{G-1}``. The loss of the group is the
cross-entropy of the softmax over the group against the positive,

    l = -log softmax(s)_0 = logsumexp_j(s_j) - s_0,

and its gradient is ``dl/ds_j = p_j - [j = 0]`` with ``p = softmax(s)``: the positive is pushed
up by ``1 - p_0`` and each negative down by its probability, so the hardest negatives (those
scoring near or above the positive) get most of the push and easy ones almost none. Only
differences within a group are trained (adding a constant to every logit changes nothing),
so the scores rank a query's candidates but have no calibrated absolute level. The loss is
0 only in the limit of the positive beating every negative by an infinite margin; with G
candidates and uniform scores it is log G (2.08 for G = 8), the value a fresh head starts
near.
"""

from __future__ import annotations

import torch


def listwise_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per-group loss ``logsumexp(s) - s_0`` of (groups, G) logits with positives in column 0."""
    return torch.logsumexp(logits, dim=1) - logits[:, 0]
