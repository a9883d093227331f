"""The static cache's path compaction, and the visibility masks that address its slots."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

from medusa.cache import (
    MedusaCache,
    attention_mask_for,
    cache_keyword,
    chunk_visibility,
    tree_visibility,
)
from medusa.tree import Tree

T, F = True, False


def filled_cache(
    num_layers: int = 2, max_length: int = 10, one_store: bool = False, heads: tuple[int, ...] = (), rows: int = 1
) -> MedusaCache:
    """A cache whose slot i holds keys i and values -i (per layer offset by 100 * layer, per row by 1000 * row);
    layer l has ``heads[l]`` K/V heads (2 by default)."""
    cache = MedusaCache(num_layers, max_length, torch.zeros(rows, dtype=torch.long), one_store=one_store)
    for index, layer in enumerate(cache.layers):
        slots = torch.arange(max_length, dtype=torch.float32) + 100 * index
        width = heads[index] if heads else 2
        keys = torch.stack(
            [(slots + 1000 * row).view(1, max_length, 1).expand(width, max_length, 3) for row in range(rows)]
        )
        layer.update(keys, -keys)
    return cache


def slot_values(cache: MedusaCache, layer: int = 0, row: int = 0) -> list[float]:
    return [value - 1000 * row for value in cache.layers[layer].keys[row, 0, :, 0].tolist()]


def test_each_row_writes_after_its_own_length():
    cache = filled_cache(num_layers=1, rows=2)
    cache.lengths.value.copy_(torch.tensor([4, 7]))
    cache.layers[0].update(torch.full((2, 2, 2, 3), 42.0), torch.full((2, 2, 2, 3), -42.0))
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [0, 1, 2, 3, 42, 42, 6, 7, 8, 9]
    assert cache.layers[0].keys[1, 1, :, 2].tolist() == [1000, 1001, 1002, 1003, 1004, 1005, 1006, 42, 42, 1009]
    assert cache.layers[0].values[1, 0, 7, 0].item() == -42.0
    assert cache.get_seq_length() == 0  # rows differ: the model is given positions instead


@pytest.mark.parametrize("one_store", [False, True])
def test_commit_moves_each_rows_accepted_path_into_place_on_every_layer(one_store):
    cache = filled_cache(one_store=one_store, rows=2)
    # Row 0: committed length 4, the tree at slots 4..9, accepted nodes 0, 2, 5.
    # Row 1: committed length 2, the tree at slots 2..7, accepted nodes 0, 1, 3 (the rest: padding, ignored).
    cache.lengths.value.copy_(torch.tensor([4, 2]))
    cache.commit(torch.tensor([[4, 6, 9], [2, 3, 5]]))
    assert slot_values(cache, 0) == [0, 1, 2, 3, 4, 6, 9, 7, 8, 9]
    assert slot_values(cache, 1) == [100, 101, 102, 103, 104, 106, 109, 107, 108, 109]
    assert slot_values(cache, 0, row=1) == [0, 1, 2, 3, 5, 5, 6, 7, 8, 9]
    assert cache.layers[1].values[0, 1, :, 2].tolist() == [-v for v in slot_values(cache, 1)]


@pytest.mark.parametrize("one_store", [False, True])
def test_commit_reads_every_source_before_writing(one_store):
    cache = filled_cache(num_layers=1, one_store=one_store)
    # Target 5 is also a source: it must get slot 5's old value moved to slot 4 ... and slot 8 to 5.
    cache.lengths.value.fill_(4)
    cache.commit(torch.tensor([[5, 8, 6]]))
    assert slot_values(cache) == [0, 1, 2, 3, 5, 8, 6, 7, 8, 9]


def test_one_store_holds_every_layer_and_layer_writes_land_in_it():
    cache = filled_cache(num_layers=3, one_store=True)
    store = cache.store.buffer
    assert store.shape == (3, 2, 1, 2, 10, 3) and cache.store.members == {0, 1, 2}
    assert store[2, 0, 0, 1, :, 0].tolist() == slot_values(cache, 2)
    assert store[1, 1, 0, 0, 4, 2].item() == -104.0
    cache.lengths.value.fill_(5)
    cache.layers[1].update(torch.full((1, 2, 1, 3), 9.0), torch.full((1, 2, 1, 3), -9.0))
    assert store[1, 0, 0, 0, 5, 0].item() == 9.0 and store[1, 1, 0, 1, 5, 1].item() == -9.0


def test_a_layer_of_another_shape_keeps_its_own_buffers_and_still_commits():
    cache = filled_cache(num_layers=3, one_store=True, heads=(2, 4, 2))
    assert cache.store.members == {0, 2}
    assert cache.layers[1].keys.shape == (1, 4, 10, 3)
    cache.lengths.value.fill_(4)
    cache.commit(torch.tensor([[4, 6, 9]]))
    for layer in range(3):
        base = 100 * layer
        assert slot_values(cache, layer) == [base + slot for slot in (0, 1, 2, 3, 4, 6, 9, 7, 8, 9)]
    assert cache.layers[1].values[0, 3, :, 0].tolist() == [-v for v in slot_values(cache, 1)]


@pytest.mark.parametrize("one_store", [False, True])
def test_a_view_sees_the_first_rows_and_slots_and_shares_writes_and_lengths(one_store):
    cache = filled_cache(num_layers=2, max_length=10, one_store=one_store, rows=3)
    cache.lengths.value.copy_(torch.tensor([3, 1, 5]))
    view = cache.view(2, 6)
    assert view.store is cache.store  # commits through the view move the whole store's K/V at once
    assert view.max_length == 6 and [layer.keys.shape[:3] for layer in view.layers] == [(2, 2, 6)] * 2
    assert slot_values(view, 1) == [100, 101, 102, 103, 104, 105]
    # a write through the view lands in the whole cache, after each row's shared committed length
    view.layers[1].update(torch.full((2, 2, 2, 3), 7.0), torch.full((2, 2, 2, 3), -7.0))
    assert slot_values(cache, 1) == [100, 101, 102, 7, 7, 105, 106, 107, 108, 109]
    assert cache.layers[1].keys[1, 0, :4, 0].tolist() == [1100, 7, 7, 1103]
    assert slot_values(cache, 1, row=2) == [100 + slot for slot in range(10)]  # outside the view: untouched
    cache.lengths.value[0] = 2
    assert view.lengths.value.tolist() == [2, 1]
    view.commit(torch.tensor([[3, 4], [1, 2]]))  # commits move within the rows of the view
    assert slot_values(cache, 1)[2:5] == [7, 7, 7]


def test_a_view_needs_buffers_and_must_fit():
    with pytest.raises(ValueError, match="run the prefill first"):
        MedusaCache(2, 10, torch.zeros(1, dtype=torch.long)).view(1, 5)
    for length in (0, 11):
        with pytest.raises(ValueError, match=f"a view of {length} slots does not fit a cache of 10"):
            filled_cache().view(1, length)


def test_rows_move_and_copy_in():
    cache = filled_cache(num_layers=2, rows=3, one_store=True)
    cache.move_rows(torch.tensor([2]), torch.tensor([0]))
    assert cache.layers[1].keys[0, 0, 3, 0].item() == 2103
    prefill = filled_cache(num_layers=2, max_length=4, rows=1)
    cache.copy_rows(prefill, torch.tensor([1]), 4)
    assert cache.layers[0].keys[1, 0, :6, 0].tolist() == [0, 1, 2, 3, 1004, 1005]


def test_chunk_visibility_is_causal_from_each_rows_start():
    allowed, queries, keys = chunk_visibility(torch.tensor([3, 0]), 2, 6)
    assert allowed[0].tolist() == [[T, T, T, T, F, F], [T, T, T, T, T, F]]
    assert allowed[1].tolist() == [[T, F, F, F, F, F], [T, T, F, F, F, F]]
    assert queries.tolist() == [[3, 4], [0, 1]]
    assert keys.tolist() == [[0, 1, 2, 3, 4, 5]] * 2


def test_tree_visibility_sees_each_rows_committed_slots_and_ancestors():
    tree = Tree.from_paths([[0], [1], [0, 0]])  # nodes: root, [0], [1], [0, 0]
    allowed, queries, keys = tree_visibility(torch.tensor([2, 3]), tree.attention_mask, tree.depths, 8)
    assert allowed[0].tolist() == [
        # committed | root  [0]  [1] [0,0] | unused
        [T, T, T, F, F, F, F, F],
        [T, T, T, T, F, F, F, F],
        [T, T, T, F, T, F, F, F],
        [T, T, T, T, F, T, F, F],
    ]
    assert allowed[1, 3].tolist() == [T, T, T, T, T, F, T, F]
    assert queries.tolist() == [[2, 3, 3, 4], [3, 4, 4, 5]]  # positions follow depth, not slot
    assert keys[0].tolist() == [0, 1, 2, 3, 3, 4, 6, 7]
    assert keys[1].tolist() == [0, 1, 2, 3, 4, 4, 5, 7]


def additive_to_bool(mask: torch.Tensor) -> list[list[bool]]:
    assert mask.shape[:2] == (1, 1)  # [rows, 1, queries, slots]
    return (mask[0, 0] == 0).tolist()


def test_full_attention_mask_is_additive():
    allowed, queries, keys = chunk_visibility(torch.tensor([1]), 2, 4)
    mask = attention_mask_for(LlamaConfig(), allowed, queries, keys, torch.float32)
    assert mask.dtype == torch.float32
    assert additive_to_bool(mask) == allowed[0].tolist()
    assert mask.min() == torch.finfo(torch.float32).min
    half = attention_mask_for(LlamaConfig(), allowed, queries, keys, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.min() == torch.finfo(torch.bfloat16).min


def test_sliding_window_applies_to_positions():
    allowed, queries, keys = chunk_visibility(torch.tensor([4]), 1, 6)  # query at position 4
    mask = attention_mask_for(MistralConfig(sliding_window=2), allowed, queries, keys, torch.float32)
    assert additive_to_bool(mask) == [[F, F, F, T, T, F]]
    # The same tree node at depth 2 sits at position length + 2, whatever its slot.
    tree = Tree.from_paths([[0], [1], [0, 0]])
    allowed, queries, keys = tree_visibility(torch.tensor([4]), tree.attention_mask, tree.depths, 9)
    mask = attention_mask_for(MistralConfig(sliding_window=2), allowed, queries, keys, torch.float32)
    # node [0, 0] (slot 7, position 6) sees position 5 ([0], slot 5) and itself, not the root at 4
    assert additive_to_bool(mask)[3] == [F, F, F, F, F, T, F, T, F]


def test_models_without_a_window_ignore_it():
    allowed, queries, keys = chunk_visibility(torch.tensor([4]), 1, 6)
    for config in (Qwen2Config(sliding_window=2), MistralConfig(sliding_window=None)):
        mask = attention_mask_for(config, allowed, queries, keys, torch.float32)
        assert additive_to_bool(mask) == allowed[0].tolist()


def test_mixed_layers_get_one_mask_per_layer_type():
    allowed, queries, keys = chunk_visibility(torch.tensor([4]), 1, 6)
    configs = (
        Qwen2Config(num_hidden_layers=2, use_sliding_window=True, max_window_layers=1, sliding_window=2),
        Gemma2Config(num_hidden_layers=2, sliding_window=2),
    )
    for config in configs:
        masks = attention_mask_for(config, allowed, queries, keys, torch.float32)
        assert set(masks) == {"full_attention", "sliding_attention"}
        assert additive_to_bool(masks["full_attention"]) == [[T, T, T, T, T, F]]
        assert additive_to_bool(masks["sliding_attention"]) == [[F, F, F, T, T, F]]


# ----- handing the cache to the model --------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "gemma", "phi3"])
def test_decoding_passes_the_cache_the_way_the_installed_transformers_expects(architecture):
    """transformers 5.25 renamed ``past_key_values`` to ``cache`` and warns on every call with the old name;
    older 5.x know only ``past_key_values``. Single and batched decoding must not trip either."""
    from helpers.models import TINY_HIDDEN, TINY_VOCAB, make_tiny_model
    from medusa.heads import MedusaHeads, MedusaHeadsConfig
    from medusa.model import MedusaModel

    base = make_tiny_model(architecture)
    heads = MedusaHeads(
        MedusaHeadsConfig(hidden_size=TINY_HIDDEN, vocab_size=TINY_VOCAB, num_heads=2),
        base_lm_head=base.get_output_embeddings(),
    )
    model = MedusaModel(base, None, heads, tree="8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        single = model.generate([5, 6, 7], max_new_tokens=6, chat_template=False)
        batch = model.generate([[5, 6, 7], [9, 8]], max_new_tokens=6, chat_template=False)
    assert len(single.token_ids) == 6 and batch[0].token_ids == single.token_ids
    assert [str(w.message) for w in caught if "past_key_values" in str(w.message) or "cache" in str(w.message)] == []


def test_the_cache_keyword_follows_the_forward_signature():
    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return past_key_values

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
            return cache

    assert cache_keyword(Old()) == "past_key_values"
    assert cache_keyword(New()) == "cache"


def test_kv_bytes_per_row_is_what_an_engine_allocates_per_row():
    from helpers.models import make_tiny_model
    from medusa.cache import kv_bytes_per_row
    from medusa.model import GenerationConfig, MedusaModel

    for architecture in ("llama", "qwen2", "gemma"):
        model = MedusaModel.from_pretrained(make_tiny_model(architecture), tree="8")
        engine = model.engine(max_rows=4, max_length=300, keep=False)
        for _ in engine.run([model.prepare([5, 6, 7], GenerationConfig(max_new_tokens=2, chat_template=False))]):
            pass  # the buffers exist from the first prefill on
        layers = engine.decoder.cache.layers
        allocated = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
        expected = engine.decoder.max_rows * kv_bytes_per_row(
            model.base_model.config, engine.decoder.max_length, model.base_model.dtype
        )
        assert allocated == expected, architecture
