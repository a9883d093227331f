"""The walk estimate: replaying decoding's walk over per-position ranks, checked by hand and against decoding."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.models import make_tiny_model
from helpers.treeopt import fresh_heads, greedy_continuation
from medusa.engine import EngineOptions
from medusa.errors import MedusaError
from medusa.lookup import MAX_LOOKUP_NODES, ngram_continuation
from medusa.model import GenerationConfig, MedusaModel
from medusa.training.data import Example
from medusa.tree import Tree
from medusa.treeopt.build import build_tree, default_estimate, expected_length, expected_lengths, has_walk, node_chances
from medusa.treeopt.profile import PROFILE_FILE, HeadProfile, PositionRanks, lookup_depths, profile_heads
from medusa.treeopt.walk import accepted_depths, walk_steps

SHIPPED_PROFILE = Path(__file__).resolve().parents[2] / "src/medusa/assets/heads/smollm2-135m-instruct" / PROFILE_FILE


def ranks_profile(segments: list[list[tuple[int, ...]]], num_heads: int, topk: int) -> HeadProfile:
    """A profile whose every field is counted, by plain loops, from hand-made rank paths (-1: missed)."""
    rows = [list(r) for segment in segments for r in segment]
    cut = []
    for row in rows:  # nothing counts after the first miss
        first_miss = row.index(-1) if -1 in row else num_heads
        cut.append(row[:first_miss] + [-1] * (num_heads - first_miss))
    counts: Counter[tuple[int, ...]] = Counter()
    hits = np.zeros((num_heads, topk))
    for row in cut:
        for depth in range(num_heads):
            if row[depth] < 0:
                break
            counts[tuple(row[: depth + 1])] += 1
            hits[depth, row[depth]] += 1
    walk = PositionRanks(np.array(cut, dtype=np.int16).reshape(-1, num_heads), np.array([len(s) for s in segments]))
    return HeadProfile(num_heads, topk, (hits / len(rows)).tolist(), len(rows), None, dict(counts), position_ranks=walk)


# tree {[0], [0, 0], [1]}: a position accepts 2 tree tokens when heads 0 and 1 both had rank 0, 1 when only
# head 0 was right at rank 0 or 1 (a [0, 1] or [1, 0] node is not in the tree), else 0.
TREE = Tree.from_paths([[0], [0, 0], [1]])
A2, A0 = (0, 0), (-1, -1)
HAND = [
    [A2, A2, A2, A0, A0, A0],  # an easy stretch then a hard one: accepted 3 at t0, then 1 at t3, t4, t5
    [(1, 0), A2, (0, 1)],  # 2 at t0 ([1]; [1, 0] is no node), then t2: 2 ([0]; [0, 1] is no node)
    [A2, A0],  # one step of 3 runs past the answer's end; it counts whole, as decoding counts it
]


def test_walk_on_a_hand_checked_sequence():
    profile = ranks_profile(HAND, num_heads=2, topk=2)
    depths = accepted_depths(profile.position_ranks.ranks, TREE.paths, 2)
    assert depths.tolist() == [2, 2, 2, 0, 0, 0, 1, 2, 1, 2, 0]
    tokens, steps = walk_steps(depths, profile.position_ranks.segments)
    assert (tokens.tolist(), steps.tolist()) == ([(3 + 1 + 1 + 1) + (2 + 2) + 3], [4 + 2 + 1])
    assert expected_length(profile, TREE, "walk") == pytest.approx(13 / 7)
    # over all 11 positions the mean is 1 + 12 / 11 = 2.09: the uniform mean the joint estimate gives
    assert expected_length(profile, TREE, "joint") == pytest.approx(1 + 12 / 11)
    assert expected_length(profile, TREE, "walk") < expected_length(profile, TREE, "joint")
    # per node, the share of the walk's 7 steps accepting it (steps at seg1 t0, t3, t4, t5; seg2 t0, t2;
    # seg3 t0): [0] at 3 of them, [0, 0] at 2, [1] at 1; with the root they add up to the estimate
    chances = node_chances(profile, TREE, "walk")
    assert chances == pytest.approx({(0,): 3 / 7, (1,): 1 / 7, (0, 0): 2 / 7})
    assert 1 + sum(chances.values()) == pytest.approx(13 / 7)


def test_the_walk_follows_the_steps_not_a_formula_of_the_mean():
    # accepted 2 at t0 lands on t2 and strides over the hard t1, then 3 from t2 ends the answer
    profile = ranks_profile([[(1, -1), A0, A2, A0, A0]], num_heads=2, topk=2)
    assert expected_length(profile, TREE, "walk") == pytest.approx(5 / 2)
    assert expected_length(profile, TREE, "joint") == pytest.approx(1 + 3 / 5)  # here the walk is *above*


def reference_walk(depths: list[int], segments: list[int]) -> tuple[int, int]:
    tokens = steps = start = 0
    for length in segments:
        t = start
        while t < start + length:
            tokens += 1 + depths[t]
            steps += 1
            t += 1 + depths[t]
        start += length
    return tokens, steps


def clustered_profile(positions: int = 30_000, seed: int = 0) -> HeadProfile:
    """Text of easy and hard stretches: each stretch draws how likely its heads are right."""
    rng = np.random.default_rng(seed)
    num_heads, topk = 4, 5
    rows: list[tuple[int, ...]] = []
    while len(rows) < positions:
        easiness = rng.choice([0.1, 0.5, 0.95])
        for _ in range(rng.integers(2, 40)):
            rank = np.where(
                rng.random(num_heads) < easiness, np.minimum(rng.geometric(0.6, num_heads) - 1, topk - 1), -1
            )
            rows.append(tuple(int(r) for r in rank))
    rows = rows[:positions]
    cuts = np.sort(rng.choice(np.arange(1, positions), size=positions // 300, replace=False))
    bounds = [0, *cuts.tolist(), positions]
    return ranks_profile([rows[a:b] for a, b in zip(bounds, bounds[1:])], num_heads, topk)


def test_walk_matches_a_plain_loop_and_stays_below_joint_on_clustered_text():
    profile = clustered_profile()
    sizes = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    started = time.perf_counter()
    walk = expected_lengths(profile, sizes, "walk")
    assert time.perf_counter() - started < 5  # 30k positions, 16 trees: vectorised
    joint = expected_lengths(profile, sizes, "joint")
    assert walk[1] == joint[1] == 1.0
    for n in sizes[1:]:
        # steps start on hard stretches more often than a uniform draw of positions would
        assert walk[n] < joint[n] - 0.02, n
    segments = profile.position_ranks.segments.tolist()
    for n in (2, 8, 64):
        tree = build_tree(profile, n, "walk")
        tokens, steps = reference_walk(accepted_depths(profile.position_ranks.ranks, tree.paths, 5).tolist(), segments)
        assert walk[n] == pytest.approx(tokens / steps) == pytest.approx(expected_length(profile, tree, "walk"))
        # the uniform mean of the same depths is the joint estimate
        mean = 1 + accepted_depths(profile.position_ranks.ranks, tree.paths, 5).mean()
        assert joint[n] == pytest.approx(mean)
    # the walk estimate builds its trees in the joint order
    assert build_tree(profile, 32, "walk").paths == build_tree(profile, 32, "joint").paths


def test_position_ranks_round_trip_and_malformed_ones_are_refused(tmp_path):
    profile = clustered_profile(positions=3000)
    profile.save(tmp_path / "profile.json")
    loaded = HeadProfile.load(tmp_path / "profile.json")
    assert np.array_equal(loaded.position_ranks.ranks, profile.position_ranks.ranks)
    assert np.array_equal(loaded.position_ranks.segments, profile.position_ranks.segments)
    assert expected_lengths(loaded, [8, 32], "walk") == expected_lengths(profile, [8, 32], "walk")

    raw = json.loads((tmp_path / "profile.json").read_text())
    for change, message in [
        (lambda r: r["position_ranks"]["segments"].append(5), "add up to 3005"),
        (lambda r: r["position_ranks"].update(ranks="not base64!"), "cannot be decoded"),
        (lambda r: r["position_ranks"].update(positions=2000, segments=[2000]), "bytes, not 2000 positions"),
        (
            lambda r: r.update(topk=4, accuracy=[row[:4] for row in r["accuracy"]], path_counts=[]),
            "beyond the profile's top-4",
        ),
    ]:
        broken = json.loads(json.dumps(raw))
        change(broken)
        with pytest.raises(MedusaError, match=message):
            HeadProfile.from_dict(broken)


def test_a_profile_without_walk_data_still_loads(tmp_path):
    old = {
        "num_heads": 2,
        "topk": 2,
        "samples": 10,
        "accuracy": [[0.5, 0.2], [0.3, 0.1]],
        "path_counts": [[[0], 5], [[0, 0], 3], [[1], 2]],
    }
    (tmp_path / "old.json").write_text(json.dumps(old))
    profile = HeadProfile.load(tmp_path / "old.json")
    assert profile.position_ranks is None and not has_walk(profile) and default_estimate(profile) == "joint"
    assert expected_length(profile, TREE, "joint") == pytest.approx(2.0)
    with pytest.raises(MedusaError, match="run `medusa tree profile` again"):
        expected_length(profile, TREE, "walk")
    profile.save(tmp_path / "again.json")  # and saves without inventing any
    assert "position_ranks" not in json.loads((tmp_path / "again.json").read_text())
    # the shipped profile, whichever kind it is, loads and gives an estimate by default
    shipped = HeadProfile.load(SHIPPED_PROFILE)
    assert expected_lengths(shipped, [8], default_estimate(shipped))[8] > 1


def self_distilled(model, prompts, new_tokens: int) -> list[Example]:
    """The model's own greedy answers to ``prompts``, as profiling examples."""
    examples = []
    for prompt in prompts:
        answer = greedy_continuation(model, prompt, new_tokens)
        examples.append(Example(prompt + answer, [False] * len(prompt) + [True] * len(answer)))
    return examples


