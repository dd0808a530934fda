"""The gradient cache gives the gradients of the whole batch computed in one graph."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from helpers import CHINESE_TEXTS as T
from helpers import build_tiny_model
from trainer_utils import (
    assert_close_vectors,
    gradients,
    load_encoder,
    reference_distill,
    reference_loss,
)

from peg_rag.trainer import grad_cache
from peg_rag.trainer.collate import build_inputs
from peg_rag.trainer.data import Batch
from peg_rag.trainer.progressive import focal
from peg_rag.trainer.step import ContrastiveStep, mini_batches

TAU = 0.05
NAN = math.nan
# Teacher scores of (positive, negative, negative) per query: query 2's line has none, query
# 4's second negative was filled in, query 5 has only its positive scored (not distilled).
TEACHER = [
    [4.0, 1.0, -2.0],
    [2.5, 3.0, 0.5],
    [NAN, NAN, NAN],
    [1.0, -1.0, 2.0],
    [3.0, 0.0, NAN],
    [2.0, NAN, NAN],
]


def make_batch(teacher_scores: list[list[float]] | None = None) -> Batch:
    # Queries 2 and 3 share a text, and texts of various lengths make uneven padding.
    queries = [T[0], T[1] + T[2], T[3], T[3], T[5], T[6] + "？"]
    positives = [T[4], T[5] + T[6], T[7], T[0] + "。", T[1], T[2]]
    negatives = [[T[(i + 2) % 8] + "啊" * i, T[(i + 5) % 8]] for i in range(6)]
    return Batch(
        "s",
        queries,
        [None] * 6,
        positives,
        negatives,
        list(range(6)),
        teacher_scores=teacher_scores or [],
    )


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-dropout"), seed=1, dropout=0.2)


def reference_gradients(encoder, inputs, gamma, mini_batch_size=None, distill=None, anchor=None):
    """Embed with one graph (all texts at once, or the same mini-batches in the same order as
    the cache's first pass) and back-propagate the unchunked loss by autograd; ``distill`` =
    (weight, teacher temperature) adds weight x the mean KL over the distilled queries;
    ``anchor`` = (weight, frozen encoder) adds weight x the mean squared distance of each
    distinct text's embedding to the frozen encoder's."""
    encoder.model.zero_grad(set_to_none=True)
    own = inputs.owned(0, 1)
    parts = [
        encoder.embed(encoder.collate([inputs.ids[i] for i in rows]))
        for rows in mini_batches(own, mini_batch_size or len(own))
    ]
    embeddings = torch.zeros(len(inputs.ids), encoder.dim).index_put(
        (torch.as_tensor(own),), torch.cat(parts)
    )
    mask = torch.zeros(len(inputs.query_rows), len(inputs.column_rows), dtype=torch.bool)
    mask[inputs.masked_queries, inputs.masked_columns] = True
    loss, _ = reference_loss(
        embeddings[inputs.query_rows],
        embeddings[inputs.column_rows],
        inputs.positive_columns,
        TAU,
        mask,
        gamma,
        focal,
    )
    if distill is not None:
        weight, teacher_temperature = distill
        kl, count = reference_distill(
            embeddings[inputs.query_rows],
            embeddings[inputs.column_rows],
            inputs.teacher_columns,
            inputs.teacher_scores,
            TAU,
            teacher_temperature,
        )
        loss = loss + weight * kl / count
    if anchor is not None:
        weight, frozen = anchor
        with torch.no_grad():
            base = frozen.embed(frozen.collate(inputs.ids))
        loss = loss + weight * (embeddings - base).square().sum(dim=1).mean()
    loss.backward()
    return gradients(encoder.model), loss.item()


def cached_gradients(
    encoder, inputs, gamma, mini_batch_size=4, chunk_size=2, distill=(0.0, 1.0), anchor=None
):
    encoder.model.zero_grad(set_to_none=True)
    step = ContrastiveStep(
        encoder,
        mini_batch_size=mini_batch_size,
        temperature=TAU,
        chunk_size=chunk_size,
        weighting=focal,
        distill_weight=distill[0],
        teacher_temperature=distill[1],
        anchor_weight=anchor[0] if anchor else 0.0,
        anchor=anchor[1] if anchor else None,
    )
    stats = step(inputs, gamma)
    return gradients(encoder.model), stats


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_cached_gradients_equal_full_batch_gradients_without_dropout(tiny_model_dir, gamma):
    encoder = load_encoder(tiny_model_dir)
    inputs = build_inputs(make_batch(), encoder.tokenize)
    assert len(inputs.masked_queries) == 2  # the duplicate query's positives are masked
    expected, loss = reference_gradients(encoder, inputs, gamma)
    got, stats = cached_gradients(encoder, inputs, gamma)
    assert stats.loss == pytest.approx(loss, rel=1e-5)
    assert stats.texts == 24 and stats.distinct < 24
    assert expected.abs().max() > 0
    assert_close_vectors(got, expected, rtol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_cached_gradients_with_distillation_equal_full_batch_gradients(tiny_model_dir, gamma):
    encoder = load_encoder(tiny_model_dir)
    inputs = build_inputs(make_batch(TEACHER), encoder.tokenize)
    assert inputs.teacher_scores is not None
    expected, loss = reference_gradients(encoder, inputs, gamma, distill=(0.7, 2.0))
    got, stats = cached_gradients(encoder, inputs, gamma, distill=(0.7, 2.0))
    assert stats.distilled == pytest.approx(4 / 6)
    assert stats.distill_kl > 0
    assert stats.loss == pytest.approx(loss, rel=1e-5)
    assert_close_vectors(got, expected, rtol=1e-5)
    # The control: the term changes the gradients, so the comparison can fail.
    plain, _ = cached_gradients(encoder, inputs, gamma)
    assert not torch.allclose(plain, got, rtol=1e-3, atol=1e-3 * float(got.abs().max()))


def test_cached_gradients_with_the_anchor_equal_full_batch_gradients(tiny_model_dir, tmp_path):
    encoder = load_encoder(tiny_model_dir)
    # Another model as the anchor, so that the distances (and the term's gradient) are not 0.
    frozen = load_encoder(build_tiny_model(tmp_path / "anchor", seed=3))
    inputs = build_inputs(make_batch(), encoder.tokenize)
    expected, loss = reference_gradients(encoder, inputs, 1.0, anchor=(0.3, frozen))
    got, stats = cached_gradients(encoder, inputs, 1.0, anchor=(0.3, frozen))
    assert stats.anchor_distance > 0
    assert stats.loss == pytest.approx(loss, rel=1e-5)
    assert_close_vectors(got, expected, rtol=1e-5)
    plain, _ = cached_gradients(encoder, inputs, 1.0)  # the control: the term matters
    assert not torch.allclose(plain, got, rtol=1e-3, atol=1e-3 * float(got.abs().max()))
    # Anchored to itself, the model starts at distance 0 and its gradients are InfoNCE's.
    itself, stats = cached_gradients(encoder, inputs, 1.0, anchor=(0.3, encoder))
    assert stats.anchor_distance == pytest.approx(0.0, abs=1e-10)
    assert_close_vectors(itself, plain, rtol=1e-5)


@pytest.mark.parametrize("teacher_scores", [None, [[NAN] * 3] * 6], ids=["absent", "all-nan"])
def test_lines_without_teacher_scores_leave_the_step_as_without_distillation(
    tiny_model_dir, teacher_scores
):
    encoder = load_encoder(tiny_model_dir)
    inputs = build_inputs(make_batch(teacher_scores), encoder.tokenize)
    assert inputs.teacher_scores is None
    expected, plain = cached_gradients(encoder, inputs, 1.0)
    got, stats = cached_gradients(encoder, inputs, 1.0, distill=(0.7, 2.0))
    assert stats.loss == plain.loss and stats.distilled == 0 and stats.distill_kl == 0
    assert torch.equal(got, expected)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_dropout_is_replayed_exactly(dropout_model_dir, checkpointing):
    encoder = load_encoder(dropout_model_dir)
    if checkpointing:
        encoder.model.activation_checkpointing_enable({"use_reentrant": False})
    inputs = build_inputs(make_batch(), encoder.tokenize)
    torch.manual_seed(7)
    expected, _ = reference_gradients(encoder, inputs, 1.0, mini_batch_size=4)
    torch.manual_seed(7)
    got, _ = cached_gradients(encoder, inputs, 1.0, mini_batch_size=4)
    assert_close_vectors(got, expected, rtol=1e-5)


def test_without_rng_replay_dropout_gradients_differ(dropout_model_dir, monkeypatch):
    """The control for the test above: the replay is what makes them equal."""
    encoder = load_encoder(dropout_model_dir)
    inputs = build_inputs(make_batch(), encoder.tokenize)
    torch.manual_seed(7)
    expected, _ = reference_gradients(encoder, inputs, 1.0, mini_batch_size=4)

    @contextmanager
    def no_replay(self):
        yield

    monkeypatch.setattr(grad_cache.RngState, "replay", no_replay)
    torch.manual_seed(7)
    got, _ = cached_gradients(encoder, inputs, 1.0, mini_batch_size=4)
    assert not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))


def test_second_pass_keeps_the_global_rng_stream(dropout_model_dir):
    """Replays run in a forked RNG: after a step the stream is where pass 1 left it."""
    encoder = load_encoder(dropout_model_dir)
    inputs = build_inputs(make_batch(), encoder.tokenize)
    torch.manual_seed(3)
    cached_gradients(encoder, inputs, 0.0)
    after_step = torch.rand(3)
    torch.manual_seed(3)
    with torch.no_grad():  # pass 1 alone: the same forwards in the same order
        for rows in mini_batches(inputs.owned(0, 1), 4):
            encoder.embed(encoder.collate([inputs.ids[i] for i in rows]))
    assert torch.equal(torch.rand(3), after_step)


def test_autocast_bf16_gives_close_gradients(tiny_model_dir):
    """Under bf16 autocast (as accelerate wraps the forward) the step runs and its gradients
    stay close to fp32's; the loss itself is always computed in fp32."""
    encoder = load_encoder(tiny_model_dir)
    inputs = build_inputs(make_batch(), encoder.tokenize)
    expected, _ = cached_gradients(encoder, inputs, 0.0)
    forward = encoder.model.forward

    def autocast_forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    encoder.model.forward = autocast_forward
    got, stats = cached_gradients(encoder, inputs, 0.0)
    assert torch.isfinite(got).all()
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=0)
    assert cosine > 0.99


def test_one_mini_batch_is_a_plain_step(tiny_model_dir):
    """When everything fits one mini-batch there is no second forward at all."""
    encoder = load_encoder(tiny_model_dir)
    inputs = build_inputs(make_batch(), encoder.tokenize)
    calls = []
    forward = encoder.model.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    encoder.model.forward = counting
    cached_gradients(encoder, inputs, 0.0, mini_batch_size=len(inputs.ids))
    assert len(calls) == 1
    calls.clear()
    cached_gradients(encoder, inputs, 0.0, mini_batch_size=4)
    batches = -(-len(inputs.ids) // 4)
    assert len(calls) == 2 * batches - 1
