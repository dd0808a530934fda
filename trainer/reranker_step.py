"""One reranker training step: query groups of (query, candidate) pairs, cut into mini-batches
of groups whose gradients accumulate into the model.

A global batch holds N queries, each a group of G pairs: its positive (column 0) and G - 1
negatives. With W processes, each takes N / W consecutive groups and cuts them into
mini-batches of ``mini_batch_size`` groups (longest first, so a batch too large for memory
fails at once; similar lengths share a mini-batch, so little padding is computed). Each
mini-batch is one forward pass over its pairs, giving (groups, G) logits, the per-group loss
(``listwise_loss`` or ``pointwise_loss``), and one backward pass of

    sum over its groups of l_g  x  W / N,

so the accumulated parameter gradients are those of the mean loss over the whole batch once
DDP has averaged them over the W processes. Unlike the embedder's contrastive loss, a group's
loss depends only on its own pairs, so no gradient cache is needed: a mini-batch's graph is
freed after its backward. Under DDP every mini-batch but the last runs inside ``no_sync``, so
the gradient all-reduce happens once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from peg_rag.core.reranker import Pair, Reranker
from peg_rag.core.torch_backend import collate

from .data import Batch
from .distributed import all_sum, rank_and_world
from .listwise_loss import listwise_loss
from .pointwise_loss import pointwise_loss
from .step import StepLog

Loss = Callable[[torch.Tensor], torch.Tensor]  # (groups, G) logits -> (groups,) losses
LOSSES: dict[str, Loss] = {"listwise": listwise_loss, "pointwise": pointwise_loss}
Tokenize = Callable[[Sequence[Pair]], tuple[list[list[int]], list[list[int]] | None, int]]


@dataclass
class PairInputs:
    """A global batch of query groups, tokenized; every process holds the same one."""

    ids: list[list[int]]  # pair g * group_size + j: query g with candidate j (0: its positive)
    token_types: list[list[int]] | None  # None when the model has no token types
    groups: int
    group_size: int
    truncated: int  # pairs cut to max_length

    @property
    def n_texts(self) -> int:
        return self.groups * self.group_size


def build_pair_inputs(batch: Batch, tokenize: Tokenize) -> PairInputs:
    """Pair every query with its positive, then its negatives, and tokenize the pairs."""
    sizes = {1 + len(negatives) for negatives in batch.negatives}
    if len(sizes) != 1:
        raise ValueError(f"query groups of different sizes in one batch: {sorted(sizes)}")
    pairs = [
        (query, text)
        for query, positive, negatives in zip(
            batch.queries, batch.positives, batch.negatives, strict=True
        )
        for text in (positive, *negatives)
    ]
    ids, token_types, truncated = tokenize(pairs)
    return PairInputs(ids, token_types, len(batch.queries), sizes.pop(), truncated)


class RerankerStep:
    """Computes the gradients of one global batch of query groups into ``reranker.model``."""

    def __init__(
        self,
        reranker: Reranker,
        *,
        mini_batch_size: int,
        loss: str | Loss = "listwise",
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
        no_sync: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
        self.reranker = reranker
        self.mini_batch_size = mini_batch_size
        self.loss = LOSSES[loss] if isinstance(loss, str) else loss
        self.backward = backward
        self.no_sync = no_sync

    def mini_batches(self, inputs: PairInputs, rank: int, world: int) -> list[np.ndarray]:
        """This process's groups in mini-batches, longest pair first."""
        if inputs.groups % world:
            raise ValueError(
                f"batch_size={inputs.groups} must be divisible by the {world} processes"
            )
        per = inputs.groups // world
        size = inputs.group_size
        own = np.arange(rank * per, (rank + 1) * per)
        longest = np.array(
            [max(len(inputs.ids[g * size + j]) for j in range(size)) for g in own.tolist()]
        )
        order = own[np.argsort(-longest, kind="stable")]
        return [order[s : s + self.mini_batch_size] for s in range(0, per, self.mini_batch_size)]

    def __call__(self, inputs: PairInputs, step: int = 0) -> StepLog:
        rank, world = rank_and_world()
        batches = self.mini_batches(inputs, rank, world)
        size = inputs.group_size
        reranker = self.reranker
        device = reranker.device
        pad = reranker.tokenizer.pad_token_id
        scale = world / inputs.groups
        # Sums of: loss, positive rank, positive ranked first, positive logit, negative logits.
        totals = torch.zeros(5, device=device)  # float32: MPS has no float64
        for number, groups in enumerate(batches):
            rows = [g * size + j for g in groups.tolist() for j in range(size)]
            types = inputs.token_types
            features = collate(
                [inputs.ids[r] for r in rows],
                pad,
                device,
                None if types is None else [types[r] for r in rows],
            )
            # The step's last backward is the one where DDP all-reduces the gradients.
            with nullcontext() if number == len(batches) - 1 else self.no_sync():
                logits = reranker.logits(features).view(len(groups), size)
                losses = self.loss(logits)
                self.backward(losses.sum() * scale)
            with torch.no_grad():
                scores = logits.detach().float()
                rank_of_positive = 1 + (scores[:, 1:] > scores[:, :1]).sum(dim=1)
                totals += torch.stack(
                    [
                        losses.detach().float().sum(),
                        rank_of_positive.sum().float(),
                        (rank_of_positive == 1).sum().float(),
                        scores[:, 0].sum(),
                        scores[:, 1:].sum(),
                    ]
                )
        loss, ranks, first, positive, negative = all_sum(totals).tolist()
        n = inputs.groups
        return StepLog(
            values={
                "loss": loss / n,
                "positive_rank": ranks / n,  # among the group's G candidates, 1 = top
                "accuracy": first / n,
                "positive_logit": positive / n,
                "negative_logit": negative / (n * max(size - 1, 1)),
            },
            texts=inputs.n_texts,
        )
