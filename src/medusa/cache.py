"""A preallocated KV cache for a whole generation, and the attention masks that address it.

Every layer is a transformers ``StaticLayer`` of ``max_length`` slots per row: row b's committed tokens sit
in slots ``[0, length_b)``, a step writes its tree's K/V at ``[length_b, length_b + size)``, then ``commit``
moves the accepted path's entries into place. Rows are independent (each has its own length), so rows join
and leave a running batch without moving the others. Slots past a row's committed length are never read:
the masks built here hide them. Lengths live on the device so a step can be captured as a CUDA graph.

A decoder's cache keeps every layer's K/V in one store ``[layers, 2, batch, kv_heads, slots, head_dim]``
when the layers' shapes agree, so that ``commit`` is one gather and one scatter for the whole model
instead of four small kernels per layer: on the H100, dropping those made a 135M model's tree step
9-10% cheaper (docs/benchmarks/h100-one-store).
"""

from __future__ import annotations

import functools
import inspect
import math

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


class RowLayer(StaticLayer):
    """A ``StaticLayer`` that writes each row at its own length (``write_at [rows]``, shared by the cache's
    layers), and whose buffers are views of the cache's ``KVStore`` where the shapes allow."""

    def __init__(self, max_cache_len: int, write_at: RowLengths, store: KVStore | None, index: int) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.write_at = write_at
        self.store = store
        self.index = index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        views = self.store.claim(self.index, self.keys, self.values) if self.store is not None else None
        if views is not None:
            self.keys, self.values = views  # the layer's own zeros are freed
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.keys)
                torch._dynamo.mark_static_address(self.values)
        self.full_keys, self.full_values = self.keys, self.values  # contiguous [rows, kv_heads, slots, dim]

    def share(self, whole: RowLayer) -> None:
        """Take ``whole``'s state (its full buffers, dtype, device) for a view of it; the view then sets its own
        ``keys``/``values``, and keeps its own slot count, write lengths and store."""
        keep = ("keys", "values", "max_cache_len", "write_at", "store")
        self.__dict__.update({k: v for k, v in vars(whole).items() if k not in keep})

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``key_states [rows, kv_heads, n, dim]`` at slots ``write_at[row] + [0, n)`` of each row.

        One ``index_copy_`` per buffer over its (row, head, slot) vectors, as a single sequence's cache would do:
        a 4-D scatter cost twice as much per layer on the H100. The index is shared by every layer of a step.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # A view's buffers are the first rows and slots of the whole cache's: write into the whole ones.
        index = self.write_at.flat_index(key_states.shape[:3], self.full_keys)
        for buffer, states in ((self.full_keys, key_states), (self.full_values, value_states)):
            buffer.view(-1, buffer.shape[-1]).index_copy_(
                0, index, states.reshape(-1, states.shape[-1]).to(buffer.dtype)
            )
        return self.keys, self.values


