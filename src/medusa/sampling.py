"""Sampling parameters: how the base model's logits become the distribution a sampled answer follows.

Temperature, then top-k, then top-p, in the order transformers' ``generate`` applies them, so "the
base model's own sampling" means the same thing here as there. Every acceptance scheme that samples
draws from (or, for rejection sampling, reproduces exactly) ``SamplingParams.probabilities``.
Temperature 0 is greedy decoding. All of it is tensor work on the device; sampling uses a
``torch.Generator`` so a seed reproduces an answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medusa.errors import MedusaError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 is greedy; ``top_p`` 1 and ``top_k`` 0 switch those filters off.

    Frozen and free of the seed, so equal settings hash equal (decoders and captured steps are pooled by it).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise MedusaError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise MedusaError(f"top_p must lie in (0, 1] (1 keeps every token), got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise MedusaError(f"top_k must be an integer >= 0 (0 keeps every token), got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[..., vocab]`` after temperature, top-k and top-p; filtered tokens get -inf."""
        if self.greedy:
            raise ValueError("temperature 0 is greedy decoding: there is no distribution to process")
        logits = logits.float() / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)  # ties with the k-th are kept, as transformers does
        if self.top_p < 1:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
            drop = mass_before >= self.top_p  # never drops the top token, whose mass_before is 0
            logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
        return logits

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution ``[..., vocab]`` (float32) that sampling with these settings follows."""
        return self.process(logits).softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs [..., vocab]``, on the device and without a host sync.

    The exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. picks token i with probability
    p_i (the minimum of Exp(p_i) clocks), the trick gpt-fast and vLLM use; unlike ``torch.multinomial``
    it never synchronises and records into a CUDA graph. Rows need not be normalised.
    """
    clocks = torch.empty_like(probs, dtype=torch.float32).exponential_(generator=generator)
    # An exponential draw of exactly 0 would turn 0/0 into NaN, which argmax would pick.
    clocks.clamp_min_(torch.finfo(torch.float32).tiny)
    return (probs.float() / clocks).argmax(dim=-1)


def check_seed(seed: int | None) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise MedusaError(f"seed must be an integer in [0, 2**63) or None (a fresh random seed), got {seed!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
