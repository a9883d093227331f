"""Sampling parameters: how the base model's logits become the distribution a sampled answer follows.

Temperature, then top-k, then top-p, in the order transformers' ``generate`` applies them, so "the
base model's own sampling" means the same thing here as there. Every acceptance scheme that samples
draws from (or, for rejection sampling, reproduces exactly) ``SamplingParams.probabilities``.
Temperature 0 is greedy decoding. All of it is tensor work on the device.

Randomness is counter-based: the noise for a row's token at sequence position t is a hash of (the row's
seed, t, the token id), never a draw from a shared generator. So a seeded request gives the same answer
alone or beside other requests, with or without heads, whatever tree verified it: sampling a token is
"greedy decoding on Gumbel-perturbed logits" (``argmax(logits / T + G)``, the Gumbel-max trick), and the
perturbation at each position is fixed by the seed before any tree is built. Verification then keeps a
candidate exactly when it equals that position's sample, which accepts sibling j with probability
``p(x_j)``: the same as multi-candidate rejection sampling with deterministic candidates (docs/sampling.md).
"""

from __future__ import annotations

import logging
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


# Scheme ids of a row, as the step's per-row buffers hold them.
GREEDY, REJECTION, TYPICAL = 0, 1, 2

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps modulo 2**64, as the hash needs)."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def position_gumbel(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise ``[*positions.shape, vocab]`` (float32) fixed by each row's seed and sequence position.

    ``seeds [rows]`` long, ``positions [rows, P]`` long: the position of the token the noise samples.
    """
    return _gumbel(seeds, positions, _token_keys(vocab, positions.device))


def _token_keys(vocab: int, device: torch.device) -> torch.Tensor:
    """Each token id's part of the hash ``[vocab]`` (int64). A tensor, not an index times a constant inside the
    kernel: compiled into a reduction, the index is 32-bit and Triton refuses the 64-bit constant."""
    return torch.arange(vocab, device=device) * _GOLDEN


def _gumbel(seeds: torch.Tensor, positions: torch.Tensor, token_keys: torch.Tensor) -> torch.Tensor:
    key = _mix(_mix(seeds * _GOLDEN + 1)[:, None] + positions * _GOLDEN)  # [rows, P]
    bits = _mix(key[..., None] + token_keys)  # [rows, P, vocab]
    uniform = (_shift_right(bits, 40).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -torch.log(-torch.log(uniform))


def _perturbed_argmax(
    scaled: torch.Tensor,
    sampled: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    depths: torch.Tensor,
    token_keys: torch.Tensor,
) -> torch.Tensor:
    """Each node's sample ``[rows, nodes]``: the argmax of its ``scaled [rows, nodes, vocab]`` logits plus, on
    ``sampled [rows]`` rows, the Gumbel noise of the position its depth ``depths [nodes]`` gives (``positions
    [rows, P]``; ``token_keys``: ``_token_keys``)."""
    noise = _gumbel(seeds, positions, token_keys).index_select(1, depths)  # [rows, nodes, vocab]
    return (scaled + torch.where(sampled[:, None, None], noise, 0.0)).argmax(-1)


class _FusedOnCuda:
    """``_perturbed_argmax`` as one kernel on CUDA (torch.compile), eager elsewhere or if compiling fails.

    Eagerly, the hash is a score of int64 passes over ``[rows, positions, vocab]``: at batch 32 with a 16-node lookup
    chain (17 positions x 49,152 tokens) they were 2 ms of a 9.3 ms sampled step on the H100, against 5.7 ms for the
    same step greedy. Fused, the noise is computed inside the argmax and never stored. The compiled kernel gives the
    eager noise bit for bit (``tests/test_graphs.py`` checks it on the GPU), and every CUDA step uses it, so a seeded
    row's sample never depends on its batch or tree.
    """

    def __init__(self) -> None:
        self.compiled = None
        self.refused = False

    def __call__(
        self,
        scaled: torch.Tensor,
        sampled: torch.Tensor,
        seeds: torch.Tensor,
        positions: torch.Tensor,
        depths: torch.Tensor,
    ) -> torch.Tensor:
        """``_perturbed_argmax`` of these (shapes as there)."""
        tensors = (scaled, sampled, seeds, positions, depths, _token_keys(scaled.shape[-1], scaled.device))
        # Inside a step compiled whole (EngineOptions.compile), that compile fuses it with the rest.
        if not scaled.is_cuda or self.refused or torch.compiler.is_compiling():
            return _perturbed_argmax(*tensors)
        if self.compiled is None:
            # One kernel per specialisation (batch buckets, trees, plain steps): allow them all.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.compiled = torch.compile(_perturbed_argmax, dynamic=True, fullgraph=True)
        try:
            return self.compiled(*tensors)
        except Exception as error:  # no Triton, say: the eager passes still sample exactly
            self.refused = True
            logging.getLogger("medusa").warning("fusing the sampling noise failed, running it eagerly: %s", error)
            return _perturbed_argmax(*tensors)


perturbed_argmax = _FusedOnCuda()


@dataclass
class RowSampling:
    """Each row's sampling settings as tensors ``[rows]``, so one step serves rows that sample differently."""

    scheme: torch.Tensor  # long: GREEDY, REJECTION or TYPICAL
    temperature: torch.Tensor  # float32; 1 on greedy rows (unused there)
    top_k: torch.Tensor  # long, 0: off
    top_p: torch.Tensor  # float32, 1: off
    typical_eps: torch.Tensor  # float32
    typical_delta: torch.Tensor  # float32
    seed: torch.Tensor  # long

    @classmethod
    def empty(cls, rows: int, device: torch.device | str) -> RowSampling:
        def zeros(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(rows, dtype=dtype, device=device)

        settings = cls(
            zeros(torch.long),
            zeros(torch.float32),
            zeros(torch.long),
            zeros(torch.float32),
            zeros(torch.float32),
            zeros(torch.float32),
            zeros(torch.long),
        )
        settings.temperature.fill_(1.0)
        settings.top_p.fill_(1.0)
        return settings

    def rows(self, count: int) -> RowSampling:
        """Views of the first ``count`` rows (a step over a smaller batch bucket reads these)."""
        return RowSampling(*(getattr(self, name)[:count] for name in self.__dataclass_fields__))

    def write(self, row: int, scheme: int, params: SamplingParams, eps: float, delta: float, seed: int) -> None:
        """Set one row's settings in place (between steps; a captured step reads these buffers)."""
        self.scheme[row] = scheme
        self.temperature[row] = params.temperature if params.temperature > 0 else 1.0
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.typical_eps[row] = eps
        self.typical_delta[row] = delta
        # The hash reads the seed as a signed 64-bit integer; seeds lie in [0, 2**63).
        self.seed[row] = seed

    def process(self, logits: torch.Tensor, filtered: bool) -> torch.Tensor:
        """Float32 logits ``[rows, nodes, vocab]`` after each row's temperature, then top-k and top-p
        (``filtered``; a step with no row filtering skips the sort); filtered tokens get -inf."""
        logits = logits.float() / self.temperature[:, None, None]
        if not filtered:
            return logits
        ordered, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        kth = ordered.gather(-1, (self.top_k.clamp(1, vocab) - 1)[:, None, None].expand(*ordered.shape[:2], 1))
        kept_by_k = (self.top_k == 0)[:, None, None] | (ordered >= kth)  # ties with the k-th are kept
        ordered = ordered.masked_fill(~kept_by_k, -math.inf)
        probs = ordered.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = (mass_before >= self.top_p[:, None, None]) | ~kept_by_k  # never the top token
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        return logits.masked_fill(drop, -math.inf)


def check_seed(seed: int | None) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise MedusaError(f"seed must be an integer in [0, 2**63) or None (a fresh random seed), got {seed!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
