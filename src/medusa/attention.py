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

**Ragged attention** (opt-in). A batch's step attends over one span of slots for every row: the longest row's.
Given the step's ``RaggedRows`` (under ``RAGGED_KEYWORD`` among the model's keyword arguments, which transformers
hands to every attention call), the function reads instead each row's committed slots with a variable-length
kernel (FlashAttention's ``seqused_k`` on CUDA) and its own tree, which sits right after them, under the tree's
mask; the two softmaxes are merged by their log-sum-exps. A one-node tree (plain decoding) is one kernel call
over each row's committed slots and itself. On the H100 it made batch-32 steps of the default model slower, not
faster (docs/benchmarks/h100-ragged-attention/): the padding it skips cost less than its extra kernels.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

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
# The model-forward keyword under which a decoding step passes its ``RaggedRows`` to every attention call.
RAGGED_KEYWORD = "medusa_ragged_rows"
FLASH_DTYPES = (torch.float16, torch.bfloat16)  # what FlashAttention computes in


@dataclass(frozen=True)
class RaggedRows:
    """A decoding step's rows as its attention reads them: row b's text so far in slots ``[0, committed[b])``,
    the tree this step wrote in the ``nodes`` slots after them."""

    committed: torch.Tensor  # [rows] integer: committed slots per row
    tree_mask: torch.Tensor  # [nodes, nodes] bool: node i sees node j (an ancestor or itself)
    flash: bool = False  # FlashAttention's variable-length kernel runs here (``flash_runs``, probed by the caller)


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
    rows = kwargs.pop(RAGGED_KEYWORD, None)
    if rows is not None and not dropout and _raggable(module, query, key, rows, kwargs):
        return ragged_attention(query, key, value, rows, scaling), None
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


def _raggable(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, rows: RaggedRows, kwargs: dict) -> bool:
    window = getattr(module, "sliding_window", None)
    groups = getattr(module, "num_key_value_groups", 1)
    return (
        query.device.type in FOLDING_DEVICES
        and query.shape[1] == key.shape[1] * groups
        and query.shape[0] == key.shape[0] == rows.committed.shape[0]
        and query.shape[2] == rows.tree_mask.shape[0]
        # a window no shorter than the span hides nothing (slot i holds position i, the tree sits inside the span)
        and (window is None or window >= key.shape[2])
        and not kwargs.get("output_attentions", False)
        and all(kwargs.get(name) is None for name in EXTRA_SCORE_TERMS)
    )


def ragged_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: RaggedRows, scaling: float | None = None
) -> torch.Tensor:
    """Each row's tree queries over its committed slots and its own tree: ``[B, L, Hq, Dv]`` (transformers'
    layout), what a mask over the span hiding all else gives.

    ``query [B, Hq, L, D]``; ``key``/``value [B, Hkv, S, D]``, row b's tree at slots ``committed[b] + [0, L)``.
    """
    nodes = query.shape[2]
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    # Rows not running may have no committed slot: they read slot 0 (finite, and their output is never used).
    committed = rows.committed.clamp(min=1)
    if nodes == 1:  # plain decoding: the one node sits right after the committed slots
        output, _ = committed_attention(query, key, value, committed + 1, scale, rows.flash)
        return output.transpose(1, 2).to(query.dtype).contiguous()
    # [B, Hq, L, Dv] and [B, Hq, L] each
    before, before_lse = committed_attention(query, key, value, committed, scale, rows.flash)
    tree, tree_lse = _tree_attention(query, key, value, committed, rows.tree_mask, scale)
    top = torch.maximum(before_lse, tree_lse)  # the tree part is never empty: a node sees itself
    before_weight = (before_lse - top).exp()[..., None]
    tree_weight = (tree_lse - top).exp()[..., None]
    output = (before.float() * before_weight + tree * tree_weight) / (before_weight + tree_weight)
    return output.transpose(1, 2).to(query.dtype).contiguous()


def _tree_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    committed: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each row's tree nodes over its own tree only, in float32: ``([B, Hq, L, Dv], [B, Hq, L])``."""
    batch, query_heads, nodes, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = query_heads // kv_heads
    slots = committed[:, None] + torch.arange(nodes, device=committed.device)  # [B, L]
    index = slots[:, None, :, None].to(key.device)
    tree_keys = key.gather(2, index.expand(batch, kv_heads, nodes, key.shape[3]))  # [B, Hkv, L, D]
    tree_values = value.gather(2, index.expand(batch, kv_heads, nodes, value.shape[3]))  # [B, Hkv, L, Dv]
    # Query head kv * G + g at node l is row g * L + l of K/V head kv (as ``repeat_kv`` pairs them).
    folded = query.reshape(batch, kv_heads, groups * nodes, head_dim).float()
    scores = folded @ tree_keys.float().transpose(-1, -2) * scale  # [B, Hkv, G * L, L]
    scores = scores.masked_fill(~tree_mask.to(scores.device).repeat(groups, 1), float("-inf"))
    lse = scores.logsumexp(-1)
    output = (scores - lse[..., None]).exp() @ tree_values.float()
    return output.reshape(batch, query_heads, nodes, -1), lse.reshape(batch, query_heads, nodes)


