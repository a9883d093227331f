"""Losses through a vocabulary projection without holding ``[positions, vocab]`` logits.

With a 49152-token vocabulary, 16 k positions and 4 heads, fp32 logits would take 13 GB. The loss is
instead computed in chunks of positions, and its gradient with it (for cross-entropy and KL both,
d loss / d logits = softmax(logits) - target), so the backward pass needs only ``[positions, hidden]``
of saved gradient: no chunk's logits survive the forward pass and none is recomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RANKS = 10  # rank hits are counted for ranks 0..RANKS-1 (the tree search's per-rank acceptance rates)


class _ProjectedLoss(torch.autograd.Function):
    """Sum over rows of ``KL(softmax(teacher @ W_t) || softmax(x @ W))`` or of ``-log softmax(x @ W)[label]``."""

    @staticmethod
    def forward(ctx, features, weight, bias, teacher, teacher_weight, teacher_bias, labels, chunk_size):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=features.device)
        grad_x = torch.empty_like(features) if need_x else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, features.shape[0], chunk_size):
            end = start + chunk_size
            x = features[start:end]
            log_probs = F.log_softmax(F.linear(x.to(weight.dtype), weight, bias).float(), dim=-1)  # [chunk, vocab]
            grad = log_probs.exp()
            if teacher is not None:
                teacher_logits = F.linear(teacher[start:end].to(teacher_weight.dtype), teacher_weight, teacher_bias)
                target = F.log_softmax(teacher_logits.float(), dim=-1)
                target_probs = target.exp()
                total += (target_probs * (target - log_probs)).sum()
                grad -= target_probs
            else:
                rows = torch.arange(x.shape[0], device=x.device)
                chunk_labels = labels[start:end]
                total -= log_probs[rows, chunk_labels].sum()
                grad[rows, chunk_labels] -= 1.0
            if need_x:
                grad_x[start:end] = (grad.to(weight.dtype) @ weight).to(features.dtype)
            if need_w:
                grad_w += grad.t().to(weight.dtype) @ x.to(weight.dtype)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_w = ctx.saved_tensors
        out_x = grad_x * grad_total.to(grad_x.dtype) if grad_x is not None else None
        out_w = (grad_w * grad_total).to(ctx.weight_dtype) if grad_w is not None else None
        return out_x, out_w, None, None, None, None, None, None


def projected_kl(
    features: torch.Tensor,
    weight: torch.Tensor,
    teacher: torch.Tensor,
    teacher_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Summed ``KL(p_teacher || p_student)`` over rows; ``features``/``teacher``: ``[rows, hidden]``.

    The teacher's distribution is the base model's own: its hidden state through its lm_head.
    """
    if bias is not None and bias.requires_grad:
        raise ValueError("a trainable projection bias is not supported")
    return _ProjectedLoss.apply(
        features,
        weight,
        bias,
        teacher.detach(),
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        None,
        chunk_size,
    )


def projected_cross_entropy(
    features: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Summed cross-entropy of ``labels`` ``[rows]`` under ``softmax(features @ weight.T)``."""
    if bias is not None and bias.requires_grad:
        raise ValueError("a trainable projection bias is not supported")
    return _ProjectedLoss.apply(features, weight, bias, None, None, None, labels, chunk_size)


@torch.no_grad()
def rank_hits(logits_fn, features: torch.Tensor, targets: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """``[RANKS]`` counts: how often the target is the head's rank-r guess (ties count in the target's favour).

    ``logits_fn`` maps ``[rows, hidden]`` to ``[rows, vocab]``; the top-k accuracy is ``hits[:k].sum()``.
    """
    hits = torch.zeros(RANKS, dtype=torch.long, device=features.device)
    for start in range(0, features.shape[0], chunk_size):
        logits = logits_fn(features[start : start + chunk_size]).float()
        chosen = logits.gather(1, targets[start : start + chunk_size, None])
        ranks = (logits > chosen).sum(dim=-1)
        hits += torch.bincount(ranks[ranks < RANKS], minlength=RANKS)
    return hits
