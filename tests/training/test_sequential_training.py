"""Sequential (Hydra-style) heads through training: the teacher-forced path, stage 1 and 2, resume, the two
conditioned accuracies of head_accuracy.json, the --head-type flag, and Hydra++'s prefix layer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers.heads import sequential_heads
from helpers.training import head_losses, make_base, train_config
from medusa.cli import build_parser
from medusa.commands.train import config_from_args
from medusa.errors import MedusaError
from medusa.heads import MedusaHeads, MedusaHeadsConfig
from medusa.training.config import TrainConfig
from medusa.training.data import Collator, load_examples
from medusa.training.evaluate import accuracy_report, count_hits
from medusa.training.losses import RANKS
from medusa.training.objective import MedusaObjective
from medusa.training.trainer import Trainer


def batch_of(tokenizer, data_file, count: int = 12) -> dict[str, torch.Tensor]:
    return Collator(tokenizer.pad_token_id)(load_examples([data_file], tokenizer, 1024).items[:count])


def test_the_teacher_forced_path_of_head_k_at_t_is_tokens_t_plus_1_to_t_plus_k_plus_1(tokenizer):
    base = make_base(tokenizer)
    objective = MedusaObjective(base, sequential_heads(base, scale=0.0))
    input_ids = torch.arange(20).view(2, 10)
    valid = torch.zeros(2, 10 - 3, dtype=torch.bool)  # head 1: targets t + 3
    valid[0, 0] = valid[0, 6] = valid[1, 2] = True
    path = objective.teacher_path(input_ids, 1, valid)
    assert path.tolist() == [[1, 2], [7, 8], [13, 14]]  # (row, t) = (0, 0), (0, 6), (1, 2): tokens t + 1, t + 2
    assert objective.teacher_path(input_ids[:, :3], 1, valid[:, :0]).shape == (0, 2)  # no target fits
    medusa = MedusaHeads(MedusaHeadsConfig(hidden_size=32, vocab_size=len(tokenizer), num_heads=3))
    assert MedusaObjective(base, medusa).teacher_path(input_ids, 1, valid) is None


def test_the_loss_feeds_each_head_its_true_path(tokenizer, data_file):
    """The objective's head-0 cross-entropy, computed by hand from head_logits with input_ids[t + 1] as the path."""
    base = make_base(tokenizer)
    heads = sequential_heads(base, scale=0.2, path_gain=10)
    batch = batch_of(tokenizer, data_file, 4)
    objective = MedusaObjective(base, heads, loss="ce")
    with torch.no_grad():
        losses = objective(**batch)["head_losses"]
        hidden = objective.hidden_states(batch["input_ids"], batch["attention_mask"], False)[0]
        mask = batch["loss_mask"].bool() & batch["attention_mask"].bool()
        for k in range(3):
            total, count = 0.0, 0
            for row, t in (mask[:, k + 2 :]).nonzero().tolist():
                logits = heads.head_logits(k, hidden[row, t], batch["input_ids"][row, t + 1 : t + k + 2])
                total -= logits.log_softmax(-1)[batch["input_ids"][row, t + k + 2]].item()
                count += 1
            assert losses[k].item() == pytest.approx(total / count, rel=1e-4), k


def test_stage1_lowers_every_sequential_heads_loss_and_saves_the_head_type(tmp_path, tokenizer, data_file):
    base = make_base(tokenizer)
    settings = train_config(data_file, tmp_path, head_type="sequential")
    result = Trainer(settings, base_model=base, tokenizer=tokenizer, base_name="tiny").train()
    trained = MedusaHeads.from_pretrained(result.heads_dir, base_lm_head=base.get_output_embeddings())
    assert trained.config.head_type == "sequential"
    assert json.loads((result.heads_dir / "config.json").read_text())["head_type"] == "sequential"
    assert json.loads((tmp_path / "train_config.json").read_text())["head_type"] == "sequential"
    assert any(name.startswith("path_inputs.2.") for name in trained.state_dict())
    trained.attach_base_model(base)
    fresh = sequential_heads(base, scale=0.0)
    before = head_losses(base, fresh, tokenizer, data_file, "kl")
    after = head_losses(base, trained, tokenizer, data_file, "kl")
    assert (after < before).all(), (before, after)
    accuracy = json.loads((tmp_path / "head_accuracy.json").read_text())
    assert accuracy["head_type"] == "sequential"
    for head in accuracy["heads"]:
        assert len(head["own_rank_hit_rate"]) == RANKS and 0 <= head["own_top1"] <= head["own_top5"] <= 1