def committed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor, scale: float, flash: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query of row b over its slots ``[0, lengths[b])`` (``lengths >= 1``): the output
    ``[B, Hq, L, Dv]`` and its log-sum-exp ``[B, Hq, L]`` (float32). FlashAttention reads only those slots
    where it runs (``flash``) and takes these tensors; elsewhere a masked product over the span gives the same."""
    if flash and flash_reads(query, key, value):
        return _flash_committed(query, key, value, lengths, scale)
    return _masked_committed(query, key, value, lengths, scale)


def _masked_committed(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, query_heads, nodes, head_dim = query.shape
    kv_heads, span = key.shape[1], key.shape[2]
    folded = query.reshape(batch, kv_heads, query_heads // kv_heads * nodes, head_dim).float()
    scores = folded @ key.float().transpose(-1, -2) * scale  # [B, Hkv, G * L, S]
    hidden = torch.arange(span, device=key.device)[None, :] >= lengths.to(key.device)[:, None]  # [B, S]
    scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
    lse = scores.logsumexp(-1)
    output = (scores - lse[..., None]).exp() @ value.float()
    return output.reshape(batch, query_heads, nodes, -1), lse.reshape(batch, query_heads, nodes)


def _token_major(cache: torch.Tensor) -> torch.Tensor:
    """A cache view ``[B, H, S, D]`` (head-major, rows apart by its batch stride) seen as the ``[tokens, H, D]``
    that a variable-length kernel reads, with row b starting at token ``b * batch_stride / D``: no copy."""
    batch, heads, span, dim = cache.shape
    row_tokens = cache.stride(0) // cache.stride(2)
    tokens = (batch - 1) * row_tokens + span  # just reaches the last row's last slot
    return cache.as_strided((tokens, heads, dim), (cache.stride(2), cache.stride(1), 1), cache.storage_offset())


def _flash_committed(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, query_heads, nodes, head_dim = query.shape
    span = key.shape[2]
    device = query.device
    row_tokens = key.stride(0) // key.stride(2)
    starts_q = torch.arange(batch + 1, dtype=torch.int32, device=device) * nodes
    starts_k = torch.arange(batch + 1, dtype=torch.int32, device=device) * row_tokens
    output, lse, *_ = torch.ops.aten._flash_attention_forward(
        query.transpose(1, 2).reshape(batch * nodes, query_heads, head_dim),
        _token_major(key),
        _token_major(value),
        starts_q,
        starts_k,
        nodes,
        span,
        0.0,
        False,
        False,
        scale=scale,
        seqused_k=lengths.to(device=device, dtype=torch.int32),
    )
    output = output.view(batch, nodes, query_heads, head_dim).transpose(1, 2)  # [B, Hq, L, D]
    # FlashAttention's variable-length log-sum-exp is [Hq, tokens] (some builds pad it to [B, Hq, max_q])
    lse = lse.view(query_heads, batch, nodes).transpose(0, 1) if lse.dim() == 2 else lse[:, :, :nodes]
    return output, lse.float()


def flash_reads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether FlashAttention's variable-length kernel takes these: CUDA, half precision, one head size (a
    multiple of 8, at most 256), each cache row a whole number of token slots apart."""
    head_dim = query.shape[-1]
    return (
        query.device.type == "cuda"
        and query.dtype in FLASH_DTYPES
        and key.dtype == value.dtype == query.dtype
        and key.shape[-1] == value.shape[-1] == head_dim
        and head_dim % 8 == 0
        and head_dim <= 256
        and key.stride(-1) == value.stride(-1) == 1
        and key.stride() == value.stride()
        and key.stride(0) % key.stride(2) == 0
    )


def flash_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether FlashAttention's variable-length kernel runs on ``device`` and agrees with the masked product: a
    probe of a few small calls, run outside any capture (it allocates); a torch built without the kernel says so
    here, and steps keep the masked path."""
    if device.type != "cuda" or dtype not in FLASH_DTYPES:
        return False
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 4, 2, 64, generator=generator)  # 3 rows, 2 groups of 2 query heads, 2 queries
    cache = torch.randn(2, 3, 2, 48, 64, generator=generator)  # keys and values, 48 slots a row
    lengths = torch.tensor([1, 17, 40])
    try:
        query, cache = query.to(device, dtype), cache.to(device, dtype)
        tensors = (query, cache[0, :, :, :40], cache[1, :, :, :40])  # views over 40 slots, as a step's span
        got, got_lse = _flash_committed(*tensors, lengths.to(device), 0.125)
        want, want_lse = _masked_committed(*tensors, lengths.to(device), 0.125)
        agrees = torch.allclose(got.float(), want, atol=2e-2, rtol=2e-2) and torch.allclose(
            got_lse, want_lse, atol=2e-2, rtol=2e-2
        )
    except (RuntimeError, NotImplementedError) as error:
        logger.info("ragged attention reads the whole span on %s (%s): %s", device, dtype, error)
        return False
    if not agrees:
        logger.warning("FlashAttention's variable-length kernel disagrees with the masked product on %s", device)
    return agrees


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
