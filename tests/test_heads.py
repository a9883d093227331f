"""Medusa heads: fresh heads equal the base lm_head, checkpoints round-trip, mismatches are named."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.models import TINY_HIDDEN, TINY_VOCAB, make_tiny_model
from medusa.errors import MedusaError
from medusa.heads import CONFIG_NAME, HEAD_TYPES, WEIGHTS_NAME, MedusaHeads, MedusaHeadsConfig
from medusa.model import MedusaModel


def heads_for(base, **settings) -> MedusaHeads:
    config = MedusaHeadsConfig(hidden_size=TINY_HIDDEN, vocab_size=TINY_VOCAB, **settings)
    return MedusaHeads(config, base_lm_head=base.get_output_embeddings())


def perturb(heads: MedusaHeads, seed: int = 0, scale: float = 0.2) -> MedusaHeads:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return heads


@pytest.mark.parametrize("num_layers", [0, 1, 2])
@pytest.mark.parametrize("share_lm_head", [False, True])
def test_fresh_heads_return_the_base_logits_exactly(tiny_model, num_layers, share_lm_head):
    heads = heads_for(tiny_model, num_heads=3, num_layers=num_layers, share_lm_head=share_lm_head)
    hidden = torch.randn(2, 5, TINY_HIDDEN)
    with torch.no_grad():
        logits = heads(hidden)
        base = tiny_model.get_output_embeddings()(hidden)
    assert logits.shape == (3, 2, 5, TINY_VOCAB)
    for k in range(3):
        assert torch.equal(logits[k], base)


def test_copied_projection_is_a_copy_not_the_base_weight():
    base = make_tiny_model("llama")
    heads = heads_for(base, num_heads=2)
    assert not heads.projections[0].weight.data_ptr() == base.get_output_embeddings().weight.data_ptr()
    assert torch.equal(heads.projections[1].weight, base.get_output_embeddings().weight)


def test_shared_lm_head_is_not_saved(tmp_path):
    base = make_tiny_model("llama")
    shared = heads_for(base, num_heads=4, num_layers=1, share_lm_head=True)
    copied = heads_for(base, num_heads=4, num_layers=1, share_lm_head=False)
    assert all("projections" not in name for name in shared.state_dict())
    shared.save_pretrained(tmp_path / "shared")
    copied.save_pretrained(tmp_path / "copied")
    shared_size = (tmp_path / "shared" / WEIGHTS_NAME).stat().st_size
    copied_size = (tmp_path / "copied" / WEIGHTS_NAME).stat().st_size
    # 4 * (64 * 64 + 64) floats against that plus 4 * 256 * 64 floats of projections.
    assert shared_size < copied_size / 3


def test_shared_heads_without_an_lm_head_say_so():
    config = MedusaHeadsConfig(hidden_size=TINY_HIDDEN, vocab_size=TINY_VOCAB, share_lm_head=True)
    heads = MedusaHeads(config)
    with pytest.raises(MedusaError, match="share the base lm_head, but none was attached"):
        heads(torch.zeros(TINY_HIDDEN))


@pytest.mark.parametrize("share_lm_head", [False, True])
def test_save_load_round_trip(tmp_path, share_lm_head):
    base = make_tiny_model("qwen2")
    heads = perturb(heads_for(base, num_heads=3, num_layers=2, share_lm_head=share_lm_head))
    heads.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["model_type"] == "medusa_heads"
    assert saved["num_heads"] == 3 and saved["num_layers"] == 2 and saved["share_lm_head"] == share_lm_head
    loaded = MedusaHeads.from_pretrained(tmp_path, base_lm_head=base.get_output_embeddings())
    assert loaded.config == heads.config
    hidden = torch.randn(4, TINY_HIDDEN)
    with torch.no_grad():
        assert torch.equal(loaded(hidden), heads(hidden))


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_model_save_load_round_trip_keeps_heads_and_tree(tmp_path, head_type):
    base = make_tiny_model("llama")
    model = MedusaModel.from_pretrained(
        base, num_heads=3, num_layers=1, head_type=head_type, tree=[[0], [1], [0, 0], [0, 0, 0]]
    )
    perturb(model.heads)
    model.save_pretrained(tmp_path)
    again = MedusaModel.from_pretrained(base, heads=tmp_path)
    assert again.heads.config.head_type == head_type and again.tree.paths == model.tree.paths
    hidden, next_token = torch.randn(TINY_HIDDEN), torch.tensor(5)
    with torch.no_grad():  # every head, fed the guesses of the heads before it where it reads them
        assert torch.equal(again.heads.own_guesses(hidden, next_token), model.heads.own_guesses(hidden, next_token))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_size", 0, "heads config: hidden_size must be at least 1, got 0"),
        ("vocab_size", -3, "heads config: vocab_size must be at least 1, got -3"),
        ("num_heads", 0, "heads config: num_heads must be at least 1, got 0"),
        ("num_layers", -1, "heads config: num_layers must be 0 or more, got -1"),
    ],
)
def test_bad_config_values(field, value, message):
    settings = {"hidden_size": TINY_HIDDEN, "vocab_size": TINY_VOCAB, field: value}
    with pytest.raises(MedusaError, match=message):
        MedusaHeadsConfig(**settings)


def save_heads(directory, hidden_size=TINY_HIDDEN, vocab_size=TINY_VOCAB, **settings):
    config = MedusaHeadsConfig(hidden_size=hidden_size, vocab_size=vocab_size, **settings)
    MedusaHeads(config).save_pretrained(directory)
    return directory


def test_hidden_size_mismatch_names_both_sizes(tmp_path):
    directory = save_heads(tmp_path / "heads", hidden_size=32)
    with pytest.raises(MedusaError, match="heads hidden size 32 does not match the base model's 64"):
        MedusaModel.from_pretrained(make_tiny_model("llama"), heads=directory)


def test_vocabulary_mismatch_names_both_sizes(tmp_path):
    directory = save_heads(tmp_path / "heads", vocab_size=300)
    with pytest.raises(MedusaError, match="heads vocabulary 300 does not match the base model's 256"):
        MedusaModel.from_pretrained(make_tiny_model("llama"), heads=directory)


def test_mismatched_heads_object_and_config_are_rejected():
    base = make_tiny_model("mistral")
    wrong = MedusaHeads(MedusaHeadsConfig(hidden_size=TINY_HIDDEN, vocab_size=128))
    with pytest.raises(MedusaError, match="heads vocabulary 128 does not match the base model's 256"):
        MedusaModel.from_pretrained(base, heads=wrong)
    with pytest.raises(MedusaError, match="heads hidden size 48 does not match the base model's 64"):
        MedusaModel.from_pretrained(base, heads=MedusaHeadsConfig(hidden_size=48, vocab_size=TINY_VOCAB))


def test_copy_projection_checks_the_lm_head_shape():
    config = MedusaHeadsConfig(hidden_size=32, vocab_size=TINY_VOCAB)
    with pytest.raises(MedusaError, match=r"base lm_head has shape \(256, 64\), heads expect \(256, 32\)"):
        MedusaHeads(config, base_lm_head=make_tiny_model("llama").get_output_embeddings())


def test_missing_heads_directory(tmp_path):
    missing = tmp_path / "no-such-heads"
    with pytest.raises(MedusaError, match=f"heads directory {missing} does not exist"):
        MedusaHeads.from_pretrained(missing)
    with pytest.raises(MedusaError, match=f"heads directory {missing} does not exist"):
        MedusaModel.from_pretrained(make_tiny_model("llama"), heads=missing)


def test_missing_weights_file(tmp_path):
    directory = save_heads(tmp_path)
    (directory / WEIGHTS_NAME).unlink()
    with pytest.raises(MedusaError, match=f"no heads weights at {directory / WEIGHTS_NAME}"):
        MedusaModel.from_pretrained(make_tiny_model("llama"), heads=directory)


def test_missing_config_file(tmp_path):
    directory = save_heads(tmp_path)
    (directory / CONFIG_NAME).unlink()
    with pytest.raises(MedusaError, match=f"no Medusa heads config at {directory / CONFIG_NAME}"):
        MedusaHeads.from_pretrained(directory)


def test_config_that_is_not_json(tmp_path):
    directory = save_heads(tmp_path)
    (directory / CONFIG_NAME).write_text("{hidden_size: 64")
    with pytest.raises(MedusaError, match="is not valid JSON"):
        MedusaHeadsConfig.load(directory)


def test_config_without_sizes(tmp_path):
    directory = save_heads(tmp_path)
    (directory / CONFIG_NAME).write_text(json.dumps({"num_heads": 4}))
    with pytest.raises(MedusaError, match="lacks hidden_size, vocab_size"):
        MedusaHeadsConfig.load(directory)


def test_weights_that_do_not_match_their_config(tmp_path):
    directory = save_heads(tmp_path, num_heads=2)
    config = json.loads((directory / CONFIG_NAME).read_text())
    config["num_heads"] = 3
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(MedusaError, match=r"do not match their config: missing \['blocks.2.0.linear.bias'"):
        MedusaHeads.from_pretrained(directory)
    config["num_heads"], config["num_layers"] = 2, 1
    config["hidden_size"] = 32
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(
        MedusaError, match=r"heads weight blocks.0.0.linear.bias has shape \(64,\), config implies \(32,\)"
    ):
        MedusaHeads.from_pretrained(directory)


def test_saving_heads_writes_the_weights_before_the_config_that_describes_them(tmp_path, monkeypatch):
    """A save that dies while writing the weights leaves the previous heads whole, config and weights alike."""
    base = make_tiny_model("llama")
    heads_for(base, num_heads=2).save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}

    def dying_save(*args, **kwargs):
        raise KeyboardInterrupt  # killed while writing the weights

    monkeypatch.setattr("medusa.heads.save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        heads_for(base, num_heads=3).save_pretrained(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)
    assert MedusaHeads.from_pretrained(tmp_path).config.num_heads == 2
