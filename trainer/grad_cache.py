"""Gradient cache: embed a huge batch in mini-batches with the memory of one mini-batch.

Pass 1 embeds every mini-batch without a graph, recording the RNG state before each, so that
dropout can be replayed. The loss then gives the gradient of every embedding. Pass 2
re-embeds each mini-batch with a graph under its recorded RNG state and back-propagates the
cached gradient through it, accumulating parameter gradients.

Two savings over the textbook version: the caller sorts texts by length before cutting
mini-batches, so little padding is computed; and the last mini-batch of pass 1 (the longest,
as the caller orders them) keeps its graph, so it is never embedded twice: with k
mini-batches a step runs 2k - 1 forwards, not 2k. Its activations are alive during the loss,
no more than pass 2 holds anyway.
Under DDP every forward whose backward is not the step's last runs inside ``no_sync``: the
gradient all-reduce happens once, in the last mini-batch's backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

Embed = Callable[[int], torch.Tensor]  # mini-batch number -> (size, dim) embeddings
NoSync = Callable[[], AbstractContextManager]


class RngState:
    """The CPU (and, on CUDA, the device's) RNG state at creation, replayable later."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.device is not None else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block with this state; the RNG outside the block is left as it was."""
        devices = [self.device] if self.device is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.device is not None and self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


@dataclass
class FirstPass:
    """Pass 1's output: detached embeddings of all mini-batches, in order."""

    embeddings: torch.Tensor
    sizes: list[int]
    states: list[RngState]  # one per mini-batch but the last
    last: torch.Tensor | None  # the last mini-batch's embeddings, still on their graph


def first_pass(
    embed: Embed, count: int, device: torch.device, no_sync: NoSync = nullcontext
) -> FirstPass:
    """Embed mini-batches 0..count-1; only the last keeps its graph."""
    if count < 1:
        raise ValueError("the gradient cache needs at least one mini-batch")
    outputs, states = [], []
    for number in range(count - 1):
        states.append(RngState(device))
        with torch.no_grad():
            outputs.append(embed(number))
    # With one mini-batch its backward is the step's last, so it must synchronize.
    with no_sync() if count > 1 else nullcontext():
        last = embed(count - 1)
    outputs.append(last.detach())
    return FirstPass(
        embeddings=torch.cat(outputs), sizes=[len(o) for o in outputs], states=states, last=last
    )


def second_pass(
    embed: Embed,
    cached: FirstPass,
    gradients: torch.Tensor,
    *,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: NoSync = nullcontext,
) -> None:
    """Back-propagate ``gradients`` (same shape as ``cached.embeddings``) into the model."""
    if cached.last is None:
        raise RuntimeError("second_pass already ran for this first pass")
    parts = gradients.split(cached.sizes)
    count = len(parts)
    # The kept graph goes first: its activations are freed before any re-embedding.
    backward(_surrogate(cached.last, parts[-1]))
    cached.last = None
    for number in range(count - 1):
        is_final = number == count - 2
        with nullcontext() if is_final else no_sync(), cached.states[number].replay():
            backward(_surrogate(embed(number), parts[number]))


def _surrogate(embeddings: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient with respect to ``embeddings`` is ``gradient``."""
    return (embeddings.float() * gradient.to(embeddings.device, torch.float32)).sum()