def walked_steps(depths, start: int, stop: int) -> list[int]:
    """Tokens each step of the walk accepts, for steps starting at ``start`` up to before ``stop``."""
    t, walked = start, []
    while t < stop:
        walked.append(1 + int(depths[t]))
        t += walked[-1]
    return walked


def test_walk_over_a_profile_replays_greedy_decoding_step_by_step():
    """On answers the model wrote greedily, the walk's steps are decoding's steps with the same tree."""
    model = make_tiny_model("llama", seed=1)
    heads = fresh_heads(model, 3)
    medusa = MedusaModel(model, None, heads)
    prompts = ([5, 9, 17, 33], [100, 7, 7, 7, 200, 12], [40, 41, 42])
    profile = profile_heads(model, heads, self_distilled(model, prompts, 48), topk=4, chunk=16)
    walk = profile.position_ranks
    assert walk.segments.tolist() == [48 - 3] * 3 and walk.positions == profile.samples
    tree = Tree.from_paths([[0], [1], [0, 0], [0, 1], [0, 0, 0], [2]])
    depths = accepted_depths(walk.ranks, tree.paths, 4)
    assert depths.max() >= 2  # the case is not trivial: decoding does accept deep paths here
    start = 0
    for prompt, length in zip(prompts, walk.segments.tolist()):
        walked = walked_steps(depths, start, start + length)
        start += length
        stats = decoded_stats(medusa, prompt, 48, tree)
        assert stats.accepted_per_step[: len(walked)] == walked
    # and the profile's estimate is the same ratio
    tokens, steps = walk_steps(depths, walk.segments)
    assert expected_length(profile, tree, "walk") == pytest.approx(tokens[0] / steps[0])