def test_stage2_trains_sequential_heads_with_the_adapter(tmp_path, tokenizer, data_file):
    base = make_base(tokenizer)
    settings = train_config(
        data_file,
        tmp_path,
        stage=2,
        head_type="sequential",
        backbone_learning_rate=1e-2,
        heads_lambda=1.0,
        lora={"rank": 4, "alpha": 8},
    )
    result = Trainer(settings, base_model=base, tokenizer=tokenizer, base_name="tiny").train()
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # the adapter did train
    trained = MedusaHeads.from_pretrained(result.heads_dir, base_lm_head=base.get_output_embeddings())
    trained.attach_base_model(base)  # ``base`` holds the trained adapter's layers now
    before = head_losses(base, sequential_heads(base, scale=0.0), tokenizer, data_file, "kl")
    after = head_losses(base, trained, tokenizer, data_file, "kl")
    assert (after < before).all(), (before, after)
    assert "backbone_agreement" in result.accuracy and result.accuracy["head_type"] == "sequential"


def test_kill_and_resume_of_sequential_heads_reproduces_an_uninterrupted_run(tmp_path, tokenizer, data_file):
    def run(output, kill_at=None, resume=False):
        settings = train_config(
            data_file, output, max_steps=6, checkpoint_every=2, batch_size=4, warmup_steps=2, head_type="sequential"
        )

        def on_step(report):
            if report.step == kill_at:
                raise KeyboardInterrupt  # killed after step 3: its checkpoint is step 2's

        return Trainer(settings, base_model=make_base(tokenizer), tokenizer=tokenizer, base_name="tiny").train(
            resume=resume, on_step=on_step
        )

    run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", kill_at=3)
    assert run(tmp_path / "killed", resume=True).resumed_from == 2
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        a = load_file(str(tmp_path / "straight/checkpoints/step-00000006" / name))
        b = load_file(str(tmp_path / "killed/checkpoints/step-00000006" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    trainable = load_file(str(tmp_path / "killed/checkpoints/step-00000006/trainable.safetensors"))
    assert any(k.startswith("heads.path_inputs.") for k in trainable)  # the path layers are checkpointed and restored
    heads_a = load_file(str(tmp_path / "straight/heads/medusa_heads.safetensors"))
    heads_b = load_file(str(tmp_path / "killed/heads/medusa_heads.safetensors"))
    assert heads_a.keys() == heads_b.keys() and all(torch.equal(heads_a[k], heads_b[k]) for k in heads_a)
    medusa = train_config(
        data_file,
        tmp_path / "killed",
        max_steps=6,
        checkpoint_every=2,
        batch_size=4,
        warmup_steps=2,
        head_type="medusa",
    )
    with pytest.raises(MedusaError, match="head_type was 'sequential', now 'medusa'"):
        Trainer(medusa, base_model=make_base(tokenizer), tokenizer=tokenizer).train(resume=True)


def direct_ranks(heads, hidden, input_ids, mask, greedy, own: bool) -> torch.Tensor:
    """``[heads, RANKS]`` hits against the greedy target, position by position: head k at t reads the data's token
    t + 1 and then either the true tokens (teacher forcing) or the heads' own top-1 guesses (``own``)."""
    hits = torch.zeros(heads.config.num_heads, RANKS, dtype=torch.long)
    for row in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1] - 2):
            path = input_ids[row, t + 1 : t + 2]
            for k in range(heads.config.num_heads):
                if t + k + 2 >= input_ids.shape[1]:
                    break
                if not own:
                    path = input_ids[row, t + 1 : t + k + 2]
                logits = heads.head_logits(k, hidden[row, t], path)
                if mask[row, t + k + 2]:
                    rank = int((logits > logits[greedy[row, t + k + 1]]).sum())
                    if rank < RANKS:
                        hits[k, rank] += 1
                path = torch.cat([path, logits.argmax().view(1)])
    return hits


