"""Held-out accuracy of each head, per rank: how often the head's rank-r guess is the right token.

"Right" is measured two ways. ``greedy``: the token greedy verification accepts, the base model's
argmax at the same place (``argmax lm_head(hidden[t+k+1])`` for head k at t); this is what the heads
are for, and the tree search reads its per-rank rates. ``data``: the conversation's own next token
(the same thing when the data was distilled greedily from the base model).

Sequential heads read the tokens on their candidate path, so their guesses are measured under two
conditions. Teacher-forced (the keys without a prefix): head k at t reads the true tokens
``input_ids[t+1 : t+k+2]``, as in training; a tree node is accepted only when its ancestors were right, so
these are the conditional rates the tree search multiplies. Own guesses (``own_*``): head k reads the data's
token t+1 and then the top-1 guesses of heads 0..k-1 at t, as the tree's first path does while decoding.
Medusa heads read no path, so for them both are the same numbers (copied, not measured twice).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from medusa.training.losses import RANKS, rank_hits
from medusa.training.objective import MedusaObjective

TARGETS = ("greedy", "data")


@torch.no_grad()
def count_hits(objective: MedusaObjective, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Summed counts over the batches: ``greedy``/``data`` ``[heads, RANKS]`` (teacher-forced), for sequential
    heads also ``own_greedy``/``own_data`` (fed their own guesses), ``positions`` ``[heads]``, and, for stage 2,
    ``agree``/``compared``: how often the adapted model's next token equals the original's."""
    num_heads = objective.heads.config.num_heads
    sequential = objective.heads.config.sequential
    device = objective.lm_head.weight.device
    counted = [*TARGETS, *(f"own_{target}" for target in TARGETS if sequential)]
    totals = {name: torch.zeros(num_heads, RANKS, dtype=torch.long, device=device) for name in counted}
    totals |= {
        "positions": torch.zeros(num_heads, dtype=torch.long, device=device),
        "agree": torch.zeros((), dtype=torch.long, device=device),
        "compared": torch.zeros((), dtype=torch.long, device=device),
    }
    was_training = objective.training
    objective.eval()
    for batch in batches:
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        mask = batch["loss_mask"].to(device).bool() & attention_mask.bool()
        hidden, reference = objective.hidden_states(input_ids, attention_mask, train_backbone=True)
        greedy = _argmax(objective, hidden.flatten(0, 1)).view(hidden.shape[:2])  # the base's token after each place
        head_input = objective.heads.prefix_states(hidden, attention_mask)  # what the heads read
        _count_batch(objective, totals, head_input, input_ids, greedy, mask)
        if objective.stage == 2:
            valid = mask[:, 1:]
            original = _argmax(objective, reference[:, :-1][valid])
            totals["agree"] += (greedy[:, :-1][valid] == original).sum()
            totals["compared"] += valid.sum()
    objective.train(was_training)
    return totals


