"""Training on a tiny model: losses fall (stage 1 kl/ce, stage 2), outputs load, kill-and-resume is exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers.training import head_losses, make_base, train_config
from medusa.errors import MedusaError
from medusa.heads import MedusaHeads
from medusa.model import MedusaModel
from medusa.training.trainer import Trainer


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is fastest and bit-reproducible
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_stage1_lowers_every_heads_loss_and_writes_loadable_outputs(tmp_path, tokenizer, data_file, loss):
    base = make_base(tokenizer)
    settings = train_config(data_file, tmp_path, loss=loss)
    trainer = Trainer(settings, base_model=base, tokenizer=tokenizer, base_name="tiny")
    reports = []
    result = trainer.train(on_step=reports.append)
    trained = MedusaHeads.from_pretrained(result.heads_dir, base_lm_head=base.get_output_embeddings())
    fresh = MedusaHeads(trained.config, base_lm_head=base.get_output_embeddings())
    before = head_losses(base, fresh, tokenizer, data_file, loss)
    after = head_losses(base, trained, tokenizer, data_file, loss)
    assert (after < before).all(), (before, after)
    assert trained.config.share_lm_head and not any("projections" in k for k in trained.state_dict())
    assert len(reports) == 8 and reports[-1].step == 8 and len(reports[-1].head_losses) == 3
    assert len(result.skipped) == 1 and "sums.jsonl:41" in result.skipped[0]
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 9)) and len(log[0]["head_losses"]) == 3
    accuracy = json.loads((tmp_path / "head_accuracy.json").read_text())
    assert [len(h["rank_hit_rate"]) for h in accuracy["heads"]] == [10, 10, 10]
    assert all(0 <= h["top1"] <= h["top5"] <= 1 and h["positions"] > 0 for h in accuracy["heads"])
    model = MedusaModel(base, tokenizer, MedusaHeads.from_pretrained(result.heads_dir), tree=[[0], [0, 0], [1]])
    assert model.generate("1+2?", max_new_tokens=4).stats.steps >= 1


def test_stage2_trains_adapter_and_heads_and_stays_close_to_the_original(tmp_path, tokenizer, data_file):
    base = make_base(tokenizer)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    settings = train_config(
        data_file,
        tmp_path,
        stage=2,
        max_steps=6,
        heads_warmup_steps=2,
        backbone_learning_rate=1e-2,
        heads_lambda=1.0,
        merge=True,
        lora={"rank": 4, "alpha": 8},
    )
    reports = []
    result = Trainer(settings, base_model=base, tokenizer=tokenizer, base_name="tiny").train(on_step=reports.append)
    assert [r.backbone_loss is None for r in reports] == [True, True, False, False, False, False]
    assert all(r.backbone_loss >= 0 for r in reports[2:])
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # the adapter did train
    assert (result.merged_dir / "config.json").is_file()
    assert 0.5 <= result.accuracy["backbone_agreement"] <= 1.0
    heads = MedusaHeads.from_pretrained(result.heads_dir, base_lm_head=base.get_output_embeddings())
    assert any(p.abs().sum() > 0 for p in heads.parameters())
    merged = load_file(str(result.merged_dir / "model.safetensors"))
    changed = [k for k, v in original.items() if k in merged and not torch.equal(merged[k], v)]
    assert changed and all("proj" in k for k in changed)  # only adapted linear layers moved


@pytest.mark.parametrize("accumulation", [1, 2])
def test_kill_and_resume_reproduces_an_uninterrupted_run(tmp_path, tokenizer, data_file, accumulation):
    def run(output, kill_at=None, resume=False):
        settings = train_config(
            data_file,
            output,
            max_steps=6,
            checkpoint_every=2,
            batch_size=4,
            warmup_steps=2,
            gradient_accumulation=accumulation,
        )

        def on_step(report):
            if report.step == kill_at:
                raise KeyboardInterrupt  # killed after step 3: its checkpoint is step 2's

        return Trainer(settings, base_model=make_base(tokenizer), tokenizer=tokenizer, base_name="tiny").train(
            resume=resume, on_step=on_step
        )

    straight = run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", kill_at=3)
    with pytest.raises(MedusaError, match="--resume"):
        run(tmp_path / "killed")
    resumed = run(tmp_path / "killed", resume=True)
    assert resumed.resumed_from == 2 and straight.resumed_from is None
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        a = load_file(str(tmp_path / "straight/checkpoints/step-00000006" / name))
        b = load_file(str(tmp_path / "killed/checkpoints/step-00000006" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    state_a = json.loads((tmp_path / "straight/checkpoints/step-00000006/state.json").read_text())
    state_b = json.loads((tmp_path / "killed/checkpoints/step-00000006/state.json").read_text())
    assert state_a["scheduler"] == state_b["scheduler"] and state_a["optimizer"] == state_b["optimizer"]
    heads_a = load_file(str(tmp_path / "straight/heads/medusa_heads.safetensors"))
    heads_b = load_file(str(tmp_path / "killed/heads/medusa_heads.safetensors"))
    assert all(torch.equal(heads_a[k], heads_b[k]) for k in heads_a)
    log = [json.loads(line)["step"] for line in (tmp_path / "killed/train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]  # step 3 of the killed run was redone, not logged twice
    with pytest.raises(MedusaError, match="different settings"):
        Trainer(
            train_config(
                data_file,
                tmp_path / "killed",
                max_steps=6,
                checkpoint_every=2,
                batch_size=8,
                warmup_steps=2,
                gradient_accumulation=accumulation,
            ),
            base_model=make_base(tokenizer),
            tokenizer=tokenizer,
        ).train(resume=True)


def test_resume_refuses_any_setting_that_changes_the_result_and_names_it(tmp_path, tokenizer, data_file):
    """Another warm-up or head decay would change the schedule or loss of the run being continued."""
    output = tmp_path / "run"

    def trainer(**changes):
        settings = dict(max_steps=4, checkpoint_every=2, batch_size=4, warmup_steps=2) | changes
        return Trainer(
            train_config(data_file, output, **settings),
            base_model=make_base(tokenizer),
            tokenizer=tokenizer,
            base_name="tiny",
        )

    def on_step(report):
        if report.step == 3:
            raise KeyboardInterrupt  # killed after step 3: its checkpoint is step 2's

    with pytest.raises(KeyboardInterrupt):
        trainer().train(on_step=on_step)
    written = (output / "train_config.json").read_text()
    for name, value in [("warmup_steps", 1), ("head_weight_decay", 0.5), ("max_grad_norm", 0.5), ("lora", {"rank": 8})]:
        with pytest.raises(MedusaError, match=rf"{name}(\.rank)? was .*, now "):
            trainer(**{name: value}).train(resume=True)
        assert (output / "train_config.json").read_text() == written  # not overwritten by the refused run
    # Logging and checkpointing may change: they do not change the result.
    resumed = trainer(log_every=2, checkpoint_every=3, keep_checkpoints=3).train(resume=True)
    assert resumed.resumed_from == 2 and resumed.steps == 4


def test_a_run_starts_by_removing_what_a_killed_run_was_writing(tmp_path, tokenizer, data_file):
    output = tmp_path / "run"
    settings = train_config(data_file, output, max_steps=2, checkpoint_every=1, batch_size=4)
    Trainer(settings, base_model=make_base(tokenizer), tokenizer=tokenizer, base_name="tiny").train()
    leftovers = [
        output / "checkpoints" / ".step-00000003.tmp",
        output / "heads" / "medusa_heads.safetensors.tmp",
        output / ".train_log.jsonl.partial-7-0123abcd.jsonl",
    ]
    leftovers[0].mkdir()
    for path in leftovers[1:]:
        path.write_text("half")
    Trainer(settings, base_model=make_base(tokenizer), tokenizer=tokenizer, base_name="tiny").train(resume=True)
    assert not any(path.exists() for path in leftovers)
