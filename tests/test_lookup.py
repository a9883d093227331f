"""The lookup branch: its n-gram search by hand and against a plain loop, its tree, and decoding with it."""

from __future__ import annotations

import random

import pytest
import torch

from helpers.decoding import PROMPTS, reference
from helpers.models import ARCHITECTURES, make_tiny_model
from medusa.engine import EngineOptions
from medusa.errors import MedusaError
from medusa.lookup import MAX_LOOKUP_NODES, ngram_continuation
from medusa.model import MedusaModel
from medusa.tree import Tree

T, F = True, False


def continuation(text: list[int], max_ngram: int, count: int, garbage: int = 3) -> list[int]:
    """The search on ``text``, with ``garbage`` junk slots after it that it must ignore."""
    history = torch.tensor(text + [99] * garbage)
    return ngram_continuation(history[None], torch.tensor([len(text) - 1]), max_ngram, count)[0].tolist()


def plain_continuation(text: list[int], max_ngram: int, count: int) -> list[int] | None:
    """The reference, as a plain loop: None where nothing matched (the guesses are then arbitrary)."""
    last = len(text) - 1
    for n in range(min(max_ngram, len(text)), 0, -1):
        suffix = text[last - n + 1 :]
        for start in range(last - n, -1, -1):  # the most recent occurrence first
            if text[start : start + n] == suffix:
                follow = start + n
                period = last + 1 - follow
                return [text[follow + i % period] for i in range(count)]
    return None


def test_by_hand():
    # "5 6" occurred at 0: what followed it, then the loop it implies.
    assert continuation([5, 6, 7, 8, 5, 6], max_ngram=3, count=4) == [7, 8, 5, 6]
    assert continuation([5, 6, 7, 8, 5, 6], max_ngram=3, count=6) == [7, 8, 5, 6, 7, 8]
    # The longer match (1 2 3 at 0) beats the more recent shorter one (2 3 at 5).
    assert continuation([1, 2, 3, 7, 9, 2, 3, 8, 1, 2, 3], max_ngram=3, count=4) == [7, 9, 2, 3]
    # ... unless the search is limited to 2 tokens: then the most recent "2 3" wins.
    assert continuation([1, 2, 3, 7, 9, 2, 3, 8, 1, 2, 3], max_ngram=2, count=2) == [8, 1]
    # Among occurrences of the same length, the most recent.
    assert continuation([4, 5, 1, 4, 6, 2, 4], max_ngram=3, count=4) == [6, 2, 4, 6]
    # A token repeated: the loop of period 1.
    assert continuation([3, 9, 9], max_ngram=3, count=3) == [9, 9, 9]
    # Slots past the text never match, even when they would make a longer one.
    assert continuation([5, 6, 5], max_ngram=3, count=3, garbage=0) == [6, 5, 6]
    history = torch.tensor([5, 6, 5, 6, 5, 6, 1])
    assert ngram_continuation(history[None], torch.tensor([2]), 3, 3)[0].tolist() == [6, 5, 6]


def test_rows_search_their_own_text():
    """A batch of rows, each its own text and length: the same guesses as each row searched alone."""
    texts = [[5, 6, 7, 8, 5, 6], [1, 2, 3, 7, 9, 2, 3, 8, 1, 2, 3], [3, 9, 9], [4, 5, 1, 4, 6, 2, 4]]
    history = torch.full((len(texts), 16), 99)
    for row, text in enumerate(texts):
        history[row, : len(text)] = torch.tensor(text)
    last = torch.tensor([len(text) - 1 for text in texts])
    batched = ngram_continuation(history, last, 3, 4).tolist()
    assert batched == [continuation(text, 3, 4) for text in texts]


def test_no_match_guesses_something_from_the_text():
    guesses = continuation([1, 2, 3], max_ngram=3, count=4)
    assert len(guesses) == 4 and set(guesses) <= {1, 2, 3}
    assert continuation([7], max_ngram=3, count=2) == [7, 7]


def test_agrees_with_a_plain_loop_on_random_texts():
    rng = random.Random(0)
    checked = 0
    for _ in range(400):
        text = [rng.randrange(4) for _ in range(rng.randint(1, 30))]
        max_ngram, count = rng.randint(1, 4), rng.randint(1, 8)
        expected = plain_continuation(text, max_ngram, count)
        if expected is not None:
            assert continuation(text, max_ngram, count, garbage=rng.randint(count, 40)) == expected, (text, max_ngram)
            checked += 1
    assert checked > 300