def _count_batch(
    objective: MedusaObjective,
    totals: dict[str, torch.Tensor],
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    greedy: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    """Add one batch's rank hits. Head k counts at the positions t whose target t+k+2 is an assistant token; every
    such t is measured once, all heads together, so that head k's own-guess path can take the guesses of heads
    0..k-1 at the same t."""
    heads = objective.heads
    num_heads, sequential = heads.config.num_heads, heads.config.sequential
    places = hidden.shape[1] - 2  # t = 0 .. seq - 3: head 0's target t + 2 is in the sequence
    if places < 1:
        return
    # Right-padded so that every window below exists; a padded slot is read only where its head does not count.
    padded_ids = F.pad(input_ids, (0, num_heads + 1))
    padded_greedy = F.pad(greedy, (0, num_heads + 1))
    valid = torch.stack([F.pad(mask[:, k + 2 :], (0, k)) for k in range(num_heads)])  # [heads, batch, places]
    measured = valid.any(dim=0)  # [batch, places]
    rows = hidden[:, :places][measured]  # [rows, hidden]
    true_path = padded_ids[:, 1:].unfold(1, num_heads, 1)[:, :places][measured]  # [rows, heads]: tokens t+1 .. t+K
    counts = valid[:, measured]  # [heads, rows]
    targets = {
        "greedy": torch.stack([padded_greedy[:, k + 1 : k + 1 + places][measured] for k in range(num_heads)]),
        "data": torch.stack([padded_ids[:, k + 2 : k + 2 + places][measured] for k in range(num_heads)]),
    }
    totals["positions"] += counts.sum(dim=1)
    chunk = objective.chunk_size
    for start in range(0, rows.shape[0], chunk):
        part = slice(start, start + chunk)
        own_path = true_path[part, :1]  # the data's token t+1, then the heads' own top-1 guesses
        for k in range(num_heads):
            keep = counts[k, part]
            forced = _logits(objective, k, rows[part], true_path[part, : k + 1] if sequential else None)
            _add_ranks(totals, "", k, forced, keep, targets, part, chunk)
            if sequential:
                # head 0 reads only the token t+1 either way
                own = forced if k == 0 else _logits(objective, k, rows[part], own_path)
                _add_ranks(totals, "own_", k, own, keep, targets, part, chunk)
                own_path = torch.cat([own_path, own.argmax(dim=-1, keepdim=True)], dim=-1)


def _logits(objective: MedusaObjective, k: int, rows: torch.Tensor, path: torch.Tensor | None) -> torch.Tensor:
    """Head k's logits ``[rows, vocab]`` in float32, through the projection in its own dtype (the frozen base may
    hold bf16 weights while the heads train in float32; evaluation runs outside autocast)."""
    features = objective.head_features(k, rows, path)
    weight, bias = objective.projection(k)
    return F.linear(features.to(weight.dtype), weight, bias).float()


def _add_ranks(
    totals: dict[str, torch.Tensor],
    prefix: str,
    k: int,
    logits: torch.Tensor,
    keep: torch.Tensor,
    targets: dict[str, torch.Tensor],
    part: slice,
    chunk: int,
) -> None:
    for target in TARGETS:
        totals[prefix + target][k] += rank_hits(lambda x: x, logits[keep], targets[target][k, part][keep], chunk)


def _argmax(objective: MedusaObjective, rows: torch.Tensor) -> torch.Tensor:
    """The base model's greedy token for each hidden state ``[rows, hidden]``, a chunk of logits at a time."""
    size = objective.chunk_size
    parts = [objective.lm_head(rows[start : start + size]).argmax(dim=-1) for start in range(0, rows.shape[0], size)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=rows.device)


def accuracy_report(totals: dict[str, torch.Tensor], stage: int, head_type: str = "medusa") -> dict:
    """JSON-ready ``head_accuracy.json``: per head top-1/top-5 and per-rank hit rates (ranks 0..9), teacher-forced
    and (``own_*``) fed the heads' own guesses."""
    sequential = head_type == "sequential"
    heads = []
    for k in range(totals["positions"].shape[0]):
        positions = int(totals["positions"][k])
        scale = 1.0 / positions if positions else 0.0

        def rates(name: str, k: int = k, scale: float = scale) -> list[float]:
            return [int(v) * scale for v in totals[name][k]]

        greedy, data = rates("greedy"), rates("data")
        own_greedy, own_data = (rates("own_greedy"), rates("own_data")) if sequential else (greedy, data)
        reads = f" and tokens t+1..t+{k + 1}" if sequential else ""
        heads.append(
            {
                "head": k,
                "predicts": f"token t+{k + 2} from the hidden state at t{reads}",
                "positions": positions,
                **_summary("", greedy),
                **_summary("data_", data),
                **_summary("own_", own_greedy),
                **_summary("own_data_", own_data),
            }
        )
    report: dict = {
        "target": "greedy: the base model's argmax at the same position",
        "head_type": head_type,
        "conditioning": {
            "top1, top5, rank_hit_rate, data_*": "teacher-forced: head k reads the true tokens t+1..t+k+1"
            if sequential
            else "the hidden state alone (Medusa heads read no path)",
            "own_*": "head k reads the data's token t+1, then the top-1 guesses of heads 0..k-1 at t"
            if sequential
            else "copied from the keys without own_: Medusa heads read no path, so both conditions are the same",
        },
        "heads": heads,
    }
    if stage == 2:
        compared = int(totals["compared"])
        report["backbone_agreement"] = int(totals["agree"]) / compared if compared else 0.0
        report["backbone_agreement_positions"] = compared
    return report


def _summary(prefix: str, rates: list[float]) -> dict:
    return {f"{prefix}top1": rates[0], f"{prefix}top5": sum(rates[:5]), f"{prefix}rank_hit_rate": rates}