def decoded_stats(medusa: MedusaModel, prompt: list[int], max_new_tokens: int, tree: Tree):
    """Decoding's statistics with this tree (its lookup chain included), EOS ignored as in the profile."""
    generation = medusa.prepare(prompt, GenerationConfig(max_new_tokens=max_new_tokens, chat_template=False))
    generation.eos_token_ids = frozenset()
    engine = medusa.engine(EngineOptions(), tree, max_length=len(prompt) + max_new_tokens)
    for _ in engine.run([generation]):
        pass
    return generation.stats


def test_walk_positions_are_capped_and_runs_follow_the_answers():
    model = make_tiny_model("llama", seed=1)
    heads = fresh_heads(model, 3)
    two_turns = Example(
        [5, 6] + [7, 8, 9, 10, 11] + [12, 13] + [14, 15, 16, 17, 18, 19],
        [False] * 2 + [True] * 5 + [False] * 2 + [True] * 6,
    )
    full = profile_heads(model, heads, [two_turns, two_turns], topk=2)
    assert full.position_ranks.segments.tolist() == [2, 3, 2, 3]
    capped = profile_heads(model, heads, [two_turns, two_turns], topk=2, walk_positions=6)
    assert capped.samples == 10 and capped.position_ranks.segments.tolist() == [2, 3, 1]
    assert np.array_equal(capped.position_ranks.ranks, full.position_ranks.ranks[:6])
    # the kept ranks agree with the joint counts
    counts = Counter()
    for row in full.position_ranks.ranks.tolist():
        for depth in range(3):
            if row[depth] < 0:
                break
            counts[tuple(row[: depth + 1])] += 1
    assert dict(counts) == full.path_counts


