"""What training minimises, as one module: the base model, the heads, and the loss of a batch.

Being one ``nn.Module`` whose ``forward`` returns the loss lets accelerate wrap it (DDP) as a whole.

Positions (paper, section 2.1.1): the hidden state at position t feeds the base ``lm_head``, which
predicts token t+1, and head k (0-based), which predicts token t+k+2. Head k's target at t is therefore
``input_ids[t+k+2]`` (``loss="ce"``) or the base model's own distribution there, ``softmax(lm_head(
hidden[t+k+1]))`` (``loss="kl"``). Only positions whose target token is an assistant token count.

Heads with Hydra++'s prefix layer read its output over the hidden states (``MedusaHeads.prefix_states``), trained
with them; the base ``lm_head``, the teacher and the backbone's loss read the hidden states themselves.

Sequential heads (``head_type="sequential"``) also read the tokens on their candidate path; training feeds them
the true ones (teacher forcing): head k at t reads ``input_ids[t+1 : t+k+2]``, the base model's next token and the
k tokens before its own target. Those always exist, since the target ``input_ids[t+k+2]`` does.
"""

from __future__ import annotations

import torch
from torch import nn

from medusa.heads import MedusaHeads
from medusa.training.losses import projected_cross_entropy, projected_kl


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft model (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "disable_adapter") and hasattr(model, "get_base_model") else model


class MedusaObjective(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        heads: MedusaHeads,
        loss: str = "kl",
        head_weights: list[float] | None = None,
        stage: int = 1,
        heads_lambda: float = 0.2,
        chunk_size: int = 2048,
    ) -> None:
        super().__init__()
        self.base = base
        self.heads = heads
        self.loss = loss
        self.head_weights = head_weights or [0.8**k for k in range(heads.config.num_heads)]
        self.stage = stage
        self.heads_lambda = heads_lambda
        self.chunk_size = chunk_size
        self.lm_head = unwrap_peft(base).get_output_embeddings()
        heads.attach_base_model(unwrap_peft(base))

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last layer's (normed) hidden states ``[batch, seq, hidden]``, without computing any logits."""
        model = unwrap_peft(self.base)
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        if decoder is not None and decoder is not model:
            return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True)
        return output.hidden_states[-1]

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, train_backbone: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden, reference)``: the states the heads read, and the original model's (no gradient).

        In stage 2 the reference is the base with the adapter switched off, so the backbone is pulled
        towards its original answers; before the backbone trains, both are the same tensor.
        """
        with torch.no_grad():
            if self.stage == 2:
                with self.base.disable_adapter():
                    reference = self._hidden(input_ids, attention_mask)
            else:
                reference = self._hidden(input_ids, attention_mask)
        if self.stage == 2 and train_backbone:
            return self._hidden(input_ids, attention_mask), reference
        return reference, reference

    def projection(self, head_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer = self.lm_head if self.heads.projections is None else self.heads.projections[head_index]
        return layer.weight, getattr(layer, "bias", None)

    def head_features(
        self, head_index: int, hidden_rows: torch.Tensor, path_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Head ``head_index``'s features for ``hidden_rows [rows, hidden]``; ``path_rows [rows, head_index + 1]``
        (sequential heads only, from ``teacher_path``)."""
        return self.heads.features(head_index, hidden_rows, path_rows)

    def teacher_path(self, input_ids: torch.Tensor, head_index: int, valid: torch.Tensor) -> torch.Tensor | None:
        """The true path ``[rows, head_index + 1]`` of head ``head_index`` at each position t where ``valid
        [batch, seq - head_index - 2]`` holds: ``input_ids[:, t+1 : t+head_index+2]``. None for Medusa heads."""
        if not self.heads.config.sequential:
            return None
        if valid.shape[1] == 0:  # sequences too short for this head's target (unfold needs k + 1 tokens)
            return input_ids.new_zeros(0, head_index + 1)
        windows = input_ids[:, 1:].unfold(1, head_index + 1, 1)  # [batch, seq - 1 - k, k + 1]: window t starts at t+1
        return windows[:, : valid.shape[1]][valid]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        train_backbone: bool = False,
    ) -> dict[str, torch.Tensor]:
        """``loss`` (to minimise) and, detached, ``head_losses`` ``[heads]``, ``head_counts``, ``backbone_loss``."""
        mask = loss_mask.bool() & attention_mask.bool()
        hidden, reference = self.hidden_states(input_ids, attention_mask, train_backbone)
        head_input = self.heads.prefix_states(hidden, attention_mask)  # hidden itself without a prefix layer
        base_weight, base_bias = self.lm_head.weight, getattr(self.lm_head, "bias", None)
        losses, counts = [], []
        for k in range(self.heads.config.num_heads):
            shift = k + 2
            valid = mask[:, shift:]  # [batch, seq - shift]: is the target of position t an assistant token
            path = self.teacher_path(input_ids, k, valid)
            features = self.head_features(k, head_input[:, : head_input.shape[1] - shift][valid], path)
            weight, bias = self.projection(k)
            if self.loss == "kl":
                teacher = reference[:, shift - 1 : reference.shape[1] - 1][valid]
                total = projected_kl(features, weight, teacher, base_weight, bias, base_bias, self.chunk_size)
            else:
                labels = input_ids[:, shift:][valid]
                total = projected_cross_entropy(features, weight, labels, bias, self.chunk_size)
            count = valid.sum()
            losses.append(total / count.clamp(min=1))
            counts.append(count)
        head_losses = torch.stack(losses)
        weights = torch.tensor(self.head_weights, dtype=head_losses.dtype, device=head_losses.device)
        loss = (weights * head_losses).sum()
        backbone_loss = torch.zeros((), device=loss.device)
        if self.stage == 2 and train_backbone:
            valid = mask[:, 1:]  # next-token positions whose target is an assistant token
            student = hidden[:, :-1][valid]
            teacher = reference[:, :-1][valid]
            total = projected_kl(student, base_weight, teacher, base_weight, base_bias, base_bias, self.chunk_size)
            backbone_loss = total / valid.sum().clamp(min=1)
            loss = backbone_loss + self.heads_lambda * loss
        return {
            "loss": loss,
            "head_losses": head_losses.detach(),
            "head_counts": torch.stack(counts),
            "backbone_loss": backbone_loss.detach(),
        }
