"""A preallocated KV cache for a whole generation, and the attention masks that address it.

Every layer is a transformers ``StaticLayer`` of ``max_length`` slots: a step writes the tree's K/V
after the committed tokens, then ``commit`` moves the accepted path's entries into place. Slots past the
committed length are never read: the masks built here hide them. Lengths live on the device so a step
can be captured as a CUDA graph.

A decoder's cache keeps every layer's K/V in one store ``[layers, 2, batch, kv_heads, slots, head_dim]``
when the layers' shapes agree, so that ``commit`` is one gather and one scatter for the whole model
instead of four small kernels per layer: on the H100, dropping those made a 135M model's tree step
9-10% cheaper (docs/benchmarks/h100-one-store).
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, StaticLayer


class KVStore:
    """One buffer for the K/V of every layer of a cache, allocated when the first layer is.

    A layer takes views of it when its K/V match the first layer's shape, dtype and device; one that does
    not (layers of different widths) keeps buffers of its own, and its slice of the store goes unused.
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.buffer: torch.Tensor | None = None  # [layers, 2, batch, kv_heads, slots, head_dim]
        self.members: set[int] = set()  # layers whose K/V are views of the buffer

    def claim(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views for layer ``index`` shaped like its freshly allocated ``keys``/``values``, or None."""
        if keys.shape != values.shape:
            return None
        if self.buffer is None:
            self.buffer = torch.zeros((self.num_layers, 2, *keys.shape), dtype=keys.dtype, device=keys.device)
        if self.buffer.shape[2:] != keys.shape or self.buffer.dtype != keys.dtype or self.buffer.device != keys.device:
            return None
        self.members.add(index)
        return self.buffer[index, 0], self.buffer[index, 1]


class StoredStaticLayer(StaticLayer):
    """A ``StaticLayer`` whose buffers are views of its cache's ``KVStore`` where the shapes allow."""

    def __init__(self, max_cache_len: int, store: KVStore, index: int) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.store = store
        self.index = index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        views = self.store.claim(self.index, self.keys, self.values)
        if views is not None:
            self.keys, self.values = views  # the layer's own zeros are freed
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.keys)
                torch._dynamo.mark_static_address(self.values)


