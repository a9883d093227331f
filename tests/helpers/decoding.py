"""Reference decoding for the lossless tests: transformers' own greedy answers, and an oracle that makes heads right.

Untrained or random heads are rarely right, so most steps accept nothing and would leave the cache
compaction untested. The oracle decoder fixes that: it proposes the true greedy continuation at random
top-k ranks of each head, so paths of two to five tokens are accepted, mostly on branches other than
the first, and their K/V must be moved into place for the next step to be right.
"""

from __future__ import annotations

import random
from functools import cache

import torch

from helpers.models import ARCHITECTURES, TINY_VOCAB, make_tiny_model
from medusa.decoding import MedusaDecoder

CUSTOM_TREE = [[0], [1], [2], [0, 0], [1, 0], [0, 1], [2, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0, 0]]


def random_prompts(count: int, seed: int) -> list[list[int]]:
    """Prompts of 1 to 24 ordinary tokens (ids 0-3 are pad, BOS, unknown and EOS)."""
    rng = random.Random(seed)
    return [[rng.randrange(4, TINY_VOCAB) for _ in range(rng.randint(1, 24))] for _ in range(count)]


PROMPTS = random_prompts(3, seed=0)  # shared by the lossless tests, so each reference is computed once


def plain_greedy(base, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The reference: transformers' own greedy decoding with its own cache."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = base.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


@cache
def reference(architecture: str, prompt: tuple[int, ...], max_new_tokens: int) -> tuple[int, ...]:
    return tuple(plain_greedy(make_tiny_model(architecture), list(prompt), max_new_tokens))


def architecture_of(model) -> str:
    return next(name for name, (_, model_class, _) in ARCHITECTURES.items() if isinstance(model, model_class))


class OracleDecoder(MedusaDecoder):
    """Puts the true greedy continuation at the ranks of a chosen deep tree path, random tokens elsewhere."""

    def __init__(self, *args, truth: list[int], seed: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.truth = truth  # prompt + greedy continuation, longer than what is decoded
        self.rng = random.Random(seed)
        self.targets: list[tuple[int, ...]] = []
        self.deep_paths = [path for path in self.tree.paths if len(path) >= 2]

    def propose(self) -> torch.Tensor:
        length = int(self.length)
        # The root is the base model's own token: if decoding were off, it would differ from the truth.
        assert int(self.root_token) == self.truth[length], f"decoding diverged at position {length}"
        target = self.rng.choice(self.deep_paths)
        self.targets.append(target)
        num_heads, topk, vocab = self.heads.config.num_heads, self.tree.topk, self.heads.config.vocab_size
        top = torch.empty(num_heads, topk, dtype=torch.long)
        for head in range(num_heads):
            position = length + 1 + head  # head k guesses the token k + 2 ahead of the last committed one
            true = self.truth[position] if position < len(self.truth) else -1
            for rank in range(topk):
                top[head, rank] = (true + self.rng.randrange(1, vocab)) % vocab
            rank = target[head] if head < len(target) else self.rng.randrange(topk)
            if true >= 0:
                top[head, rank] = true
        flat = torch.cat([self.root_token.view(1), top.flatten()])
        return flat[self.tree.candidate_index]