def test_evaluation_counts_each_head_on_the_true_path_and_on_its_own_guesses(tokenizer, data_file):
    base = make_base(tokenizer)
    heads = sequential_heads(base, seed=3, path_gain=10)
    batch = batch_of(tokenizer, data_file, 6)
    objective = MedusaObjective(base, heads, chunk_size=16)  # several chunks per batch
    totals = count_hits(objective, [batch])
    with torch.no_grad():
        hidden = objective.hidden_states(batch["input_ids"], batch["attention_mask"], False)[0]
        greedy = base.get_output_embeddings()(hidden).argmax(-1)
        mask = batch["loss_mask"].bool() & batch["attention_mask"].bool()
        forced = direct_ranks(heads, hidden, batch["input_ids"], mask, greedy, own=False)
        own = direct_ranks(heads, hidden, batch["input_ids"], mask, greedy, own=True)
    assert torch.equal(totals["greedy"], forced) and torch.equal(totals["own_greedy"], own)
    assert torch.equal(totals["positions"], torch.tensor([int(mask[:, k + 2 :].sum()) for k in range(3)]))
    report = accuracy_report(totals, stage=1, head_type="sequential")
    first, *deeper = report["heads"]
    assert first["own_rank_hit_rate"] == first["rank_hit_rate"]  # head 0 reads the data's token t + 1 either way
    assert any(h["own_rank_hit_rate"] != h["rank_hit_rate"] for h in deeper)  # the guesses are not the true tokens
    assert "teacher-forced" in report["conditioning"]["top1, top5, rank_hit_rate, data_*"]


def test_medusa_heads_report_the_same_numbers_for_both_conditions_and_say_so(tokenizer, data_file):
    base = make_base(tokenizer)
    heads = MedusaHeads(
        MedusaHeadsConfig(hidden_size=32, vocab_size=len(tokenizer), num_heads=2, share_lm_head=True),
        base_lm_head=base.get_output_embeddings(),
    )
    totals = count_hits(MedusaObjective(base, heads), [batch_of(tokenizer, data_file, 4)])
    assert "own_greedy" not in totals  # not measured twice
    report = accuracy_report(totals, stage=1)
    assert report["head_type"] == "medusa" and "copied" in report["conditioning"]["own_*"]
    for head in report["heads"]:
        assert head["own_rank_hit_rate"] == head["rank_hit_rate"] and head["own_data_top1"] == head["data_top1"]


def test_the_head_type_flag_reaches_the_config_and_an_unknown_one_is_refused(capsys):
    argv = ["train", "--data", "a.jsonl", "--output", "out", "--head-type", "medusa"]
    assert config_from_args(build_parser(argv).parse_args(argv)).head_type == "medusa"
    argv = ["train", "--data", "a.jsonl", "--output", "out"]  # sequential heads won, and are the default
    assert config_from_args(build_parser(argv).parse_args(argv)).head_type == "sequential"
    argv = ["train", "--data", "a.jsonl", "--output", "out", "--head-type", "eagle"]
    with pytest.raises(SystemExit):
        build_parser(argv).parse_args(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--head-type: invalid choice: 'eagle' (choose from " in error  # the quoting varies with Python's version
    assert "medusa" in error and "sequential" in error
    with pytest.raises(MedusaError, match="head_type must be one of medusa, sequential, got 'eagle'"):
        TrainConfig(data=["a.jsonl"], output_dir="out", head_type="eagle")


def test_stage1_trains_hydra_plus_plus_prefix_layer_with_sequential_heads(tmp_path, tokenizer, data_file):
    base = make_base(tokenizer)
    settings = train_config(data_file, tmp_path, head_type="sequential", prefix_layer=True)
    result = Trainer(settings, base_model=base, tokenizer=tokenizer, base_name="tiny").train()
    trained = MedusaHeads.from_pretrained(result.heads_dir, base_lm_head=base.get_output_embeddings())
    assert trained.config.prefix_layer
    assert json.loads((tmp_path / "train_config.json").read_text())["prefix_layer"] is True
    assert trained.prefix.out.weight.abs().sum() > 0  # it left the identity: the gradient reached it
    trained.attach_base_model(base)
    fresh = MedusaHeads(trained.config, base_lm_head=base.get_output_embeddings())
    fresh.attach_base_model(base)
    assert (
        head_losses(base, trained, tokenizer, data_file, "kl") < head_losses(base, fresh, tokenizer, data_file, "kl")
    ).all()
