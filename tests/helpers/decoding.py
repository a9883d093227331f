"""Reference decoding for the lossless tests: transformers' own greedy answers, and an oracle that makes heads right.

Untrained or random heads are rarely right, so most steps would accept nothing and leave the cache
compaction untested. The oracle plants each row's true greedy continuation at the ranks of a randomly chosen
deep tree path (random tokens elsewhere), so paths of two to five tokens are accepted, mostly on branches
other than the first, and their K/V must be moved into place, per row, for the next step to be right.
"""

from __future__ import annotations

import random
from functools import cache

import torch

from helpers.models import ARCHITECTURES, TINY_VOCAB, make_tiny_model
from medusa.acceptance import GreedyAcceptance
from medusa.decoding import Decoder, DecodingStats
from medusa.engine import DecodingEngine, EngineOptions, Generation
from medusa.heads import MedusaHeads, MedusaHeadsConfig
from medusa.speculation import SpeculationSwitch
from medusa.tree import Tree

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


class OracleDecoder(Decoder):
    """Puts each row's true greedy continuation at the ranks of a chosen deep tree path, random tokens elsewhere."""

    truths: list[list[int]]  # per running row: prompt + greedy continuation, longer than what is decoded

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rng = random.Random(0)
        self.targets: list[tuple[int, ...]] = []
        self.truths = []

    def propose(self, rows: int, tree: Tree) -> torch.Tensor:
        if not tree.paths:
            return super().propose(rows, tree)
        num_heads, topk, vocab = self.heads.config.num_heads, tree.topk, self.heads.config.vocab_size
        deep_paths = [path for path in tree.paths if len(path) >= 2]
        flat = []
        for row in range(rows):
            truth = self.truths[row] if row < len(self.truths) else []
            length = int(self.lengths[row])
            # The root is the base model's own token: if decoding were off, it would differ (a released row, whose
            # overlapped extra step is never read, holds no text).
            if truth and bool(self.active[row]):
                assert int(self.root_token[row]) == truth[length], f"row {row} diverged at position {length}"
            target = self.rng.choice(deep_paths)
            self.targets.append(target)
            top = torch.empty(num_heads, topk, dtype=torch.long)
            for head in range(num_heads):
                position = length + 1 + head  # head k guesses the token k + 2 ahead of the last committed one
                true = truth[position] if position < len(truth) else -1
                for rank in range(topk):
                    top[head, rank] = (true + self.rng.randrange(1, vocab)) % vocab
                rank = target[head] if head < len(target) else self.rng.randrange(topk)
                if true >= 0:
                    top[head, rank] = true
            flat.append(torch.cat([self.root_token[row].view(1), top.flatten().to(self.device)]))
        return torch.stack(flat)[:, tree.candidate_index]


class OracleEngine(DecodingEngine):
    decoder_class = OracleDecoder

    def step(self):
        self.decoder.truths = [[] if g is None else self.truth_of[id(g)] for g in self.rows]
        return super().step()


def oracle_heads(base, num_heads: int = 4) -> MedusaHeads:
    return MedusaHeads(
        MedusaHeadsConfig(hidden_size=base.config.hidden_size, vocab_size=TINY_VOCAB, num_heads=num_heads),
        base_lm_head=base.get_output_embeddings(),
    )


def oracle_engine(
    base,
    tree: Tree,
    num_heads: int = 4,
    max_rows: int = 1,
    max_length: int = 64,
    span_step: int | None = None,
    heads: MedusaHeads | None = None,
    overlap: bool | None = None,
    ragged: bool | None = None,
) -> OracleEngine:
    """An engine whose steps propose with the oracle; ``heads`` (default: fresh ones) only set the shapes."""
    engine = OracleEngine(
        base,
        heads or oracle_heads(base, num_heads),
        lambda bucket: tree,
        EngineOptions(attention_span_step=span_step, overlap=overlap, ragged_attention=ragged),
        max_rows=max_rows,
        max_length=max_length,
    )
    engine.truth_of = {}
    return engine


def oracle_generation(
    engine: OracleEngine, prompt: list[int], truth: list[int], max_new_tokens: int, eos: set[int]
) -> Generation:
    generation = Generation(torch.tensor(prompt), max_new_tokens, GreedyAcceptance(), eos_token_ids=frozenset(eos))
    engine.truth_of[id(generation)] = prompt + list(truth)
    return generation


def oracle_run(
    base,
    tree: Tree,
    prompt: list[int],
    max_new_tokens: int,
    eos: set[int],
    num_heads: int = 4,
    continuation: list[int] | None = None,
    span_step: int | None = None,
    spare_slots: int = 0,
) -> tuple[list[int], DecodingStats, OracleEngine]:
    """Decode one prompt with the oracle; return (tokens, stats, engine). ``continuation``: the base's greedy
    answer, if known; ``span_step``: attention spans of that many slots; ``spare_slots``: cache slots beyond
    what is needed."""
    if continuation is None:
        continuation = plain_greedy(base, prompt, max_new_tokens + num_heads + 2)
    engine = oracle_engine(
        base, tree, num_heads, max_length=len(prompt) + max_new_tokens + spare_slots, span_step=span_step
    )
    generation = oracle_generation(engine, prompt, continuation, max_new_tokens, eos)
    for _ in engine.run([generation]):
        pass
    return generation.tokens, generation.stats, engine


def run_in_engine(engine: DecodingEngine, model, prompts, configs, max_rows: int | None = None) -> list[Generation]:
    """Decode ``prompts`` (with their ``configs``) to their ends on ``engine``, at most ``max_rows`` running at once."""
    generations = [model.prepare(prompt, config) for prompt, config in zip(prompts, configs)]
    for _ in engine.run(generations, max_rows):
        pass
    return generations


class AlternatingSwitch(SpeculationSwitch):
    """An adaptive switch that runs plain on every other step, whatever was measured: both modes run, one after the
    other (``choices``: each step's mode, in launch order)."""

    def __init__(self) -> None:
        super().__init__()
        self.choices: list[bool] = []

    def plain(self, key) -> bool:
        self.choices.append(len(self.choices) % 2 == 1)
        return self.choices[-1]
