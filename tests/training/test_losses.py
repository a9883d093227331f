"""Chunked projected losses against the plain formulas, values and gradients, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medusa.training.losses import RANKS, projected_cross_entropy, projected_kl, rank_hits


@pytest.fixture
def tensors():
    generator = torch.Generator().manual_seed(0)
    rows, hidden, vocab = 23, 8, 40
    make = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    return (
        make(rows, hidden).requires_grad_(),
        make(vocab, hidden).requires_grad_(),
        make(rows, hidden),
        make(vocab, hidden),
        torch.randint(0, vocab, (rows,), generator=generator),
    )


@pytest.mark.parametrize("chunk", [1, 5, 100])
def test_projected_kl_matches_the_formula_and_its_gradient(tensors, chunk):
    x, weight, teacher, teacher_weight, _ = tensors
    loss = projected_kl(x, weight, teacher, teacher_weight, chunk_size=chunk)
    (3 * loss).backward()
    got = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    target = F.log_softmax(teacher @ teacher_weight.T, dim=-1)
    reference = (target.exp() * (target - F.log_softmax(x @ weight.T, dim=-1))).sum()
    (3 * reference).backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert torch.allclose(got[0], x.grad, atol=1e-5) and torch.allclose(got[1], weight.grad, atol=1e-5)


@pytest.mark.parametrize("chunk", [4, 64])
def test_projected_cross_entropy_matches_the_formula_and_its_gradient(tensors, chunk):
    x, weight, _, _, labels = tensors
    loss = projected_cross_entropy(x, weight, labels, chunk_size=chunk)
    loss.backward()
    got = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    reference = F.cross_entropy(x @ weight.T, labels, reduction="sum")
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert torch.allclose(got[0], x.grad, atol=1e-5) and torch.allclose(got[1], weight.grad, atol=1e-5)


def test_frozen_projection_gets_no_gradient_and_empty_input_gives_zero(tensors):
    x, weight, teacher, teacher_weight, _ = tensors
    frozen = weight.detach()
    projected_kl(x, frozen, teacher, teacher_weight).backward()
    assert x.grad is not None and frozen.grad is None
    empty = torch.zeros(0, x.shape[1], dtype=x.dtype, requires_grad=True)
    loss = projected_kl(empty, frozen, teacher[:0], teacher_weight)
    loss.backward()
    assert loss.item() == 0 and empty.grad.shape == empty.shape


def test_rank_hits_count_the_targets_rank():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0] + [0.0] * 12] * 3)
    targets = torch.tensor([0, 2, 3])
    hits = rank_hits(lambda rows: rows, logits, targets, chunk_size=2)
    assert hits.shape == (RANKS,)
    assert hits.tolist()[:4] == [1, 0, 1, 1] and hits.sum() == 3
    far = torch.zeros(1, 16)
    far[0, : RANKS + 1] = torch.arange(RANKS + 1, 0, -1, dtype=torch.float)
    assert rank_hits(lambda rows: rows, far, torch.tensor([RANKS])).sum() == 0  # rank 10: not counted
