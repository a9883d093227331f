"""Grouped-query attention under a mask without repeating K/V: each K/V head's query heads fold into the query axis.

transformers' "sdpa" attention repeats the K/V heads up to the query heads over the whole attention span
whenever a mask is passed (torch's ``enable_gqa=True`` with a mask falls back to its slow math kernel on
CUDA). Tree decoding always passes a mask, so every step paid a K/V-sized copy per layer: a third of a
batched SmolLM2-135M step on an H100. Here the ``G`` query heads sharing a K/V head become ``G`` times
as many queries of that head (``[B, Hkv * G, L, D]`` -> ``[B, Hkv, G * L, D]``) and the mask is repeated
along the query axis instead; K/V go to one SDPA call untouched. Only the (small) query and mask are copied.

The function is registered in transformers' ``AttentionInterface`` under ``GROUPED_SDPA`` (with sdpa's
mask function, so 2-D padding masks are still turned into 4-D ones) and a model is switched to it with
``use_grouped_sdpa``. Calls it cannot fold (no mask, a mask that differs per head, extra terms such as
``position_bias`` or ``softcap``, no GQA, other devices) or where the repeated mask would outgrow the
repeated K/V (long prefill chunks) go to transformers' own sdpa function unchanged.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

logger = logging.getLogger("medusa")

# transformers runs its SDPA checks (``_supports_sdpa``) on any implementation name containing "sdpa".
GROUPED_SDPA = "medusa_grouped_sdpa"
# Keyword arguments whose terms transformers' sdpa function adds to the scores (or refuses): not folded here.
EXTRA_SCORE_TERMS = ("position_bias", "softcap", "s_aux", "sinks")
FOLDING_DEVICES = ("cuda", "cpu")  # others (mps, npu, xpu) keep transformers' device-specific workarounds
# SDPA backends for a prefill: all but cuDNN's, which builds a plan for every new shape, and a prefill's
# shape (its prompts' longest length) is new for most prompts. On the H100 a prompt of an unseen length took
# 115 ms to prefill with cuDNN allowed, 47 ms without (38 and 35 ms for a length seen before;
# docs/benchmarks/h100-batch-engine-v3/). A decoding step keeps every backend: its shapes are fixed per
# captured graph, so its plan is built once.
PREFILL_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def _foldable(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict,
) -> bool:
    groups = getattr(module, "num_key_value_groups", 1)
    if not (
        groups > 1
        and query.shape[1] == key.shape[1] * groups
        and query.device.type in FOLDING_DEVICES
        # Without a mask transformers uses ``enable_gqa`` (fast without a mask) or ``is_causal``, which a
        # folded query axis would break.
        and isinstance(attention_mask, torch.Tensor)
        and attention_mask.dim() == 4
        # One mask for all heads (a per-head mask broadcast from one has stride 0 along the heads).
        and (attention_mask.shape[1] == 1 or attention_mask.stride(1) == 0)
        and not kwargs.get("output_attentions", False)
        and all(kwargs.get(name) is None for name in EXTRA_SCORE_TERMS)
    ):
        return False
    # Folding copies the mask G times; repeating copies K/V up to the query heads. A decoding step's few
    # queries make the mask copy far smaller; a long prefill chunk can make it the larger one.
    mask_copy = attention_mask.shape[0] * groups * query.shape[2] * key.shape[2]
    kv_copy = key.shape[0] * query.shape[1] * key.shape[2] * (key.shape[3] + value.shape[3])
    return mask_copy <= kv_copy


def grouped_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature and result (``[B, L, Hq, Dv]``, None), as its "sdpa" gives.

    Query head ``h`` attends with K/V head ``h // G`` (as ``repeat_kv`` maps them); a mask makes the
    attention non-causal, as in transformers' sdpa function, so ``is_causal`` only matters on its path.
    """
    if not _foldable(module, query, key, value, attention_mask, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, query_heads, length, head_dim = query.shape
    kv_heads, span = key.shape[1], key.shape[2]
    groups = query_heads // kv_heads
    # Row g * L + l of a K/V head's folded queries is query head (kv * G + g) at position l.
    folded_query = query.reshape(batch, kv_heads, groups * length, head_dim)
    mask = attention_mask[:, :1].expand(attention_mask.shape[0], groups, length, span)
    folded_mask = mask.reshape(attention_mask.shape[0], 1, groups * length, span)
    output = torch.nn.functional.scaled_dot_product_attention(
        folded_query, key, value, attn_mask=folded_mask, dropout_p=dropout, scale=scaling, is_causal=False
    )
    output = output.reshape(output.shape[0], query_heads, length, value.shape[-1])
    return output.transpose(1, 2).contiguous(), None


def prefill_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """The attention backends a prefill on ``device`` runs with (``PREFILL_BACKENDS`` on CUDA)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(list(PREFILL_BACKENDS))


def register_grouped_sdpa() -> None:
    """Make ``GROUPED_SDPA`` a valid ``attn_implementation`` (idempotent); masks are built as for "sdpa"."""
    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention_forward)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


def is_grouped_query(model: PreTrainedModel) -> bool:
    """Whether the model's attention shares each K/V head among several query heads."""
    config = model.config.get_text_config()
    query_heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or query_heads
    return query_heads is not None and kv_heads < query_heads


def use_grouped_sdpa(model: PreTrainedModel) -> bool:
    """Switch a grouped-query model from "sdpa" to ``GROUPED_SDPA`` in place; True if it now uses it.

    Eager, flash, flex and other implementations are left alone, as are models without GQA, and a model
    transformers will not switch (it logs why) stays on "sdpa". ``model.set_attn_implementation("sdpa")``
    switches back (CUDA graphs captured before keep the attention they recorded).
    """
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not is_grouped_query(model):
        return False
    if not hasattr(model, "set_attn_implementation"):  # not a transformers model that can switch
        return False
    register_grouped_sdpa()
    try:
        model.set_attn_implementation(GROUPED_SDPA)
    except (ValueError, ImportError, KeyError) as error:  # transformers refused the name for this model
        logger.debug("keeping sdpa attention for %s: %s", type(model).__name__, error)
        return False
    return model.config._attn_implementation == GROUPED_SDPA