class RowLengths:
    """The tensor ``[rows]`` of each row's committed length, shared by every layer of a cache (and its views)."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value
        self._index: dict[tuple, torch.Tensor] = {}

    def begin(self) -> None:
        """A new forward pass: the write index is computed again (the lengths have moved)."""
        self._index.clear()

    def flat_index(self, shape: torch.Size, buffer: torch.Tensor) -> torch.Tensor:
        """``[rows * heads * n]``: where each written (row, head, position) vector goes in ``buffer`` seen as
        ``[rows * heads * slots, dim]``; computed once per forward pass for each buffer shape and device."""
        rows, heads, count = shape
        key = (rows, heads, count, buffer.shape[2], buffer.device)
        if key not in self._index:
            device = buffer.device
            slots = self.value.to(device)[:, None] + torch.arange(count, device=device)  # [rows, n]
            base = (
                torch.arange(rows, device=device)[:, None] * heads + torch.arange(heads, device=device)
            ) * buffer.shape[2]
            self._index[key] = (base[:, :, None] + slots[:, None, :]).flatten()
        return self._index[key]


class MedusaCache(Cache):
    """Static K/V buffers ``[rows, kv_heads, max_length, head_dim]`` per layer, full length on every layer;
    row b writes at its own length ``lengths[b]``.

    Sliding-window layers get full-length buffers too: the window is applied by the mask, which keeps
    slot i at position i and makes compaction a plain copy. ``one_store``: keep the layers' buffers in
    one ``KVStore`` (see the module's docstring). ``lengths [rows]`` is the tensor the layers write at,
    updated in place by the decoder.
    """

    def __init__(self, num_layers: int, max_length: int, lengths: torch.Tensor, one_store: bool = False) -> None:
        self.store = KVStore(num_layers) if one_store else None
        self.lengths = RowLengths(lengths)
        layers = [RowLayer(max_length, self.lengths, self.store, index) for index in range(num_layers)]
        super().__init__(layers=layers)
        self.max_length = max_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Rows differ in length; a model asking one number (to place its own positions, which we pass) gets 0."""
        return 0

    def view(self, rows: int, span: int) -> MedusaCache:
        """A cache over the first ``rows`` rows and ``span`` slots of this one: views of the same buffers.

        A step over a smaller batch bucket, whose trees end before slot ``span``, attends through it and reads
        only those slots; what it writes lands in this cache's buffers. The buffers must exist (the first
        prefill allocates them).
        """
        if not 0 < span <= self.max_length:
            raise ValueError(f"a view of {span} slots does not fit a cache of {self.max_length}")
        self._check_buffers()
        view = MedusaCache(len(self.layers), span, self.lengths.value[:rows])
        for part, whole in zip(view.layers, self.layers):
            part.share(whole)
            part.keys = whole.keys[:rows, :, :span]
            part.values = whole.values[:rows, :, :span]
        # Commits through the view move every layer's K/V in the whole store at once (slots past the span are
        # never addressed: a row's path lies inside its tree); without it each layer would take four kernels.
        view.store = self.store
        return view

    def packed_view(self, rows: int, span: int, lengths: torch.Tensor) -> MedusaCache:
        """A cache of ``rows`` rows of ``span`` slots over the first ``rows * span`` slots' worth of this one's
        buffers, laid out contiguously: each layer's K/V ``[rows, kv_heads, span, head_dim]``, what it writes landing
        in this cache's buffers. ``lengths [rows]`` is where its rows write (a fixed buffer where it is captured).

        A prefill of few wide prompts or many narrow ones runs in one kept cache of a fixed number of token slots
        this way. Its store is not shared (its layout is not the store's), so it takes no ``commit``.
        """
        self._check_buffers()
        held = self.layers[0].keys.shape[0] * self.max_length
        if not 0 < rows * span <= held:
            raise ValueError(f"{rows} rows of {span} slots do not fit a cache of {held} token slots")
        view = MedusaCache(len(self.layers), span, lengths)
        for part, whole in zip(view.layers, self.layers):
            part.share(whole)
            for name in ("keys", "values"):
                buffer = getattr(whole, name)
                shape = (rows, buffer.shape[1], span, buffer.shape[3])
                setattr(part, name, buffer.view(-1)[: math.prod(shape)].view(shape))  # the buffer's own storage
            part.batch_size = rows
            part.full_keys, part.full_values = part.keys, part.values  # ``update`` writes at indices into these
        return view

    def _check_buffers(self) -> None:
        if not all(layer.is_initialized for layer in self.layers):
            raise ValueError("the cache has no buffers yet: run the prefill first")

    def commit(self, source_slots: torch.Tensor) -> None:
        """Copy each row's K/V at ``source_slots [rows, depth + 1]`` to the slots from its length on.

        The copy has a static shape (the tree's depth + 1); entries past a row's accepted length land
        beyond its committed length, where nothing reads them.
        """
        rows, count = source_slots.shape
        lengths = self.lengths.value
        targets = lengths[:, None] + torch.arange(count, device=lengths.device)  # [rows, depth + 1]
        stored = set()
        if self.store is not None and self.store.buffer is not None and self.store.members:
            buffer, stored = self.store.buffer, self.store.members  # [layers, 2, rows, kv_heads, slots, dim]
            shape = (buffer.shape[0], 2, rows, buffer.shape[3], count, buffer.shape[5])
            source = source_slots.to(buffer.device)[None, None, :, None, :, None].expand(shape)
            target = targets.to(buffer.device)[None, None, :, None, :, None].expand(shape)
            rows_of = buffer[:, :, :rows]
            rows_of.scatter_(4, target, rows_of.gather(4, source))
        for index, layer in enumerate(self.layers):
            if index in stored:
                continue
            # Each layer's buffers sit on that layer's device when the base model is split over devices.
            for buffer in (layer.keys, layer.values):
                shape = (rows, buffer.shape[1], count, buffer.shape[3])
                source = source_slots.to(buffer.device)[:, None, :, None].expand(shape)
                target = targets.to(buffer.device)[:, None, :, None].expand(shape)
                part = buffer[:rows]
                part.scatter_(2, target, part.gather(2, source))

    def copy_rows(self, source: MedusaCache, rows: torch.Tensor, slots: int) -> None:
        """Put ``source``'s rows (a prefill's cache) into rows ``rows`` of this cache, slots ``[0, slots)``."""
        for mine, theirs in zip(self.layers, source.layers):
            if not mine.is_initialized:
                mine.lazy_initialization(
                    theirs.keys.new_empty((self.lengths.value.shape[0], *theirs.keys.shape[1:])),
                    theirs.values.new_empty((self.lengths.value.shape[0], *theirs.values.shape[1:])),
                )
            here = rows.to(mine.keys.device)
            mine.keys[:, :, :slots].index_copy_(0, here, theirs.keys[:, :, :slots])
            mine.values[:, :, :slots].index_copy_(0, here, theirs.values[:, :, :slots])

    def move_rows(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """Copy whole rows ``sources`` to rows ``targets`` (compacting a batch after rows leave)."""
        for layer in self.layers:
            if layer.is_initialized:
                for buffer in (layer.keys, layer.values):
                    buffer.index_copy_(0, targets.to(buffer.device), buffer.index_select(0, sources.to(buffer.device)))


def cache_keyword(model: torch.nn.Module) -> str:
    """The name under which ``model``'s forward takes a cache object: ``cache`` from transformers 5.25 on
    (where ``past_key_values`` warns on every call), ``past_key_values`` before. Read from the forward's
    signature, not the version, so models that follow either convention work; a peft wrapper's is its base's."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_keyword_of(type(target))


@functools.cache
def _cache_keyword_of(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def kv_bytes_per_row(config: PretrainedConfig, slots: int, dtype: torch.dtype) -> int:
    """Bytes of K and V that one row of ``slots`` takes in every layer: what each running request's cache
    costs, for sizing a running batch against the device's memory."""
    text = config.get_text_config()
    query_heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or query_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // query_heads
    return 2 * num_cache_layers(config) * kv_heads * head_dim * slots * dtype.itemsize


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


def chunk_visibility(starts: torch.Tensor, num_queries: int, max_length: int) -> tuple[torch.Tensor, ...]:
    """Causal visibility for ``num_queries`` consecutive tokens per row, written from slot ``starts[row]`` on.

    ``starts [rows]`` -> ``(allowed [rows, queries, slots], query_positions [rows, queries], key_positions
    [rows, slots])``: slot i holds position i.
    """
    device = starts.device
    slots = torch.arange(max_length, device=device)
    query_positions = starts[:, None] + torch.arange(num_queries, device=device)  # [rows, queries]
    allowed = slots[None, None, :] <= query_positions[:, :, None]
    return allowed, query_positions, slots.expand(starts.shape[0], -1)


def tree_visibility(
    lengths: torch.Tensor, tree_mask: torch.Tensor, depths: torch.Tensor, max_length: int
) -> tuple[torch.Tensor, ...]:
    """Tree visibility per row: every node sees the row's committed slots and its own ancestors (tree slots from
    ``lengths[row]`` on).

    ``lengths [rows]`` -> ``(allowed [rows, nodes, slots], query_positions [rows, nodes], key_positions
    [rows, slots])``; positions are depth-based.
    """
    device = lengths.device
    size = tree_mask.shape[0]
    slots = torch.arange(max_length, device=device)
    relative = slots[None, :] - lengths[:, None]  # [rows, slots]
    in_tree = (relative >= 0) & (relative < size)
    node = relative.clamp(0, size - 1)
    tree_part = tree_mask[:, node].permute(1, 0, 2) & in_tree[:, None, :]  # [rows, nodes, slots]
    allowed = (relative < 0)[:, None, :] | tree_part
    query_positions = lengths[:, None] + depths[None, :]
    key_positions = torch.where(in_tree, lengths[:, None] + depths[node], slots[None, :])
    return allowed, query_positions, key_positions