def test_tree_with_a_lookup_chain_by_hand():
    tree = Tree.from_paths([[0], [1], [0, 0]], lookup=2)
    # nodes: 0 root, 1 [0], 2 [1], 3 [0, 0], 4 lookup 1, 5 lookup 2
    assert tree.size == 6 and tree.max_depth == 2 and tree.lookup == 2 and tree.max_children == 3
    assert tree.depths.tolist() == [0, 1, 1, 2, 1, 2]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 0, 4]
    # candidates are [root, lookup 1, lookup 2, head0 top-2, head1 top-2]
    assert tree.candidate_index.tolist() == [0, 3, 4, 5, 1, 2]
    assert tree.sibling_rank.tolist() == [0, 0, 1, 0, 2, 0]
    assert tree.attention_mask.tolist() == [
        [T, F, F, F, F, F],
        [T, T, F, F, F, F],
        [T, F, T, F, F, F],
        [T, T, F, T, F, F],
        [T, F, F, F, T, F],
        [T, F, F, F, T, T],
    ]
    assert tree.retrieve_paths.tolist() == [[0, 2, 0], [0, 1, 3], [0, 4, 5]]
    assert tree.retrieve_valid.tolist() == [[T, T, F], [T, T, T], [T, T, T]]


def test_lookup_chain_alone_and_deeper_than_the_heads():
    alone = Tree.from_paths([], lookup=3)
    assert alone.size == 4 and alone.max_depth == 3
    assert alone.retrieve_paths.tolist() == [[0, 1, 2, 3]] and alone.candidate_index.tolist() == [0, 1, 2, 3]
    deep = Tree.from_paths([[0]], lookup=5)
    deep.check_heads(1)  # the chain needs no heads
    assert deep.max_depth == 5 and deep.with_lookup(0).size == 2 and deep.with_lookup(5) is deep


@pytest.mark.parametrize("bad", [-1, MAX_LOOKUP_NODES + 1, 1.5, True])
def test_bad_lookup_sizes_are_refused(bad):
    with pytest.raises(MedusaError, match="lookup"):
        EngineOptions(lookup=bad)
    if not isinstance(bad, float) and bad is not True and bad < 0:
        with pytest.raises(MedusaError, match="lookup"):
            Tree.from_paths([[0]], lookup=bad)


@pytest.mark.parametrize("bad", [0, 9, 2.0])
def test_bad_ngram_is_refused(bad):
    with pytest.raises(MedusaError, match="n-gram size must be an integer from 1 to 8"):
        EngineOptions(lookup=4, lookup_ngram=bad)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_greedy_with_lookup_is_lossless(architecture):
    base = make_tiny_model(architecture)
    model = MedusaModel.from_pretrained(base, tree="16")
    for prompt in PROMPTS:
        expected = list(reference(architecture, tuple(prompt), 32))
        for use_heads in (True, False):
            result = model.generate(prompt, max_new_tokens=32, lookup=6, use_heads=use_heads)
            assert result.token_ids == expected, (prompt, use_heads)


def test_lookup_accepts_copied_text():
    """Tiny random models fall into loops; copying the loop accepts whole chains, which no head could."""
    base = make_tiny_model("gemma")
    model = MedusaModel.from_pretrained(base, tree=[[0]])
    prompt = PROMPTS[0]
    plain = model.generate(prompt, max_new_tokens=48, use_heads=False)
    copied = model.generate(prompt, max_new_tokens=48, use_heads=False, lookup=8)
    assert copied.token_ids == plain.token_ids
    assert plain.stats.mean_accepted == 1.0
    assert copied.stats.mean_accepted > 3.0
    assert max(copied.stats.accepted_per_step) == 9  # root and the whole chain


def test_sampling_with_lookup_is_reproducible():
    model = MedusaModel.from_pretrained(make_tiny_model("llama"), tree="8")
    runs = [
        model.generate(PROMPTS[1], max_new_tokens=24, temperature=0.8, seed=3, lookup=4).token_ids for _ in range(2)
    ]
    assert runs[0] == runs[1] and runs[0]
