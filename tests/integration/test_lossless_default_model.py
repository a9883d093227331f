"""The real default model (SmolLM2-135M-Instruct, float32, CPU): Medusa greedy equals plain greedy on Spec-Bench."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.decoding import OracleDecoder
from helpers.models import SPEC_BENCH
from medusa.acceptance import GreedyAcceptance
from medusa.cli import main
from medusa.decoding import DecodingStats, decode

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


def test_long_accepted_paths_on_the_real_model(default_model, cases):
    """The oracle proposes the true continuation at random ranks: long paths are accepted and compacted."""
    for index in (0, 7):  # a short prompt, and a long article
        ids, expected = cases[index]
        truth = ids.tolist() + expected
        decoder = OracleDecoder(
            default_model.base_model,
            default_model.heads,
            default_model.tree,
            GreedyAcceptance(),
            ids.numel() + NEW_TOKENS + default_model.tree.size,
            truth=truth,
            seed=index,
        )
        limit = len(expected) - default_model.heads.config.num_heads - 1  # the oracle knows this far
        stats = DecodingStats()
        tokens = [t for step in decode(decoder, ids, limit, default_model.eos_token_ids(), stats) for t in step.tokens]
        assert tokens == expected[: len(tokens)] and len(tokens) == limit
        assert stats.mean_accepted > 2


def test_cli_on_the_default_model(capsys, default_model):
    code = main(["generate", "What is the capital of France?", "--max-new-tokens", "8", "--tree", "16"])
    captured = capsys.readouterr()
    assert code == 0
    expected = default_model.generate("What is the capital of France?", max_new_tokens=8)
    assert captured.out == expected.text + "\n"
    assert "accepted tokens per step" in captured.err
