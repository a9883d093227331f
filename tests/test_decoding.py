"""Greedy Medusa decoding is lossless: token for token the base model's own ``generate(do_sample=False)``.

The oracle (``helpers.decoding``) makes long paths get accepted, so the cache compaction is exercised too.
"""

from __future__ import annotations

import pytest
import torch

from helpers.decoding import CUSTOM_TREE, PROMPTS, architecture_of, oracle_run, plain_greedy, random_prompts, reference
from helpers.models import ARCHITECTURES, EOS_ID, TINY_VOCAB, make_tiny_model
from medusa.decoding import attention_spans
from medusa.engine import EngineOptions
from medusa.heads import MedusaHeads, MedusaHeadsConfig
from medusa.model import GenerationConfig, MedusaModel
from medusa.tree import Tree, default_tree

NEW_TOKENS = 32
TREES = {"8": "8", "16": "16", "64": "64", "custom": CUSTOM_TREE}


def perturb(heads: MedusaHeads, seed: int, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.add_(scale * parameter.abs().mean() * torch.randn(parameter.shape, generator=generator))
            if parameter.abs().sum() == 0:  # zero-initialised blocks: give them a random start
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


# ----- random prompts, trees and head settings ----------------------------------------------------


@pytest.mark.parametrize("tree", list(TREES.values()), ids=list(TREES))
def test_lossless_over_trees(tiny_model, tree):
    architecture = architecture_of(tiny_model)
    model = MedusaModel.from_pretrained(tiny_model, tree=tree)
    accepted = []
    for prompt in PROMPTS:
        result = model.generate(prompt, max_new_tokens=NEW_TOKENS)
        assert result.token_ids == list(reference(architecture, tuple(prompt), NEW_TOKENS)), prompt
        accepted += result.stats.accepted_per_step
    assert sum(accepted) >= len(PROMPTS) * NEW_TOKENS  # every step commits at least the base model's own token


HEAD_SETTINGS = {
    "no-blocks": dict(num_layers=0),
    "two-blocks": dict(num_layers=2),
    "shared-lm-head": dict(num_layers=1, share_lm_head=True),
    "perturbed": dict(num_layers=1, perturb=True),
    "perturbed-shared-5-heads": dict(num_layers=2, share_lm_head=True, num_heads=5, perturb=True),
    "sequential": dict(num_layers=1, head_type="sequential"),
    "sequential-perturbed-shared": dict(num_layers=2, share_lm_head=True, head_type="sequential", perturb=True),
}


@pytest.mark.parametrize("settings", list(HEAD_SETTINGS.values()), ids=list(HEAD_SETTINGS))
def test_lossless_over_head_settings(tiny_model, settings):
    architecture = architecture_of(tiny_model)
    settings = dict(settings)
    scramble = settings.pop("perturb", False)
    model = MedusaModel.from_pretrained(tiny_model, tree="64", **settings)
    if scramble:
        perturb(model.heads, seed=7)
        probe = torch.randn(tiny_model.config.hidden_size)
        with torch.no_grad():
            path = torch.zeros(model.heads.config.num_heads, dtype=torch.long)
            assert not torch.equal(model.heads(probe, path)[0], tiny_model.get_output_embeddings()(probe))
    for prompt in PROMPTS:
        result = model.generate(prompt, max_new_tokens=NEW_TOKENS)
        assert result.token_ids == list(reference(architecture, tuple(prompt), NEW_TOKENS)), prompt
        assert result.finish_reason == ("stop" if EOS_ID in result.token_ids else "length")


def test_plain_decoding_without_heads(tiny_model):
    architecture = architecture_of(tiny_model)
    model = MedusaModel.from_pretrained(tiny_model, tree="64")
    for prompt in PROMPTS:
        result = model.generate(
            prompt, GenerationConfig(max_new_tokens=NEW_TOKENS), options=EngineOptions(use_heads=False)
        )
        assert result.token_ids == list(reference(architecture, tuple(prompt), NEW_TOKENS))
        assert result.stats.accepted_per_step == [1] * len(result.token_ids)
        assert result.stats.steps == result.stats.new_tokens == len(result.token_ids)


@pytest.mark.parametrize("position", [0, 3, 12])
def test_generation_stops_at_eos(tiny_model, position):
    """Make the token at ``position`` of the greedy answer the EOS token: both decoders stop right after it."""
    model = MedusaModel.from_pretrained(tiny_model, tree="64")
    prompt = PROMPTS[position % len(PROMPTS)]
    unbounded = list(reference(architecture_of(tiny_model), tuple(prompt), NEW_TOKENS))
    stop_token = unbounded[position]
    position = unbounded.index(stop_token)  # its first occurrence
    tiny_model.generation_config.eos_token_id = stop_token
    expected = plain_greedy(tiny_model, prompt, NEW_TOKENS)
    assert expected == unbounded[: position + 1]
    result = model.generate(prompt, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == expected
    assert result.finish_reason == "stop"


# ----- the oracle: proposals that get accepted ----------------------------------------------------


def test_oracle_accepts_long_paths_and_stays_lossless(tiny_model):
    architecture = architecture_of(tiny_model)
    for prompt in random_prompts(3, seed=21):
        continuation = list(reference(architecture, tuple(prompt), 46))
        tokens, stats, engine = oracle_run(
            tiny_model, default_tree(64), prompt, 40, eos={EOS_ID}, continuation=continuation
        )
        assert tokens == continuation[:40]
        if EOS_ID in tokens:
            continue
        assert stats.mean_accepted > 2, stats.accepted_per_step
        assert max(stats.accepted_per_step) == 5  # depth-4 paths: the root and four guesses
        # Most accepted paths are not the all-zero first branch, so their K/V had to move.
        targets = engine.decoder.targets
        assert sum(any(target) for target in targets) > len(targets) / 2


def test_oracle_on_a_five_deep_custom_tree(tiny_model):
    architecture = architecture_of(tiny_model)
    tree = Tree.from_paths([[0], [1], [2], [1, 0], [1, 2], [2, 1], [1, 2, 0], [1, 2, 0, 1], [2, 1, 1], [1, 2, 0, 1, 2]])
    prompt = random_prompts(1, seed=4)[0]
    continuation = list(reference(architecture, tuple(prompt), 47))
    tokens, stats, _ = oracle_run(tiny_model, tree, prompt, 40, eos={EOS_ID}, num_heads=5, continuation=continuation)
    assert tokens == continuation[:40]
    if EOS_ID not in tokens:
        assert 6 in stats.accepted_per_step
        assert stats.mean_accepted > 2


def test_oracle_hits_max_new_tokens_mid_path():
    base = make_tiny_model("llama")
    prompt = random_prompts(1, seed=3)[0]
    continuation = plain_greedy(base, prompt, 26)
    expected = continuation[:20]
    assert EOS_ID not in expected
    cut_mid_path = 0
    for max_new_tokens in range(1, 15):
        tokens, stats, _ = oracle_run(
            base, default_tree(32), prompt, max_new_tokens, eos={EOS_ID}, continuation=continuation
        )
        assert tokens == expected[:max_new_tokens]
        assert stats.new_tokens == max_new_tokens and stats.finish_reason == "length"
        cut_mid_path += sum(stats.accepted_per_step) > max_new_tokens
    assert cut_mid_path >= 4


def test_oracle_stops_at_eos_inside_an_accepted_path():
    base = make_tiny_model("qwen2")
    prompt = random_prompts(1, seed=8)[0]
    unbounded = plain_greedy(base, prompt, 36)
    inside = 0
    for position in range(1, 30, 3):
        stop_token = unbounded[position]
        first = unbounded.index(stop_token)
        tokens, stats, _ = oracle_run(base, default_tree(64), prompt, 30, eos={stop_token}, continuation=unbounded)
        assert tokens == unbounded[: first + 1]
        assert stats.finish_reason == "stop"
        inside += stats.accepted_per_step[-1] > 1 and sum(stats.accepted_per_step) > len(tokens)
    assert inside >= 3  # EOS was mid-path, and the tokens after it were dropped


def test_compacted_cache_equals_a_fresh_prefill(tiny_model):
    """After decoding with long accepted paths, the committed K/V are those of the plain sequence."""
    prompt = random_prompts(1, seed=13)[0]
    continuation = list(reference(architecture_of(tiny_model), tuple(prompt), 36))
    tokens, stats, engine = oracle_run(tiny_model, default_tree(64), prompt, 30, eos=set(), continuation=continuation)
    assert stats.mean_accepted > 2
    cache = engine.decoder.cache
    # every layer's K/V sit in the one store, so each commit moved them with one gather and one scatter
    assert cache.store.members == set(range(len(cache.layers)))
    committed = len(prompt) + sum(stats.accepted_per_step)  # the last step may commit past the tokens returned
    sequence = torch.tensor([prompt + continuation])[:, :committed]
    with torch.no_grad():
        fresh = tiny_model(sequence, use_cache=True).past_key_values
    for layer, fresh_layer in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(layer.keys[:1, :, :committed], fresh_layer.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.values[:1, :, :committed], fresh_layer.values, rtol=1e-4, atol=1e-5)


# ----- attention spans: a step attends over the cache's first slots only ---------------------------


def test_attention_spans_and_the_span_a_step_takes():
    assert attention_spans(1000, 70, 256) == (256, 512, 768, 1000)
    assert attention_spans(1000, 300, 256) == (512, 768, 1000)
    assert attention_spans(1000, 70, None) == (1000,)
    assert attention_spans(200, 70, 256) == (200,)
    base = make_tiny_model("llama")
    model = MedusaModel.from_pretrained(base, tree="16")
    engine = model.engine(EngineOptions(attention_span_step=16), max_length=100)
    assert engine.spans == (16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256, 272)
    generation = model.prepare(list(range(4, 20)), GenerationConfig(max_new_tokens=4))  # 16 prompt tokens
    engine.add([generation])
    assert engine.step_shape()[1] == 32  # 16 committed slots and a 16-node tree end at slot 32
    engine.finish([generation])


@pytest.mark.parametrize("architecture", ["llama", "gemma", "mistral"])
def test_oracle_with_short_attention_spans_stays_lossless(architecture):
    """Spans of 16 slots: steps move through several spans, their K/V written through views of the cache."""
    base = make_tiny_model(architecture)
    prompt = random_prompts(1, seed=31)[0]
    continuation = list(reference(architecture, tuple(prompt), 46))
    tokens, stats, engine = oracle_run(
        base, default_tree(16), prompt, 40, eos=set(), continuation=continuation, span_step=16, spare_slots=50
    )
    assert tokens == continuation[:40]
    assert stats.mean_accepted > 2
    assert len(engine.decoder._views) >= 2  # the steps used at least two spans short of the whole cache
    committed = len(prompt) + sum(stats.accepted_per_step)  # the last step may commit past the 40 tokens returned
    sequence = torch.tensor([prompt + continuation])[:, :committed]
    with torch.no_grad():
        fresh = base(sequence, use_cache=True).past_key_values
    for layer, fresh_layer in zip(engine.decoder.cache.layers, fresh.layers):
        torch.testing.assert_close(layer.keys[:1, :, :committed], fresh_layer.keys, rtol=1e-4, atol=1e-5)


def test_a_long_cache_decodes_the_same_tokens_through_spans():
    """A model's generation on a cache much longer than needed: its steps take short spans, same tokens."""
    base = make_tiny_model("qwen2")
    model = MedusaModel.from_pretrained(
        base,
        heads=MedusaHeadsConfig(hidden_size=base.config.hidden_size, vocab_size=TINY_VOCAB, num_heads=4),
        tree="16",
    )
    prompt = random_prompts(1, seed=5)[0]
    engine = model.engine(EngineOptions(cache_length=500), max_length=len(prompt) + 24)
    assert engine.spans == (256, 512, 528)  # 500 slots round up to 512, plus room for the 16-node tree
    result = model.generate(prompt, max_new_tokens=24, cache_length=500)
    assert result.stats.steps > 1
    assert result.token_ids == list(reference("qwen2", tuple(prompt), 24))


# ----- sliding windows: the window is applied through the mask ------------------------------------


@pytest.mark.parametrize("architecture", ["mistral", "qwen2", "phi3"])
def test_lossless_with_a_short_sliding_window(architecture):
    config_class, model_class, extra = ARCHITECTURES[architecture]
    base = make_tiny_model(architecture)
    window = {"sliding_window": 6}
    if architecture == "qwen2":  # one sliding and one full layer
        window.update(use_sliding_window=True, max_window_layers=1)
    settings = {k: v for k, v in base.config.to_dict().items() if k != "layer_types"}  # recomputed from the window
    config = config_class(**{**settings, **window})
    torch.manual_seed(0)
    windowed = model_class(config).eval()
    prompt = random_prompts(1, seed=2)[0] + [10] * 10
    expected = plain_greedy(windowed, prompt, NEW_TOKENS)
    assert expected != plain_greedy(base, prompt, NEW_TOKENS)  # the window matters for this prompt
    model = MedusaModel.from_pretrained(windowed, tree="64")
    assert model.generate(prompt, max_new_tokens=NEW_TOKENS).token_ids == expected
    truth_tokens, _, _ = oracle_run(windowed, default_tree(64), prompt, NEW_TOKENS, eos={EOS_ID})
    assert truth_tokens == expected
