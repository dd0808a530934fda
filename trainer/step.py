"""One contrastive training step: gradient cache + gather across processes + chunked loss.

It leaves the parameter gradients of the global-batch loss in the model (averaged by DDP over
processes, hence the world-size factor), ready for clipping and the optimizer step:

    loss = sum_i w_i * l_i / sum_i w_i  +  lambda * sum_{i in D} KL_i / |D|
                                        +  mu * sum_t ||e_t - b_t||^2 / M

over all N queries of the global batch: InfoNCE with weights normalized to mean 1 (plain mean
when all w_i = 1), plus, with ``distill_weight`` lambda > 0, the mean distillation term
(distill_loss.py) over the set D of queries whose lines carry teacher scores. The progressive
weights apply to InfoNCE only; every distilled query counts the same in the second term.

With ``anchor_weight`` mu > 0, the third term (embedding distillation from the frozen
starting model, against forgetting) pulls each of the batch's M distinct texts' embedding
e_t towards the starting model's b_t of the same text; its gradient 2 mu (e_t - b_t) / M
joins the cached gradients, so it costs one extra forward pass per text and no graph.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from peg_rag.core.encoder import PEGEncoder

from .collate import StepInputs
from .distill_loss import TeacherScores
from .distributed import all_max, all_sum, gather_rows, rank_and_world, reduce_rows
from .grad_cache import first_pass, second_pass
from .loss import chunked_infonce
from .progressive import Weighting


@dataclass
class StepLog:
    """What a training step reports to the loop, which adds lr, grad norm and throughput."""

    values: dict[str, float]  # logged as train/<name>; "loss" and "positive_rank" always
    texts: int  # texts (for a reranker: pairs) in the global batch, for texts per second


class Step(Protocol):
    """One optimizer step's worth of gradients: the loop in train.py calls it with the
    prepared batch and the step number, then clips, steps the optimizer and logs."""

    def __call__(self, inputs: Any, step: int) -> StepLog: ...


@dataclass
class StepStats:
    loss: float  # the whole objective: InfoNCE + distill_weight * distill_kl
    weight_mean: float  # mean raw weight (before normalizing to mean 1)
    weight_min: float  # normalized
    weight_max: float  # normalized
    positive_rank: float  # mean rank of the positive among allowed candidates (1 = top)
    accuracy: float  # fraction of queries whose positive ranks first
    masked: int  # (query, candidate) pairs masked as duplicates or false negatives
    texts: int  # texts in the global batch before de-duplication
    distinct: int  # texts actually embedded
    distill_kl: float = 0.0  # mean KL(teacher || student) over the distilled queries
    distilled: float = 0.0  # fraction of the queries distilled
    anchor_distance: float = 0.0  # mean ||e_t - b_t||^2 over the distinct texts
    # (N, 2) raw weight and p_positive of every query of the global batch, in batch order;
    # only when the step was built with ``gather_queries``.
    query_values: torch.Tensor | None = None


def mini_batches(rows: np.ndarray, size: int) -> list[np.ndarray]:
    """Consecutive groups of ``size`` rows, cut from the end so that the last one, which the
    gradient cache embeds only once, is full (any short group comes first)."""
    return [rows[max(end - size, 0) : end] for end in range(len(rows), 0, -size)][::-1]


class ContrastiveStep:
    """Computes the gradients of one global batch into ``encoder.model``."""

    def __init__(
        self,
        encoder: PEGEncoder,
        *,
        mini_batch_size: int,
        temperature: float,
        chunk_size: int,
        false_negative_margin: float | None = None,
        guide: PEGEncoder | None = None,
        weighting: Weighting | None = None,
        distill_weight: float = 0.0,
        teacher_temperature: float = 1.0,
        anchor: PEGEncoder | None = None,
        anchor_weight: float = 0.0,
        gather_queries: bool = False,
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
        no_sync: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self.encoder = encoder
        self.mini_batch_size = mini_batch_size
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.false_negative_margin = false_negative_margin
        self.guide = guide
        self.weighting = weighting
        self.distill_weight = distill_weight
        self.teacher_temperature = teacher_temperature
        self.anchor = anchor
        self.anchor_weight = anchor_weight
        self.gather_queries = gather_queries
        self.backward = backward
        self.no_sync = no_sync

    def __call__(self, inputs: StepInputs, gamma: float = 0.0) -> StepStats:
        rank, world = rank_and_world()
        total = len(inputs.query_rows)
        if total % world:
            raise ValueError(f"batch_size={total} must be divisible by the {world} processes")
        owners = [inputs.owned(r, world) for r in range(world)]
        own = owners[rank]
        batches = mini_batches(own, self.mini_batch_size)
        encoder = self.encoder
        device = encoder.device

        def embed(number: int) -> torch.Tensor:
            return encoder.embed(encoder.collate([inputs.ids[i] for i in batches[number]]))

        cached = first_pass(embed, len(batches), device, self.no_sync)
        embeddings = gather_rows(cached.embeddings, owners, len(inputs.ids))

        # This process's queries are a contiguous slice of the global batch.
        per = total // world
        low, high = rank * per, (rank + 1) * per
        query_rows = inputs.query_rows[low:high].to(device)
        column_rows = inputs.column_rows.to(device)
        inside = (inputs.masked_queries >= low) & (inputs.masked_queries < high)
        guide = None
        if self.guide is not None:
            assert inputs.guide_ids is not None
            guided = self._frozen_embed(self.guide, inputs.guide_ids, own)
            guided = gather_rows(guided, owners, len(inputs.ids))
            guide = (guided[query_rows], guided[column_rows])
        teacher = None
        if (
            self.distill_weight > 0
            and inputs.teacher_columns is not None
            and inputs.teacher_scores is not None
        ):
            teacher = TeacherScores(
                inputs.teacher_columns[low:high].to(device),
                inputs.teacher_scores[low:high].to(device),
                self.teacher_temperature,
            )
        out = chunked_infonce(
            embeddings[query_rows],
            embeddings[column_rows],
            inputs.positive_columns[low:high].to(device),
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            masked_queries=(inputs.masked_queries[inside] - low).to(device),
            masked_columns=inputs.masked_columns[inside].to(device),
            false_negative_margin=self.false_negative_margin,
            guide=guide,
            weighting=self.weighting,
            gamma=gamma,
            teacher=teacher,
        )
        nothing = torch.zeros((), device=device)
        loss_sum, weight_sum, rank_sum, top1, masked, kl_sum, distilled = all_sum(
            torch.stack(
                [
                    out.weighted_loss,
                    out.weights.sum(),
                    out.positive_rank.sum().float(),
                    (out.positive_rank == 1).sum().float(),
                    out.masked.float(),
                    nothing if out.distill is None else out.distill.kl,
                    nothing if out.distill is None else out.distill.count.float(),
                ]
            )
        ).tolist()
        weight_sum = max(weight_sum, 1e-12)  # every positive certain: nothing left to learn
        weight_max, negative_min = all_max(
            torch.stack([out.weights.max(), -out.weights.min()])
        ).tolist()

        # d(loss)/d(embeddings): InfoNCE divides by the global weight sum, the distillation
        # term by the global number of distilled queries, and DDP divides the summed parameter
        # gradients by the world size, which the factor `world` undoes.
        grad = torch.zeros_like(embeddings)
        grad.index_add_(0, query_rows, out.grad_queries, alpha=1 / weight_sum)
        grad.index_add_(0, column_rows, out.grad_candidates, alpha=1 / weight_sum)
        distill_kl = kl_sum / distilled if distilled else 0.0
        if out.distill is not None and distilled:
            scale = self.distill_weight / distilled
            grad.index_add_(0, query_rows, out.distill.grad_queries, alpha=scale)
            grad.index_add_(0, column_rows, out.distill.grad_candidates, alpha=scale)
        own_grad = reduce_rows(grad, own).mul_(world)
        anchor_distance = 0.0
        if self.anchor is not None and self.anchor_weight > 0:
            # cached.embeddings are this process's rows, in the order of ``own``.
            drift = cached.embeddings.detach() - self._frozen_embed(self.anchor, inputs.ids, own)
            distinct = len(inputs.ids)
            anchor_distance = all_sum(drift.square().sum()).item() / distinct
            own_grad.add_(drift, alpha=2 * self.anchor_weight * world / distinct)
        second_pass(embed, cached, own_grad, backward=self.backward, no_sync=self.no_sync)

        query_values = None
        if self.gather_queries:
            slices = [np.arange(r * per, (r + 1) * per) for r in range(world)]
            local = torch.stack([out.weights, out.p_positive], dim=1)
            query_values = gather_rows(local, slices, total).cpu()
        normalize = total / weight_sum
        return StepStats(
            loss=loss_sum / weight_sum
            + self.distill_weight * distill_kl
            + self.anchor_weight * anchor_distance,
            weight_mean=weight_sum / total,
            weight_min=-negative_min * normalize,
            weight_max=weight_max * normalize,
            positive_rank=rank_sum / total,
            accuracy=top1 / total,
            masked=int(masked),
            texts=inputs.n_texts,
            distinct=len(inputs.ids),
            distill_kl=distill_kl,
            distilled=distilled / total,
            anchor_distance=anchor_distance,
            query_values=query_values,
        )

    @torch.no_grad()
    def _frozen_embed(
        self, frozen: PEGEncoder, ids: list[list[int]], own: np.ndarray
    ) -> torch.Tensor:
        """A frozen encoder's embeddings of this process's rows (``ids`` in its tokens)."""
        parts = [
            frozen.embed(frozen.collate([ids[i] for i in own[s : s + self.mini_batch_size]]))
            for s in range(0, len(own), self.mini_batch_size)
        ]
        return torch.cat(parts).to(self.encoder.device)