class MedusaCache(Cache):
    """Static K/V buffers ``[batch, kv_heads, max_length, head_dim]`` per layer, full length on every layer.

    Sliding-window layers get full-length buffers too: the window is applied by the mask, which keeps
    slot i at position i and makes compaction a plain copy. ``one_store``: keep the layers' buffers in
    one ``KVStore`` (see the module's docstring).
    """

    def __init__(self, num_layers: int, max_length: int, one_store: bool = False) -> None:
        self.store = KVStore(num_layers) if one_store else None
        if self.store is None:
            layers = [StaticLayer(max_cache_len=max_length) for _ in range(num_layers)]
        else:
            layers = [StoredStaticLayer(max_length, self.store, index) for index in range(num_layers)]
        super().__init__(layers=layers)
        self.max_length = max_length

    def set_length(self, length: torch.Tensor) -> None:
        """Declare the first ``length`` slots committed; the next write goes right after them."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.cumulative_length.copy_(length)
            else:
                layer.cumulative_length = length.detach().clone()

    def prefix(self, length: int) -> MedusaCache:
        """A cache over the first ``length`` slots of this one: views of the same buffers, the same lengths.

        A step whose tree ends before slot ``length`` can attend through it and read only those slots,
        instead of every slot of the cache; what it writes lands in this cache's buffers. The buffers
        must exist (they are allocated by the first forward pass, the prefill).
        """
        if not 0 < length <= self.max_length:
            raise ValueError(f"a prefix of {length} slots does not fit a cache of {self.max_length}")
        view = MedusaCache(len(self.layers), length)
        for part, whole in zip(view.layers, self.layers):
            if not whole.is_initialized:
                raise ValueError("the cache has no buffers yet: run the prefill first")
            part.__dict__.update({k: v for k, v in vars(whole).items() if k not in ("keys", "values", "max_cache_len")})
            part.keys = whole.keys[:, :, :length]
            part.values = whole.values[:, :, :length]
        return view

    def commit(self, source_slots: torch.Tensor, target_start: torch.Tensor) -> None:
        """Copy the K/V at ``source_slots`` to the contiguous slots from ``target_start`` on.

        ``source_slots`` has a fixed length (the tree's depth + 1) so the copy has a static shape; entries
        past the accepted length land beyond the committed length, where nothing reads them.
        """
        targets = target_start + torch.arange(source_slots.numel(), device=source_slots.device)
        stored = set()
        if self.store is not None and self.store.buffer is not None:
            buffer, stored = self.store.buffer, self.store.members
            sources, places = source_slots.to(buffer.device), targets.to(buffer.device)
            buffer.index_copy_(4, places, buffer.index_select(4, sources))
        for index, layer in enumerate(self.layers):
            if index in stored:
                continue
            # Each layer's buffers sit on that layer's device when the base model is split over devices.
            sources, places = source_slots.to(layer.keys.device), targets.to(layer.keys.device)
            layer.keys.index_copy_(2, places, layer.keys.index_select(2, sources))
            layer.values.index_copy_(2, places, layer.values.index_select(2, sources))


def cache_keyword(model: torch.nn.Module) -> str:
    """The name under which ``model``'s forward takes a cache object: ``cache`` from transformers 5.25 on
    (where ``past_key_values`` warns on every call), ``past_key_values`` before. Read from the forward's
    signature, not the version, so models that follow either convention work; a peft wrapper's is its base's."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_keyword_of(type(target))


@functools.cache
def _cache_keyword_of(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def num_cache_layers(config: PretrainedConfig) -> int:
    return config.get_text_config().num_hidden_layers


def attention_mask_for(
    config: PretrainedConfig,
    allowed: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Turn a boolean ``[queries, slots]`` visibility into what the model's ``attention_mask`` takes.

    Additive float masks ``[1, 1, queries, slots]`` work for eager and SDPA attention alike. Models that
    mix sliding-window and full layers take a dict keyed by layer type; models whose every layer slides
    get the window in the single mask. A batch passes ``allowed [batch, queries, slots]`` with positions
    ``[batch, queries]`` and ``[batch, slots]`` and gets ``[batch, 1, queries, slots]`` masks.
    """
    text_config = config.get_text_config()
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    minimum = torch.finfo(dtype).min

    def additive(visible: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=dtype, device=visible.device)
        additive_mask = torch.where(visible, zero, torch.full_like(zero, minimum)).unsqueeze(-3)
        return additive_mask if additive_mask.dim() == 4 else additive_mask[None]

    def windowed() -> torch.Tensor:
        distance = query_positions[..., :, None] - key_positions[..., None, :]
        return allowed & (distance < window)

    if layer_types is not None and "sliding_attention" in layer_types and window:
        return {"full_attention": additive(allowed), "sliding_attention": additive(windowed())}
    if layer_types is None and window and getattr(text_config, "use_sliding_window", True) is not False:
        return additive(windowed())
    return additive(allowed)


def chunk_visibility(length: torch.Tensor, num_queries: int, max_length: int) -> tuple[torch.Tensor, ...]:
    """Causal visibility for ``num_queries`` consecutive tokens written at slot ``length`` on.

    Returns ``(allowed [queries, slots], query_positions, key_positions)``.
    """
    device = length.device
    slots = torch.arange(max_length, device=device)
    query_positions = length + torch.arange(num_queries, device=device)
    allowed = slots[None, :] <= query_positions[:, None]
    return allowed, query_positions, slots


def tree_visibility(
    length: torch.Tensor, tree_mask: torch.Tensor, depths: torch.Tensor, max_length: int
) -> tuple[torch.Tensor, ...]:
    """Tree visibility: every node sees the committed slots and its own ancestors (tree slots from ``length``).

    Returns ``(allowed [nodes, slots], query_positions, key_positions)``; positions are depth-based.
    """
    device = length.device
    size = tree_mask.shape[0]
    slots = torch.arange(max_length, device=device)
    relative = slots - length
    in_tree = (relative >= 0) & (relative < size)
    tree_part = tree_mask[:, relative.clamp(0, size - 1)] & in_tree[None, :]
    allowed = (slots < length)[None, :] | tree_part
    query_positions = length + depths
    key_positions = torch.where(in_tree, length + depths[relative.clamp(0, size - 1)], slots)
    return allowed, query_positions, key_positions
