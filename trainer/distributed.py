"""Cross-process embedding exchange: a differentiable all-gather, written as forward + adjoint.

Each process embeds its share of the global batch's distinct texts. ``gather_rows`` assembles
all of them on every process (forward), so each process scores its own queries against every
candidate of the global batch. The gradient cache needs the adjoint explicitly: the gradient
of the global loss with respect to a process's own embeddings is the sum, over processes, of
the gradients each computed for those rows. ``reduce_rows`` does that (an all-reduce, then
the process's own rows). Gradients thus reach the process that embedded the text, and no
process holds another's activations.

Without an initialized process group both are local no-ops, so the same code runs anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(local: torch.Tensor, owners: Sequence[np.ndarray], total: int) -> torch.Tensor:
    """Rows (total, d) in global order, where process r computed rows ``owners[r]`` and this
    process passes its own as ``local`` (len(owners[rank]), d)."""
    out = local.new_empty((total, local.shape[1]))
    rank, world = rank_and_world()
    if world == 1:
        out[torch.as_tensor(owners[0], device=local.device)] = local
        return out
    width = max(len(rows) for rows in owners)
    padded = local.new_zeros((width, local.shape[1]))
    padded[: len(local)] = local
    received = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(received, padded.contiguous())
    for rows, block in zip(owners, received, strict=True):
        out[torch.as_tensor(rows, device=local.device)] = block[: len(rows)]
    return out


def reduce_rows(grad: torch.Tensor, own: np.ndarray) -> torch.Tensor:
    """The adjoint of gather_rows: sum each process's (total, d) gradient, keep ``own`` rows."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(grad)
    return grad[torch.as_tensor(own, device=grad.device)]


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over processes (a copy; the input is left as it was)."""
    values = values.clone()
    if rank_and_world()[1] > 1:
        dist.all_reduce(values)
    return values


def all_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over processes."""
    values = values.clone()
    if rank_and_world()[1] > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values
