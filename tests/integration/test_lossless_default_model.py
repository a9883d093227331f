"""The real default model (SmolLM2-135M-Instruct, float32, CPU): Medusa greedy equals plain greedy on Spec-Bench."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.decoding import oracle_engine, oracle_generation
from helpers.models import SPEC_BENCH
from medusa.cli import main
from medusa.heads import MedusaHeads, MedusaHeadsConfig
from medusa.model import GenerationConfig, MedusaModel

pytestmark = pytest.mark.integration

NEW_TOKENS = 64
# Rows of question.jsonl: writing, roleplay, reasoning, math, coding, stem, translation, summarization
# (a long article), qa, math_reasoning.
ROWS = (0, 10, 20, 30, 40, 60, 85, 170, 250, 330)


@pytest.fixture(scope="module")
def cases(default_model):
    """(prompt ids, the base model's own greedy continuation) for each question's first turn."""
    if not SPEC_BENCH.is_file():
        pytest.skip(f"Spec-Bench questions not found at {SPEC_BENCH}")
    lines = SPEC_BENCH.read_text().splitlines()
    result = []
    for row in ROWS:
        ids = default_model.encode_prompt(json.loads(lines[row])["turns"][0])
        with torch.no_grad():
            out = default_model.base_model.generate(
                ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=NEW_TOKENS, do_sample=False
            )
        result.append((ids, out[0, ids.numel() :].tolist()))
    return result


def test_medusa_greedy_equals_plain_greedy_on_spec_bench(default_model, cases):
    assert default_model.base_model.dtype == torch.float32 and default_model.device.type == "cpu"
    steps = 0
    for ids, expected in cases:
        result = default_model.generate(ids, max_new_tokens=NEW_TOKENS)
        assert result.token_ids == expected, default_model.tokenizer.decode(ids)
        steps += result.stats.steps
    assert steps <= NEW_TOKENS * len(cases)


def test_plain_decoding_equals_plain_greedy(default_model, cases):
    ids, expected = cases[0]
    result = default_model.generate(ids, max_new_tokens=NEW_TOKENS, use_heads=False)
    assert result.token_ids == expected and result.stats.steps == len(expected)


def test_batched_greedy_equals_each_rows_own_greedy(default_model, cases):
    """All ten questions in one batch (bucket 16), through the engine the server uses."""
    results = default_model.generate([ids for ids, _ in cases], max_new_tokens=NEW_TOKENS)
    for (ids, expected), result in zip(cases, results):
        assert result.token_ids == expected, default_model.tokenizer.decode(ids)


def test_a_seeded_sample_is_the_same_alone_and_in_a_batch(default_model, cases):
    config = GenerationConfig(max_new_tokens=24, temperature=0.8, top_p=0.95, seed=7)
    alone = default_model.generate(cases[3][0], config).token_ids
    configs = [GenerationConfig(max_new_tokens=24)] * 3 + [config]
    batched = default_model.generate_batch([ids for ids, _ in cases[:4]], configs)
    assert batched[3].token_ids == alone
    assert [r.token_ids for r in batched[:3]] == [expected[:24] for _, expected in cases[:3]]


def test_long_accepted_paths_on_the_real_model(default_model, cases):
    """The oracle proposes the true continuation at random ranks: long paths are accepted and compacted, two rows
    of very different lengths in one batch."""
    limit = NEW_TOKENS - default_model.heads.config.num_heads - 1  # the oracle knows this far
    longest = max(cases[i][0].numel() for i in (0, 7))
    engine = oracle_engine(
        default_model.base_model,
        default_model.tree,
        max_rows=2,
        max_length=longest + NEW_TOKENS,
        heads=default_model.heads,
    )
    eos = default_model.eos_token_ids()
    generations = [oracle_generation(engine, cases[i][0].tolist(), cases[i][1], limit, eos) for i in (0, 7)]
    for _ in engine.run(generations):
        pass
    for generation, index in zip(generations, (0, 7)):
        expected = cases[index][1]
        assert generation.tokens == expected[: len(generation.tokens)] and len(generation.tokens) == limit
        assert generation.stats.mean_accepted > 2


def test_cli_on_the_default_model(capsys, default_model):
    code = main(["generate", "What is the capital of France?", "--max-new-tokens", "8", "--tree", "16"])
    captured = capsys.readouterr()
    assert code == 0
    expected = default_model.generate("What is the capital of France?", max_new_tokens=8)
    assert captured.out == expected.text + "\n"
    assert "accepted tokens per step" in captured.err


def test_sequential_heads_greedy_equals_plain_greedy(default_model, cases):
    """Fresh sequential heads (their path weights randomised, so each child is guessed for its own parent) on the
    real model: the tree they grow changes what is accepted, never the tokens."""
    base = default_model.base_model
    config = MedusaHeadsConfig(
        hidden_size=base.config.hidden_size,
        vocab_size=base.get_output_embeddings().weight.shape[0],
        num_heads=4,
        share_lm_head=True,
        head_type="sequential",
    )
    heads = MedusaHeads(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in heads.path_inputs:
            hidden = config.hidden_size
            noise = torch.randn(hidden, layer.weight.shape[1] - hidden, generator=generator)
            layer.weight[:, hidden:].copy_(noise / hidden**0.5)
    model = MedusaModel(base, default_model.tokenizer, heads, tree="64")
    accepted = []
    for ids, expected in cases[:4]:
        result = model.generate(ids, max_new_tokens=NEW_TOKENS)
        assert result.token_ids == expected, default_model.tokenizer.decode(ids)
        accepted += result.stats.accepted_per_step
    assert max(accepted) >= 2  # the heads' guesses were accepted somewhere: the grown tree was verified
