"""The static cache's path compaction, and the visibility masks that address its slots."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

from medusa.cache import MedusaCache, attention_mask_for, chunk_visibility, tree_visibility
from medusa.tree import Tree

T, F = True, False


def filled_cache(num_layers: int = 2, max_length: int = 10, one_store: bool = False, heads: tuple[int, ...] = ()) -> MedusaCache:
    """A cache whose slot i holds keys i and values -i (per layer offset by 100 * layer); layer l has
    ``heads[l]`` K/V heads (2 by default)."""
    cache = MedusaCache(num_layers, max_length, one_store=one_store)
    cache.set_length(torch.tensor(0))
    for index, layer in enumerate(cache.layers):
        slots = torch.arange(max_length, dtype=torch.float32) + 100 * index
        width = heads[index] if heads else 2
        keys = slots.view(1, 1, max_length, 1).expand(1, width, max_length, 3).clone()
        layer.update(keys, -keys)
    return cache


def slot_values(cache: MedusaCache, layer: int = 0) -> list[float]:
    return cache.layers[layer].keys[0, 0, :, 0].tolist()


def test_update_writes_after_the_declared_length():
    cache = filled_cache(num_layers=1)
    cache.set_length(torch.tensor(4))
    cache.layers[0].update(torch.full((1, 2, 2, 3), 42.0), torch.full((1, 2, 2, 3), -42.0))
    assert slot_values(cache) == [0, 1, 2, 3, 42, 42, 6, 7, 8, 9]
    assert int(cache.layers[0].cumulative_length) == 6


@pytest.mark.parametrize("one_store", [False, True])
def test_commit_moves_the_accepted_path_into_place_on_every_layer(one_store):
    cache = filled_cache(one_store=one_store)
    # Committed length 4; the tree was written at slots 4..9; the accepted path is nodes 0, 2, 5.
    cache.commit(torch.tensor([4, 6, 9]), torch.tensor(4))
    assert slot_values(cache, 0) == [0, 1, 2, 3, 4, 6, 9, 7, 8, 9]
    assert slot_values(cache, 1) == [100, 101, 102, 103, 104, 106, 109, 107, 108, 109]
    assert cache.layers[1].values[0, 1, :, 2].tolist() == [-v for v in slot_values(cache, 1)]


@pytest.mark.parametrize("one_store", [False, True])
def test_commit_reads_every_source_before_writing(one_store):
    cache = filled_cache(num_layers=1, one_store=one_store)
    # Target 5 is also a source: it must get slot 5's old value moved to slot 4 ... and slot 8 to 5.
    cache.commit(torch.tensor([5, 8, 6]), torch.tensor(4))
    assert slot_values(cache) == [0, 1, 2, 3, 5, 8, 6, 7, 8, 9]


def test_one_store_holds_every_layer_and_layer_writes_land_in_it():
    cache = filled_cache(num_layers=3, one_store=True)
    store = cache.store.buffer
    assert store.shape == (3, 2, 1, 2, 10, 3) and cache.store.members == {0, 1, 2}
    assert store[2, 0, 0, 1, :, 0].tolist() == slot_values(cache, 2)
    assert store[1, 1, 0, 0, 4, 2].item() == -104.0
    cache.set_length(torch.tensor(5))
    cache.layers[1].update(torch.full((1, 2, 1, 3), 9.0), torch.full((1, 2, 1, 3), -9.0))
    assert store[1, 0, 0, 0, 5, 0].item() == 9.0 and store[1, 1, 0, 1, 5, 1].item() == -9.0


def test_a_layer_of_another_shape_keeps_its_own_buffers_and_still_commits():
    cache = filled_cache(num_layers=3, one_store=True, heads=(2, 4, 2))
    assert cache.store.members == {0, 2}
    assert cache.layers[1].keys.shape == (1, 4, 10, 3)
    cache.commit(torch.tensor([4, 6, 9]), torch.tensor(4))
    for layer in range(3):
        base = 100 * layer
        assert slot_values(cache, layer) == [base + slot for slot in (0, 1, 2, 3, 4, 6, 9, 7, 8, 9)]
    assert cache.layers[1].values[0, 3, :, 0].tolist() == [-v for v in slot_values(cache, 1)]


@pytest.mark.parametrize("one_store", [False, True])
def test_a_prefix_views_the_first_slots_and_shares_writes_and_lengths(one_store):
    cache = filled_cache(num_layers=2, max_length=10, one_store=one_store)
    cache.set_length(torch.tensor(3))
    prefix = cache.prefix(6)
    assert prefix.max_length == 6 and [layer.keys.shape[2] for layer in prefix.layers] == [6, 6]
    assert slot_values(prefix, 1) == [100, 101, 102, 103, 104, 105]
    # a write through the prefix lands in the whole cache, after the shared committed length
    prefix.layers[1].update(torch.full((1, 2, 2, 3), 7.0), torch.full((1, 2, 2, 3), -7.0))
    assert slot_values(cache, 1) == [100, 101, 102, 7, 7, 105, 106, 107, 108, 109]
    assert cache.layers[1].values[0, 0, 3:5, 0].tolist() == [-7.0, -7.0]
    cache.set_length(torch.tensor(2))
    assert [int(layer.cumulative_length) for layer in prefix.layers] == [2, 2]
    assert cache.prefix(10).max_length == 10


def test_a_prefix_needs_buffers_and_must_fit():
    with pytest.raises(ValueError, match="run the prefill first"):
        MedusaCache(2, 10).prefix(5)
    for length in (0, 11):
        with pytest.raises(ValueError, match=f"a prefix of {length} slots does not fit a cache of 10"):
            filled_cache().prefix(length)


def test_set_length_applies_to_all_layers():
    cache = filled_cache(num_layers=3)
    cache.set_length(torch.tensor(7))
    assert [int(layer.cumulative_length) for layer in cache.layers] == [7, 7, 7]


def test_chunk_visibility_is_causal_from_the_length():
    allowed, queries, keys = chunk_visibility(torch.tensor(3), 2, 6)
    assert allowed.tolist() == [[T, T, T, T, F, F], [T, T, T, T, T, F]]
    assert queries.tolist() == [3, 4]
    assert keys.tolist() == [0, 1, 2, 3, 4, 5]


def test_tree_visibility_sees_committed_slots_and_ancestors():
    tree = Tree.from_paths([[0], [1], [0, 0]])  # nodes: root, [0], [1], [0, 0]
    allowed, queries, keys = tree_visibility(torch.tensor(2), tree.attention_mask, tree.depths, 8)
    assert allowed.tolist() == [
        # committed | root  [0]  [1] [0,0] | unused
        [T, T, T, F, F, F, F, F],
        [T, T, T, T, F, F, F, F],
        [T, T, T, F, T, F, F, F],
        [T, T, T, T, F, T, F, F],
    ]
    assert queries.tolist() == [2, 3, 3, 4]  # positions follow depth, not slot
    assert keys.tolist() == [0, 1, 2, 3, 3, 4, 6, 7]


def additive_to_bool(mask: torch.Tensor) -> list[list[bool]]:
    assert mask.shape[:2] == (1, 1)
    return (mask[0, 0] == 0).tolist()


def test_full_attention_mask_is_additive():
    allowed, queries, keys = chunk_visibility(torch.tensor(1), 2, 4)
    mask = attention_mask_for(LlamaConfig(), allowed, queries, keys, torch.float32)
    assert mask.dtype == torch.float32
    assert additive_to_bool(mask) == allowed.tolist()
    assert mask.min() == torch.finfo(torch.float32).min
    half = attention_mask_for(LlamaConfig(), allowed, queries, keys, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.min() == torch.finfo(torch.bfloat16).min


def test_sliding_window_applies_to_positions():
    allowed, queries, keys = chunk_visibility(torch.tensor(4), 1, 6)  # query at position 4
    mask = attention_mask_for(MistralConfig(sliding_window=2), allowed, queries, keys, torch.float32)
    assert additive_to_bool(mask) == [[F, F, F, T, T, F]]
    # The same tree node at depth 2 sits at position length + 2, whatever its slot.
    tree = Tree.from_paths([[0], [1], [0, 0]])
    allowed, queries, keys = tree_visibility(torch.tensor(4), tree.attention_mask, tree.depths, 9)
    mask = attention_mask_for(MistralConfig(sliding_window=2), allowed, queries, keys, torch.float32)
    # node [0, 0] (slot 7, position 6) sees position 5 ([0], slot 5) and itself, not the root at 4
    assert additive_to_bool(mask)[3] == [F, F, F, F, F, T, F, T, F]


def test_models_without_a_window_ignore_it():
    allowed, queries, keys = chunk_visibility(torch.tensor(4), 1, 6)
    for config in (Qwen2Config(sliding_window=2), MistralConfig(sliding_window=None)):
        mask = attention_mask_for(config, allowed, queries, keys, torch.float32)
        assert additive_to_bool(mask) == allowed.tolist()


def test_mixed_layers_get_one_mask_per_layer_type():
    allowed, queries, keys = chunk_visibility(torch.tensor(4), 1, 6)
    configs = (
        Qwen2Config(num_hidden_layers=2, use_sliding_window=True, max_window_layers=1, sliding_window=2),
        Gemma2Config(num_hidden_layers=2, sliding_window=2),
    )
    for config in configs:
        masks = attention_mask_for(config, allowed, queries, keys, torch.float32)
        assert set(masks) == {"full_attention", "sliding_attention"}
        assert additive_to_bool(masks["full_attention"]) == [[T, T, T, T, T, F]]
        assert additive_to_bool(masks["sliding_attention"]) == [[F, F, F, T, T, F]]