def test_walk_with_a_lookup_branch_replays_decoding_with_that_branch():
    """The profile's lookup depths are the decoder's own lookup guesses: the walk taking the longer of the
    heads' path and the chain gives decoding's accepted tokens, step by step."""
    model = make_tiny_model("llama", seed=1)
    heads = fresh_heads(model, 3)
    medusa = MedusaModel(model, None, heads)
    # repeats in the prompts give the lookup something to copy; the tiny model's greedy answers loop too
    prompts = ([5, 9, 17, 33, 5, 9, 17], [100, 7, 7, 7, 200, 12, 100, 7], [40, 41, 42, 40, 41])
    profile = profile_heads(model, heads, self_distilled(model, prompts, 96), topk=4, chunk=16)
    walk = profile.position_ranks
    assert walk.lookup is not None and walk.lookup.shape == (walk.positions,)
    heads_only = Tree.from_paths([[0], [1], [0, 0]])
    for lookup in (3, 10):
        tree = heads_only.with_lookup(lookup)
        depths = np.maximum(accepted_depths(walk.ranks, tree.paths, 4), np.minimum(walk.lookup, lookup))
        assert (np.minimum(walk.lookup, lookup) > accepted_depths(walk.ranks, tree.paths, 4)).any()  # the chain matters
        start = 0
        for prompt, length in zip(prompts, walk.segments.tolist()):
            # near its end the answer cannot confirm a long chain that decoding (writing on) accepts
            walked = walked_steps(depths, start, start + length - lookup)
            start += length
            stats = decoded_stats(medusa, prompt, 96, tree)
            assert len(walked) > 8 and stats.accepted_per_step[: len(walked)] == walked, lookup
        tokens, steps = walk_steps(depths, walk.segments)
        assert expected_length(profile, tree, "walk") == pytest.approx(tokens[0] / steps[0])
        greedy = build_tree(profile, 4, "walk").with_lookup(lookup)
        assert expected_lengths(profile, [4], "walk", lookup=lookup)[4] == pytest.approx(
            expected_length(profile, greedy, "walk")
        )
        assert expected_length(profile, tree, "walk") > expected_length(profile, heads_only, "walk")


