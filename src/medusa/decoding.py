"""The Medusa decoding loop (paper, section 2.1): propose -> verify -> accept -> commit.

One ``MedusaDecoder`` holds one sequence's cache and device state. Each step proposes a tree of
candidates from the heads, verifies the whole tree in one forward pass of the base model, keeps the
longest accepted path and compacts its K/V. The only host sync per step reads the accepted tokens.
Without heads the same loop with a one-node tree is plain autoregressive decoding on the same cache,
which is the honest baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from medusa.acceptance import AcceptanceScheme
from medusa.cache import MedusaCache, attention_mask_for, chunk_visibility, num_cache_layers, tree_visibility
from medusa.heads import MedusaHeads
from medusa.lookup import DEFAULT_MAX_NGRAM, ngram_continuation
from medusa.tree import Tree

# Steps attend over the cache's first 256, 512, ... slots, the fewest that hold the tree: attention then
# reads the text so far, not every preallocated slot (each span is its own CUDA graph).
ATTENTION_SPAN_STEP = 256
# Eager steps a CUDA-graph capture runs first (graphs.GraphedStep), from slot 0: every span leaves room for them.
WARMUP_STEPS = 2


def warmup_advance(tree: Tree) -> int:
    """Slots the warm-up steps before a capture may commit, from slot 0."""
    return WARMUP_STEPS * (tree.max_depth + 1)


def attention_spans(max_length: int, least: int, step: int | None) -> tuple[int, ...]:
    """Multiples of ``step`` from ``least`` up, then ``max_length`` (only that without a step)."""
    if step is None:
        return (max_length,)
    first = -(-least // step) * step
    return (*range(first, max_length, step), max_length)


@dataclass
class StepOutput:
    tokens: list[int]  # the tokens this step commits, after EOS / length truncation
    accepted: int  # tokens the step committed before truncation: 1 (the base token) + accepted guesses


@dataclass
class DecodingStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    accepted_per_step: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = "length"
    acceptance: str = ""  # the scheme that ran: greedy, typical or rejection

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted_per_step) / len(self.accepted_per_step) if self.accepted_per_step else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def spans_devices(base_model: torch.nn.Module) -> bool:
    return len({parameter.device for parameter in base_model.parameters()}) > 1


class MedusaDecoder:
    """State of one generation (batch 1) on a preallocated cache of ``max_length`` slots."""

    def __init__(
        self,
        base_model: PreTrainedModel,
        heads: MedusaHeads | None,
        tree: Tree,
        acceptance: AcceptanceScheme,
        max_length: int,
        lookup_ngram: int = DEFAULT_MAX_NGRAM,
        span_step: int | None = ATTENTION_SPAN_STEP,
        one_store: bool = True,
    ) -> None:
        """``one_store``: keep every layer's K/V in one buffer so a commit is two kernels (``MedusaCache``);
        never for a base model split over devices."""
        if heads is None and tree.paths:
            raise ValueError("decoding without heads needs a tree without head paths (the root, or a lookup chain)")
        if heads is not None:
            tree.check_heads(heads.config.num_heads)
        self.base = base_model
        self.heads = heads
        self.acceptance = acceptance
        self.device = model_device(base_model)
        self.dtype = base_model.dtype
        self.tree = tree.to(self.device)
        self.max_length = max_length
        self.cache = MedusaCache(
            num_cache_layers(base_model.config), max_length, one_store=one_store and not spans_devices(base_model)
        )
        self.length = torch.zeros((), dtype=torch.long, device=self.device)
        # Decoding state lives in fixed buffers updated in place, so a captured step can replay on it.
        self.root_token = torch.zeros((), dtype=torch.long, device=self.device)
        # Sampling schemes draw from this, never from the global RNG; prefill seeds it.
        self.generator = torch.Generator(device=self.device)
        hidden_size = base_model.config.get_text_config().hidden_size
        self.last_hidden = torch.zeros(hidden_size, dtype=self.dtype, device=self.device)
        # The text so far (prompt and committed tokens), for the tree's lookup branch; kept only if it has one.
        self.lookup_ngram = lookup_ngram
        self.history = torch.zeros(max_length if tree.lookup else 0, dtype=torch.long, device=self.device)
        # Offsets of a path's nodes from the committed length (a verdict's path is always max_depth + 1 long).
        self.path_offsets = torch.arange(self.tree.max_depth + 1, device=self.device)
        self.spans = attention_spans(max_length, tree.size + warmup_advance(tree), span_step)
        self._span_caches: dict[int, MedusaCache] = {}

    def span_for(self, length: int) -> int:
        """The shortest attention span that holds a step's tree written at slot ``length`` (host-side)."""
        end = length + self.tree.size
        return next((span for span in self.spans if span >= end), self.max_length)

    def _cache_over(self, span: int) -> MedusaCache:
        if span == self.max_length:
            return self.cache
        if span not in self._span_caches:
            self._span_caches[span] = self.cache.prefix(span)
        return self._span_caches[span]

    def _forward(
        self, input_ids: torch.Tensor, visibility: tuple[torch.Tensor, ...], cache: MedusaCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        allowed, query_positions, key_positions = visibility
        mask = attention_mask_for(self.base.config, allowed, query_positions, key_positions, self.dtype)
        output = self.base(
            input_ids=input_ids[None],
            position_ids=query_positions[None],
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
        )
        return output.logits[0], output.hidden_states[-1][0]

    def prefill(self, prompt_ids: torch.Tensor, seed: int | None = None) -> None:
        """Run the prompt ``[prompt_len]`` and pick the base model's first token; ``seed`` (None: a fresh
        random one) seeds the sampling of this generation."""
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.length.zero_()
        self.cache.set_length(self.length)
        visibility = chunk_visibility(self.length, prompt_ids.numel(), self.max_length)
        logits, hidden = self._forward(prompt_ids, visibility, self.cache)
        self.length.fill_(prompt_ids.numel())
        self.cache.set_length(self.length)
        if self.tree.lookup:
            self.history[: prompt_ids.numel()] = prompt_ids
        self.root_token.copy_(self.acceptance.first_token(logits[-1], self.generator))
        self.last_hidden.copy_(hidden[-1])

    def propose(self) -> torch.Tensor:
        """Tree tokens ``[size]``: the root, then each node's rank of its depth's head top-k (or lookup guess)."""
        # A copy: the step overwrites root_token with the next token before it returns these.
        candidates = [self.root_token.clone().view(1)]
        if self.tree.lookup:
            self.history.index_copy_(0, self.length.view(1), self.root_token.view(1))
            candidates.append(ngram_continuation(self.history, self.length, self.lookup_ngram, self.tree.lookup))
        if self.heads is not None:
            head_logits = self.heads(self.last_hidden)  # [heads, vocab]
            top = head_logits.topk(self.tree.topk, dim=-1).indices.to(self.device)  # [heads, topk], back from the heads' device
            candidates.append(top.flatten())
        if len(candidates) == 1:
            return candidates[0]
        return torch.cat(candidates)[self.tree.candidate_index]

    def step(self, span: int | None = None) -> torch.Tensor:
        """One propose/verify/accept/commit, all on the device (capturable as a CUDA graph).

        ``span``: attend over only the first ``span`` cache slots (one of ``spans``, at least
        ``span_for(length)``; None: all of them). Returns ``[1 + depth + 1]``: how many tokens the step
        commits, then the chosen path's tokens (only that many of them count).
        """
        span = span or self.max_length
        tree_tokens = self.propose()
        visibility = tree_visibility(self.length, self.tree.attention_mask, self.tree.depths, span)
        logits, hidden = self._forward(tree_tokens, visibility, self._cache_over(span))
        verdict = self.acceptance.accept(self.tree, tree_tokens, logits, self.generator)
        if self.tree.size > 1:  # a one-node tree's token is already in place: nothing to move
            self.cache.commit(self.length + verdict.path, self.length)
        if self.tree.lookup:  # the path's tokens after the committed text; slots past the accepted ones are rewritten later
            slots = (self.length + self.path_offsets).clamp(max=self.history.numel() - 1)
            self.history.index_copy_(0, slots, tree_tokens[verdict.path])
        count = verdict.accepted.view(1) + 1
        self.length += count[0]
        self.cache.set_length(self.length)
        last_node = verdict.path.index_select(0, verdict.accepted.view(1))
        self.last_hidden.copy_(hidden.index_select(0, last_node)[0])
        self.root_token.copy_(verdict.next_token)
        return torch.cat([count, tree_tokens[verdict.path]])


def decode(
    decoder: MedusaDecoder,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: set[int],
    stats: DecodingStats,
    step: Callable[[int], torch.Tensor] | None = None,
    seed: int | None = None,
) -> Iterator[StepOutput]:
    """Yield each step's committed tokens until EOS or ``max_new_tokens``; fills ``stats`` as it goes.

    The caller may stop iterating early (stop strings, a client gone); the decoder is then simply dropped.
    ``step`` replaces ``decoder.step`` (a CUDA-graph replay of it, say) and takes the same attention span.
    ``seed`` makes sampling reproducible.
    """
    step = step or decoder.step
    started = time.perf_counter()
    length = prompt_ids.numel()  # committed slots, known on the host from the counts each step returns
    # Inference mode is entered per call, not across the yields, so it never leaks into the caller.
    with torch.inference_mode():
        decoder.prefill(prompt_ids, seed)
        if decoder.device.type == "cuda":
            torch.cuda.synchronize(decoder.device)
    stats.prompt_tokens = prompt_ids.numel()
    stats.acceptance = decoder.acceptance.name
    stats.prefill_seconds = time.perf_counter() - started
    decode_started = time.perf_counter()
    while stats.new_tokens < max_new_tokens:
        with torch.inference_mode():
            # The one host sync of the step: how many tokens were accepted, and which.
            values = step(decoder.span_for(length)).tolist()
        accepted, tokens = values[0], values[1 : 1 + values[0]]
        length += accepted
        tokens = tokens[: max_new_tokens - stats.new_tokens]
        for index, token in enumerate(tokens):
            if token in eos_token_ids:
                tokens = tokens[: index + 1]
                stats.finish_reason = "stop"
                break
        stats.steps += 1
        stats.accepted_per_step.append(accepted)
        stats.new_tokens += len(tokens)
        stats.decode_seconds = time.perf_counter() - decode_started
        yield StepOutput(tokens=tokens, accepted=accepted)
        if stats.finish_reason == "stop":
            return
