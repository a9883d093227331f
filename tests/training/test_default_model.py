"""The real default model (SmolLM2-135M-Instruct): its chat template, a short distillation and two training steps."""

from __future__ import annotations

import json

import pytest
import torch

from medusa.model import MedusaModel
from medusa.training.config import DistillConfig, TrainConfig
from medusa.training.data import encode_conversation, load_examples
from medusa.training.distill import distill, plan
from medusa.training.trainer import Trainer

pytestmark = pytest.mark.integration


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a shared 2-core machine run several times slower than one
    yield
    torch.set_num_threads(threads)


def test_distill_and_train_on_the_default_model(tmp_path, default_model, one_thread):
    tokenizer, base = default_model.tokenizer, default_model.base_model
    example = encode_conversation(
        tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}], 256
    )
    labelled = tokenizer.decode([t for t, keep in zip(example.input_ids, example.loss_mask) if keep])
    assert labelled == "Hello there<|im_end|>\n"  # the default system prompt and the user turn are not trained on

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"question": f"What is {n} times 3?", "answer": "-"}) + "\n" for n in range(3))
    )
    distilled = tmp_path / "distilled.jsonl"
    config = DistillConfig(data=[str(prompts)], output=str(distilled), max_new_tokens=8, batch_size=3, device="cpu")
    work = plan(config, tokenizer)
    assert sum(batch.rows for batch in distill(config, work, base, tokenizer)) == 3
    rows = [json.loads(line) for line in distilled.read_text().splitlines()]
    assert all(row["conversations"][-1]["value"].strip() for row in rows)
    assert len(load_examples([distilled], tokenizer, 512).items) == 3

    out = tmp_path / "run"
    settings = TrainConfig(
        data=[str(distilled)],
        output_dir=str(out),
        max_steps=1,
        batch_size=2,
        eval_fraction=0.34,
        device="cpu",
        warmup_steps=0,
    )
    result = Trainer(settings, base_model=base, tokenizer=tokenizer, base_name="SmolLM2-135M-Instruct").train()
    weights = result.heads_dir / "medusa_heads.safetensors"
    # Sequential heads, the default: head k reads (k + 2) vectors of 576 into one, and a 576^2 block; 18 x 576^2
    # floats in all (24 MB). A shared lm_head: copies of it would add 4 x 49152 x 576 floats (453 MB).
    assert json.loads((result.heads_dir / "config.json").read_text())["head_type"] == "sequential"
    assert 18 * 576 * 576 * 4 < weights.stat().st_size < 25 * 2**20
    assert len(result.accuracy["heads"]) == 4 and result.accuracy["heads"][0]["positions"] > 0
    model = MedusaModel.from_pretrained(base, heads=result.heads_dir, tokenizer=tokenizer, tree=[[0], [0, 0]])
    assert model.generate("What is 2 times 3?", max_new_tokens=4).stats.new_tokens == 4