@pytest.mark.parametrize("chunk", [1, 7, 256])
def test_lookup_depths_search_all_positions_at_once_as_the_decoder_searches_each(chunk):
    """Each position t's depth is what the decoder's own search accepts from its buffer at t: ``ids[: t + 1]``, the
    root ``greedy[t]``, and spare slots. Positions are searched in chunks, one buffer row each."""
    generator = torch.Generator().manual_seed(chunk)
    motif = torch.randint(3, 12, (9,), generator=generator)
    ids = torch.cat([motif, torch.randint(3, 12, (20,), generator=generator), motif, motif[:5], motif])  # repeats
    greedy = torch.where(torch.rand(ids.numel(), generator=generator) < 0.8, ids.roll(-1), 0)  # mostly the text
    answer = torch.zeros(ids.numel(), dtype=torch.bool)
    answer[12:] = True
    positions = torch.arange(11, ids.numel() - 1)
    expected = []
    for t in positions.tolist():
        buffer = torch.cat((ids[: t + 1], greedy[t : t + 1], torch.zeros(MAX_LOOKUP_NODES, dtype=torch.long)))
        guesses = ngram_continuation(buffer[None], torch.tensor([t + 1]), 3, MAX_LOOKUP_NODES)[0]
        depth = 0
        for i, guess in enumerate(guesses.tolist(), start=1):  # the guess at depth i aims at t + 1 + i
            if t + 1 + i >= ids.numel() or not answer[t + 1 + i] or guess != greedy[t + i]:
                break
            depth += 1
        expected.append(depth)
    depths = lookup_depths(ids, greedy, answer, positions, 3, chunk=chunk)
    assert depths.dtype == torch.uint8
    assert depths.tolist() == expected
    assert max(expected) >= 3 and sum(expected) > 10  # the repeats were found and accepted, several tokens deep


def test_lookup_depths_round_trip_and_profiles_without_them_refuse_a_lookup_branch(tmp_path):
    profile = clustered_profile(positions=2000)
    rng = np.random.default_rng(3)
    profile.position_ranks.lookup = rng.integers(0, 25, size=2000).astype(np.uint8)
    profile.save(tmp_path / "profile.json")
    loaded = HeadProfile.load(tmp_path / "profile.json")
    assert np.array_equal(loaded.position_ranks.lookup, profile.position_ranks.lookup)
    assert loaded.position_ranks.lookup_ngram == 3
    tree = build_tree(profile, 8, "walk").with_lookup(5)
    assert expected_length(loaded, tree, "walk") == expected_length(profile, tree, "walk")
    with pytest.raises(MedusaError, match="only be estimated by the walk estimate"):
        expected_length(profile, tree, "joint")

    raw = json.loads((tmp_path / "profile.json").read_text())
    broken = json.loads(json.dumps(raw))
    broken["position_ranks"]["lookup_ngram"] = 0
    with pytest.raises(MedusaError, match="lookup_ngram must be a positive integer"):
        HeadProfile.from_dict(broken)
    broken["position_ranks"].update(lookup_ngram=3, positions=1000, segments=[1000])
    with pytest.raises(MedusaError, match="bytes, not 1000 positions"):
        HeadProfile.from_dict(broken)

    without = clustered_profile(positions=2000)  # made before the lookup was profiled
    assert without.position_ranks.lookup is None
    with pytest.raises(MedusaError, match="did not measure the lookup branch"):
        expected_lengths(without, [8], "walk", lookup=4)
    assert expected_lengths(without, [8], "walk") == expected_lengths(profile, [8], "walk")


def test_the_walk_reads_only_as_many_positions_of_each_answer_as_decoding_generates():
    profile = ranks_profile(HAND, num_heads=2, topk=2)
    profile.position_ranks.lookup = np.arange(11, dtype=np.uint8)
    short = profile.for_new_tokens(2)
    assert short.position_ranks.segments.tolist() == [2, 2, 2]
    assert short.position_ranks.lookup.tolist() == [0, 1, 6, 7, 9, 10]  # each answer's first two positions
    # depths [2, 2 | 1, 2 | 2, 0]: one step of 3 ends the first answer, one of 2 the second, one of 3 the third
    assert expected_length(short, TREE, "walk") == pytest.approx(8 / 3)
    assert (short.samples, short.path_counts) == (profile.samples, profile.path_counts)  # joint counts are untouched
    assert profile.for_new_tokens(None) is profile and profile.for_new_tokens(100).position_ranks.positions == 11
    with pytest.raises(MedusaError, match="positive integer"):
        profile.position_ranks.first(0)
