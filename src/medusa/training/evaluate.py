"""Held-out accuracy of each head, per rank: how often the head's rank-r guess is the right token.

"Right" is measured two ways. ``greedy``: the token greedy verification accepts, the base model's
argmax at the same place (``argmax lm_head(hidden[t+k+1])`` for head k at t); this is what the heads
are for, and the tree search reads its per-rank rates. ``data``: the conversation's own next token
(the same thing when the data was distilled greedily from the base model).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from medusa.training.losses import RANKS, rank_hits
from medusa.training.objective import MedusaObjective


@torch.no_grad()
def count_hits(objective: MedusaObjective, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Summed counts over the batches: ``greedy``/``data`` ``[heads, RANKS]``, ``positions`` ``[heads]``,
    and, for stage 2, ``agree``/``compared``: how often the adapted model's next token equals the original's."""
    num_heads = objective.heads.config.num_heads
    device = objective.lm_head.weight.device
    totals = {
        "greedy": torch.zeros(num_heads, RANKS, dtype=torch.long, device=device),
        "data": torch.zeros(num_heads, RANKS, dtype=torch.long, device=device),
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
        for k in range(num_heads):
            shift = k + 2
            valid = mask[:, shift:]
            features = objective.head_features(k, hidden[:, : hidden.shape[1] - shift][valid])
            weight, bias = objective.projection(k)

            def head_logits(rows: torch.Tensor, weight=weight, bias=bias) -> torch.Tensor:
                return torch.nn.functional.linear(rows.to(weight.dtype), weight, bias)

            greedy = _argmax(objective, hidden[:, shift - 1 : hidden.shape[1] - 1][valid])
            totals["greedy"][k] += rank_hits(head_logits, features, greedy, objective.chunk_size)
            totals["data"][k] += rank_hits(head_logits, features, input_ids[:, shift:][valid], objective.chunk_size)
            totals["positions"][k] += valid.sum()
        if objective.stage == 2:
            valid = mask[:, 1:]
            adapted = _argmax(objective, hidden[:, :-1][valid])
            original = _argmax(objective, reference[:, :-1][valid])
            totals["agree"] += (adapted == original).sum()
            totals["compared"] += valid.sum()
    objective.train(was_training)
    return totals


def _argmax(objective: MedusaObjective, rows: torch.Tensor) -> torch.Tensor:
    """The base model's greedy token for each hidden state ``[rows, hidden]``, a chunk of logits at a time."""
    size = objective.chunk_size
    parts = [objective.lm_head(rows[start : start + size]).argmax(dim=-1) for start in range(0, rows.shape[0], size)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=rows.device)


def accuracy_report(totals: dict[str, torch.Tensor], stage: int) -> dict:
    """JSON-ready ``head_accuracy.json``: per head top-1/top-5 and per-rank hit rates (ranks 0..9)."""
    heads = []
    for k in range(totals["positions"].shape[0]):
        positions = int(totals["positions"][k])
        scale = 1.0 / positions if positions else 0.0
        greedy = [int(v) * scale for v in totals["greedy"][k]]
        data = [int(v) * scale for v in totals["data"][k]]
        heads.append(
            {
                "head": k,
                "predicts": f"token t+{k + 2} from the hidden state at t",
                "positions": positions,
                "top1": greedy[0],
                "top5": sum(greedy[:5]),
                "rank_hit_rate": greedy,
                "data_top1": data[0],
                "data_top5": sum(data[:5]),
                "data_rank_hit_rate": data,
            }
        )
    report: dict = {"target": "greedy: the base model's argmax at the same position", "heads": heads}
    if stage == 2:
        compared = int(totals["compared"])
        report["backbone_agreement"] = int(totals["agree"]) / compared if compared else 0.0
        report["backbone_agreement_positions"] = compared
    return report
