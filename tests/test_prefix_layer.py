"""Hydra++'s prefix layer: heads that read a causal self-attention layer over the base model's hidden states.

A fresh layer is the identity; over whole sequences it is causal and ignores right padding; decoding keeps its
K/V per row so that what the heads read after every step is exactly the layer's output over the whole text so
far (checked against a full forward pass while the oracle makes long paths accepted); greedy decoding stays the
base model's own; training, saving, loading and export know it.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers.decoding import oracle_engine, oracle_generation, plain_greedy, random_prompts, reference
from helpers.heads import sequential_heads
from helpers.models import make_tiny_model
from medusa.engine import DecodingEngine
from medusa.errors import MedusaError
from medusa.heads import MedusaHeads, MedusaHeadsConfig
from medusa.interop import export_heads
from medusa.model import GenerationConfig, MedusaModel
from medusa.tree import default_tree


def prefix_heads(base, head_type: str = "medusa") -> MedusaHeads:
    """Heads with a prefix layer whose output projection is not zero (so its output is not the hidden state), and
    every other weight moved too, so that the heads' guesses depend on what they read."""
    return sequential_heads(base, head_type=head_type, prefix_layer=True)


def test_a_fresh_prefix_layer_passes_the_hidden_state_through():
    heads = MedusaHeads(MedusaHeadsConfig(hidden_size=128, vocab_size=512, prefix_layer=True))
    hidden = torch.randn(2, 7, 128)
    assert torch.equal(heads.prefix_states(hidden), hidden)
    assert heads.prefix.num_heads == 2 and heads.prefix.head_dim == 64
    plain = MedusaHeads(MedusaHeadsConfig(hidden_size=128, vocab_size=512))
    assert plain.prefix is None and plain.prefix_states(hidden) is hidden


def test_the_prefix_layer_is_causal_and_ignores_right_padding():
    heads = prefix_heads(make_tiny_model("llama"))
    hidden = torch.randn(2, 9, heads.config.hidden_size)
    with torch.no_grad():
        whole = heads.prefix_states(hidden)
        assert torch.allclose(heads.prefix_states(hidden[:, :5]), whole[:, :5], atol=1e-5)  # the future is unseen
        assert not torch.allclose(whole, hidden, atol=1e-3)  # the layer does something
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0  # row 1 is 6 tokens, right-padded
        padded = heads.prefix_states(hidden, mask)
        assert torch.allclose(padded[1, :6], heads.prefix_states(hidden[1:, :6])[0], atol=1e-5)
        assert torch.isfinite(padded).all()


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_decoding_keeps_the_prefix_state_of_the_whole_text_as_long_paths_are_accepted(architecture):
    """After the prefill and after every step, each row's last_hidden is the prefix layer's output at its last
    committed position over the whole text (prompt and tokens so far), computed here by a full forward pass."""
    base = make_tiny_model(architecture)
    heads = prefix_heads(base)
    prompts = random_prompts(2, seed=21)
    limits = [8, 20]  # the first row ends first, so the second moves into its row (its prefix K/V with it)
    engine = oracle_engine(base, default_tree(16, 3), num_heads=3, max_rows=2, max_length=96, heads=heads)
    generations = [
        oracle_generation(engine, prompt, plain_greedy(base, prompt, limit + 5), limit, set())
        for prompt, limit in zip(prompts, limits)
    ]

    def check() -> None:
        for generation in engine.generations:
            text = torch.tensor([generation.prompt_ids.tolist() + generation.tokens])
            with torch.no_grad():
                hidden = base(input_ids=text, output_hidden_states=True).hidden_states[-1]
                expected = heads.prefix_states(hidden)[0, -1]
            assert torch.allclose(engine.decoder.last_hidden[generation.row], expected, atol=1e-4)

    engine.add(generations)
    check()
    assert generations[1].row == 1
    longest = 0
    while engine.generations:
        for _, output in engine.step():
            longest = max(longest, output.accepted)
        check()
        if not generations[1].finished:
            assert generations[1].row == (0 if generations[0].finished else 1)
    assert longest >= 3  # paths of several tokens were accepted and committed through the layer
    for generation, prompt, limit in zip(generations, prompts, limits):
        assert generation.tokens == plain_greedy(base, prompt, limit)


@pytest.mark.parametrize("head_type", ["medusa", "sequential"])
@pytest.mark.parametrize("architecture", ["llama", "gemma", "qwen2"])
def test_greedy_with_a_prefix_layer_is_the_base_models_own(architecture, head_type, monkeypatch):
    """Lossless through generate, continuous batching and the padded, split prefills a GPU replays."""
    base = make_tiny_model(architecture)
    model = MedusaModel.from_pretrained(base, heads=prefix_heads(base, head_type), tree="16")
    prompts = random_prompts(5, seed=4)
    expected = [list(reference(architecture, tuple(prompt), 12)) for prompt in prompts]
    assert model.generate(prompts[0], max_new_tokens=12, chat_template=False).token_ids == expected[0]
    batched = model.generate_batch(prompts, max_new_tokens=12, chat_template=False, max_batch=3, lookup=4)
    assert [r.token_ids for r in batched] == expected
    monkeypatch.setattr(DecodingEngine, "captures_prefills", property(lambda self: True))
    padded = model.generate_batch(prompts, max_new_tokens=12, chat_template=False, max_batch=4)
    assert [r.token_ids for r in padded] == expected


def test_sampling_with_a_prefix_layer_depends_only_on_the_seed():
    base = make_tiny_model("llama")
    model = MedusaModel.from_pretrained(base, heads=prefix_heads(base), tree="16")
    config = GenerationConfig(max_new_tokens=16, chat_template=False, temperature=0.8, seed=5)
    alone = model.generate([5, 9, 33, 7], config).token_ids
    assert model.generate([5, 9, 33, 7], config, use_heads=False).token_ids == alone
    beside = model.generate_batch([[5, 9, 33, 7], [8, 8, 1]], [config, GenerationConfig(max_new_tokens=4)])
    assert beside[0].token_ids == alone


def test_heads_with_a_prefix_layer_save_load_and_refuse_export(tmp_path):
    base = make_tiny_model("llama")
    heads = prefix_heads(base)
    heads.save_pretrained(tmp_path / "heads")
    assert json.loads((tmp_path / "heads" / "config.json").read_text())["prefix_layer"] is True
    loaded = MedusaHeads.from_pretrained(tmp_path / "heads", base_lm_head=base.get_output_embeddings())
    assert loaded.config.prefix_layer and loaded.prefix is not None
    hidden = torch.randn(1, 6, heads.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(loaded.prefix_states(hidden), heads.prefix_states(hidden))
    model = MedusaModel.from_pretrained(base, heads=tmp_path / "heads", tree="8")
    for format in ("medusa", "vllm"):
        with pytest.raises(MedusaError, match="prefix layer"):
            export_heads(model, tmp_path / format, format=format)
    assert not (tmp_path / "medusa").exists() and not (tmp_path / "vllm").exists()


def test_the_prefix_layer_flags():
    from medusa.cli import build_parser
    from medusa.commands.train import config_from_args

    parser = build_parser()
    args = parser.parse_args(["train", "--data", "d.jsonl", "--output", "out", "--prefix-layer"])
    assert config_from_args(args).prefix_layer is True
    args = parser.parse_args(["train", "--data", "d.jsonl", "--output", "out"])
    assert config_from_args(args).prefix_layer is False
    from medusa.commands.bench import run

    with pytest.raises(MedusaError, match="--prefix-layer applies to --cost-curve --shape"):
        run(parser.parse_args(["bench", "--prefix-layer"]))
