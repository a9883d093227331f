"""Checkpoints: optimizer state through safetensors + JSON unchanged, atomic writes, pruning."""

from __future__ import annotations

import json
import os

import pytest
import torch

import medusa.training.checkpoint as checkpoint_module
from medusa.training.checkpoint import (
    Checkpoint,
    flatten_optimizer_state,
    latest_checkpoint,
    load_checkpoint,
    restore_optimizer,
    rng_state,
    save_checkpoint,
    unflatten_optimizer_state,
)


def stepped_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(
        [{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[1].parameters(), "lr": 1e-3}]
    )
    for _ in range(3):
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def make_checkpoint(step: int) -> Checkpoint:
    model, optimizer = stepped_optimizer()
    return Checkpoint(step, dict(model.state_dict()), optimizer.state_dict(), {"note": step}, rng_state())


def test_optimizer_state_round_trips_through_tensors_and_json():
    _, optimizer = stepped_optimizer()
    tensors, structure = flatten_optimizer_state(optimizer.state_dict())
    restored = unflatten_optimizer_state(tensors, json.loads(json.dumps(structure)))
    model, fresh = stepped_optimizer()
    fresh = torch.optim.AdamW(
        [{"params": model[0].parameters(), "lr": 5.0}, {"params": model[1].parameters(), "lr": 5.0}]
    )
    restore_optimizer(fresh, restored)
    original, loaded = optimizer.state_dict(), fresh.state_dict()
    assert loaded["param_groups"] == original["param_groups"]  # betas are a tuple again
    for index, values in original["state"].items():
        for name, value in values.items():
            assert torch.equal(loaded["state"][index][name], value)


def test_checkpoint_round_trip_and_latest_pointer(tmp_path):
    saved = make_checkpoint(4)
    directory = save_checkpoint(tmp_path, saved)
    assert latest_checkpoint(tmp_path) == directory == tmp_path / "step-00000004"
    loaded = load_checkpoint(directory)
    assert loaded.step == 4 and loaded.state == {"note": 4}
    assert all(torch.equal(loaded.weights[k], v) for k, v in saved.weights.items())
    assert torch.equal(loaded.rng["torch"], saved.rng["torch"])
    assert torch.equal(loaded.optimizer["state"][0]["exp_avg"], saved.optimizer["state"][0]["exp_avg"])


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_partial_files(tmp_path, monkeypatch):
    first = save_checkpoint(tmp_path, make_checkpoint(2))
    calls = []
    real_save = checkpoint_module.save_file

    def dying_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the weights are written, then the process "dies" on the optimizer file
            raise KeyboardInterrupt
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, make_checkpoint(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-00000002"]
    assert latest_checkpoint(tmp_path) == first
    assert load_checkpoint(first).step == 2


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, make_checkpoint(step), keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000003", "step-00000004"]
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_every_file_of_a_checkpoint_and_its_pointer_is_fsynced(tmp_path, monkeypatch):
    seen = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        seen.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_checkpoint(tmp_path, make_checkpoint(4))
    for name in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        assert name in seen
    assert any(name.startswith(".latest.json") for name in seen)  # the pointer, before its rename
    assert tmp_path.name in seen  # the directory, after the renames


def test_a_killed_save_of_another_step_leaves_nothing_after_the_next_save(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(2))
    (tmp_path / ".step-00000004.tmp").mkdir()  # a run killed while writing step 4, resumed from step 2
    (tmp_path / ".step-00000004.tmp" / "trainable.safetensors").write_bytes(b"half")
    (tmp_path / "latest.json.tmp").write_text('{"step": 4')
    save_checkpoint(tmp_path, make_checkpoint(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-00000002", "step-00000003"]
