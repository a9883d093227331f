"""The real default model (SmolLM2-135M-Instruct, float32, CPU): a batch of mixed-length Spec-Bench
prompts decodes to exactly each prompt's own single-sequence greedy answer."""

from __future__ import annotations

import json

import pytest

from helpers.models import SPEC_BENCH

pytestmark = pytest.mark.integration

NEW_TOKENS = 32
ROWS = (0, 40, 170)  # writing (short), coding, summarization (a long article)


def test_a_batch_equals_each_prompt_alone(default_model):
    if not SPEC_BENCH.is_file():
        pytest.skip(f"Spec-Bench questions not found at {SPEC_BENCH}")
    lines = SPEC_BENCH.read_text().splitlines()
    prompts = [default_model.encode_prompt(json.loads(lines[row])["turns"][0]) for row in ROWS]
    lengths = [p.numel() for p in prompts]
    assert max(lengths) > 3 * min(lengths)  # mixed lengths: the short ones are padded and holed
    alone = [default_model.generate(p, max_new_tokens=NEW_TOKENS) for p in prompts]
    batch = default_model.generate(prompts, max_new_tokens=NEW_TOKENS)
    for one, together in zip(alone, batch):
        assert together.token_ids == one.token_ids
        assert together.text == one.text and together.finish_reason == one.finish_reason
    plain = default_model.generate(prompts, max_new_tokens=NEW_TOKENS, use_heads=False)
    assert [r.token_ids for r in plain] == [r.token_ids for r in alone]
