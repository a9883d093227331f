"""Heads for the tests: sequential heads whose weights are perturbed, so that every head's guess depends on its
path (untrained heads of either type all return the base model's logits)."""

from __future__ import annotations

import torch

from medusa.heads import MedusaHeads, MedusaHeadsConfig


def sequential_heads(
    base: torch.nn.Module,
    num_heads: int = 3,
    num_layers: int = 1,
    seed: int = 0,
    scale: float = 0.3,
    path_gain: float = 1.0,
    head_type: str = "sequential",
    prefix_layer: bool = False,
) -> MedusaHeads:
    """Heads (sequential unless ``head_type`` says otherwise; with Hydra++'s prefix layer if ``prefix_layer``) over
    ``base``'s lm_head and input embeddings, every weight moved by ``scale`` x N(0, 1), then the weights on the
    path's embeddings multiplied by ``path_gain`` (a tiny model's embeddings are small, so at gain 1 the path moves a
    head's logits only a little)."""
    lm_head = base.get_output_embeddings()
    config = MedusaHeadsConfig(
        hidden_size=base.config.get_text_config().hidden_size,
        vocab_size=lm_head.weight.shape[0],
        num_heads=num_heads,
        num_layers=num_layers,
        share_lm_head=True,
        head_type=head_type,
        prefix_layer=prefix_layer,
    )
    heads = MedusaHeads(config, base_lm_head=lm_head)
    heads.attach_base_model(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
        for layer in heads.path_inputs or ():
            layer.weight[:, config.hidden_size :] *= path_gain
    return heads.eval()
