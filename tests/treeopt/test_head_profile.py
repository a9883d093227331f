"""Profiling heads by teacher forcing, on a tiny model whose untrained heads are its own lm_head."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.heads import sequential_heads
from helpers.models import TINY_VOCAB, make_tiny_model
from helpers.treeopt import fresh_heads, greedy_continuation
from medusa.errors import MedusaError
from medusa.training.data import Example
from medusa.treeopt.profile import HeadProfile, heads_fingerprint, profile_heads

NUM_HEADS, TOPK = 3, 4


def answered(prompt: list[int], answer: list[int]) -> Example:
    return Example(prompt + answer, [False] * len(prompt) + [True] * len(answer))


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_model("llama", seed=1)
    sequences = []
    for prompt in ([5, 9, 17, 33], [40, 41, 42], [100, 7, 7, 7, 200, 12]):
        sequences.append(answered(prompt, greedy_continuation(model, prompt, 40)))
    heads = fresh_heads(model, NUM_HEADS)
    return model, heads, sequences


def test_untrained_heads_score_as_often_as_the_base_model_repeats_itself(setup):
    model, heads, sequences = setup
    profile = profile_heads(model, heads, sequences, topk=TOPK, chunk=16)  # small chunks: several per sequence

    # Independently: an untrained head's guesses are the base model's top-k at t, and head k is right
    # when the base model's argmax at t + k + 1 is among them.
    hits = torch.zeros(NUM_HEADS, TOPK)
    positions = 0
    with torch.inference_mode():
        for sequence in sequences:
            logits = model(torch.tensor([sequence.input_ids])).logits[0]
            greedy, top = logits.argmax(-1), logits.topk(TOPK, dim=-1).indices
            start = sequence.loss_mask.index(True)
            for t in range(start - 1, len(sequence.input_ids) - NUM_HEADS - 1):
                positions += 1
                for k in range(NUM_HEADS):
                    rank = (top[t] == greedy[t + k + 1]).nonzero()
                    if rank.numel():
                        hits[k, rank[0, 0]] += 1
    assert profile.samples == positions == sum(sum(s.loss_mask) - NUM_HEADS for s in sequences)
    assert len(profile.accuracy) == NUM_HEADS and all(len(row) == TOPK for row in profile.accuracy)
    assert torch.tensor(profile.accuracy) == pytest.approx(hits / positions)
    assert hits[0, 0] > 0 and hits.sum() > hits[:, 0].sum()  # the case is not trivially all zeros

    # head 0 rank 0 alone is how often the base model's argmax at t equals its argmax at t + 1
    repeats = sum(
        int(g[t] == g[t + 1])
        for s in sequences
        for g in [model(torch.tensor([s.input_ids])).logits[0].argmax(-1)]
        for t in range(s.loss_mask.index(True) - 1, len(s.input_ids) - NUM_HEADS - 1)
    )
    assert profile.accuracy[0][0] == pytest.approx(repeats / positions)

    # joint counts: one-node paths are the table; deeper paths never beat their prefix
    for rank in range(TOPK):
        assert profile.path_counts.get((rank,), 0) == round(profile.accuracy[0][rank] * positions)
    for path, count in profile.path_counts.items():
        assert len(path) == 1 or count <= profile.path_counts[path[:-1]]


def test_positions_too_close_to_the_end_are_not_measured(setup):
    model, heads, _ = setup
    short = [answered([5, 6, 7], [8, 9])]  # t = 2 needs tokens 3 .. 2 + 3 + 1 = 6 in the answer
    assert profile_heads(model, heads, short, topk=2).samples == 0
    exact = [answered([5, 6, 7], [8, 9, 10, 11])]
    assert profile_heads(model, heads, exact, topk=2).samples == 1
    # two answers in one conversation: the window never reaches across the user's turn between them
    two_turns = Example(
        [5, 6] + [7, 8, 9, 10, 11] + [12, 13] + [14, 15, 16, 17, 18, 19],
        [False] * 2 + [True] * 5 + [False] * 2 + [True] * 6,
    )
    assert profile_heads(model, heads, [two_turns], topk=2).samples == (5 - 3) + (6 - 3)
    with pytest.raises(MedusaError, match="differ in length"):
        profile_heads(model, heads, [Example([5, 6, 7], [False, True])], topk=2)


def test_profile_round_trips_and_refuses_other_heads(setup, tmp_path):
    model, heads, sequences = setup
    heads.save_pretrained(tmp_path / "heads")
    fingerprint = heads_fingerprint(tmp_path / "heads")
    profile = profile_heads(model, heads, sequences[:1], topk=TOPK, fingerprint=fingerprint)
    profile.save(tmp_path / "profile.json")
    loaded = HeadProfile.load(tmp_path / "profile.json")
    assert loaded.path_counts == profile.path_counts and loaded.samples == profile.samples
    assert torch.tensor(loaded.accuracy) == pytest.approx(torch.tensor(profile.accuracy), abs=1e-6)
    loaded.check_heads(NUM_HEADS, fingerprint)  # the same heads pass
    with pytest.raises(MedusaError, match="measured on 3 heads, but these heads have 4"):
        loaded.check_heads(4)
    with pytest.raises(MedusaError, match="other heads weights"):
        loaded.check_heads(NUM_HEADS, "sha256:0000000000000000")
    assert json.loads((tmp_path / "profile.json").read_text())["head_type"] == "medusa"
    loaded.check_heads(NUM_HEADS, fingerprint, head_type="medusa")
    with pytest.raises(MedusaError, match="measured on medusa heads, but these heads are sequential; run `medusa tree"):
        loaded.check_heads(NUM_HEADS, fingerprint, head_type="sequential")
    raw = json.loads((tmp_path / "profile.json").read_text())
    del raw["head_type"]  # a profile from before sequential heads measured Medusa heads
    assert HeadProfile.from_dict(raw).head_type == "medusa"
    with pytest.raises(MedusaError, match="head_type must be one of medusa, sequential, got 'eagle'"):
        HeadProfile.from_dict(raw | {"head_type": "eagle"})


def test_sequential_heads_are_profiled_on_the_tokens_greedy_verification_accepts(setup):
    """Head k at t reads the base model's greedy tokens after t .. t + k, not the data's tokens (here random answers,
    unlike the greedy ones) and not the same tokens shifted by one."""
    model, _, _ = setup
    heads = sequential_heads(model, num_heads=NUM_HEADS, path_gain=10)
    generator = torch.Generator().manual_seed(5)
    sequences = [
        answered(prompt, torch.randint(4, TINY_VOCAB, (30,), generator=generator).tolist())
        for prompt in ([5, 9, 17, 33], [100, 7, 7, 7, 200, 12])
    ]
    profile = profile_heads(model, heads, sequences, topk=TOPK, chunk=8)
    assert profile.head_type == "sequential"
    hits, ranks = torch.zeros(NUM_HEADS, TOPK), []
    with torch.inference_mode():
        for sequence in sequences:
            output = model(torch.tensor([sequence.input_ids]), output_hidden_states=True)
            greedy, hidden = output.logits[0].argmax(-1), output.hidden_states[-1][0]
            assert not torch.equal(greedy[:-1], torch.tensor(sequence.input_ids[1:]))  # the answers are not greedy
            for t in range(sequence.loss_mask.index(True) - 1, len(sequence.input_ids) - NUM_HEADS - 1):
                row = []
                for k in range(NUM_HEADS):
                    top = heads.head_logits(k, hidden[t], greedy[t : t + k + 1]).topk(TOPK).indices
                    rank = (top == greedy[t + k + 1]).nonzero()
                    row.append(int(rank[0, 0]) if rank.numel() else -1)
                    if rank.numel():
                        hits[k, rank[0, 0]] += 1
                alive = torch.tensor(row).ge(0).long().cumprod(0).bool()
                ranks.append(torch.where(alive, torch.tensor(row), -1).tolist())
    assert torch.tensor(profile.accuracy) == pytest.approx(hits / profile.samples)
    assert profile.position_ranks.ranks.tolist() == ranks
    assert hits[1:].sum() > 0  # deeper heads are right at times: their path matters to the comparison


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw.update(topk=5), "accuracy row 0 must hold top-5 values"),
        (lambda raw: raw.update(num_heads=2), "one row per head"),
        (lambda raw: raw["accuracy"][1].__setitem__(0, 1.5), "between 0 and 1"),
        (lambda raw: raw["accuracy"][0].__setitem__(1, 0.9), "add up to more than 1"),
        (lambda raw: raw.update(path_counts=[[[0, 9], 1]]), "does not fit 3 heads of top-4"),
        (lambda raw: raw.update(path_counts=[[[0], 999]]), "outside 0..100"),
        (lambda raw: raw.pop("samples"), "samples must be"),
    ],
)
def test_malformed_profiles_are_refused(tmp_path, change, message):
    raw = {"num_heads": 3, "topk": 4, "samples": 100, "accuracy": [[0.5, 0.1, 0, 0]] * 3, "path_counts": [[[0], 50]]}
    raw = json.loads(json.dumps(raw))
    change(raw)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(MedusaError, match=message):
        HeadProfile.load(path)


def test_topk_beyond_the_vocabulary_is_refused(setup):
    model, heads, sequences = setup
    with pytest.raises(MedusaError, match="topk must be between 1 and the vocabulary size 256"):
        profile_heads(model, heads, sequences, topk=1000)
