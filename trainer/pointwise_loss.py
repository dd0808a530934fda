"""Pointwise binary cross-entropy for rerankers: each (query, passage) pair on its own.

Each query comes as a group of G candidates scored by the cross-encoder, the positive in
column 0 (label ``y_0 = 1``) and G - 1 negatives after it (``y_j = 0``). Every pair is a
binary classification of its logit ``s_j`` through the sigmoid ``sigma``, and the group's
loss is the mean over its pairs,

    l = (1 / G) * sum_j [ -y_j log sigma(s_j) - (1 - y_j) log(1 - sigma(s_j)) ]
      = (1 / G) * sum_j [ softplus(s_j) - y_j s_j ],

with gradient ``dl/ds_j = (sigma(s_j) - y_j) / G``. Unlike the listwise loss, each logit is
pushed towards an absolute target (positives to +inf, negatives to -inf) whatever the rest of
the group scores, so ``sigmoid(score)`` estimates the probability of relevance and a fixed
threshold means the same for every query; the price is that easy negatives keep contributing
gradient and one positive faces G - 1 negatives, so the model is biased towards "irrelevant"
(the mean of the labels is 1/G). sentence-transformers' ``BinaryCrossEntropyLoss`` trains a
CrossEncoder this way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pointwise_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per-group mean binary cross-entropy of (groups, G) logits with positives in column 0."""
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=1)
