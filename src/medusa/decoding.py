"""The Medusa step (paper, section 2.1) for a batch of generations: propose -> verify -> accept -> commit.

A ``Decoder`` holds the device state of up to ``max_rows`` generations on one preallocated cache. Each row
has its own committed length, sampling settings and seed, so rows join (``prefill``) and leave between
steps without touching the others. A step runs the first ``rows`` rows (a batch bucket: rows past the
running ones are masked off) with that bucket's tree: it proposes each row's tree from the heads (and the
lookup branch), verifies every row's tree in one forward pass of the base model, keeps each row's longest
accepted path and compacts its K/V. A single sequence is the batch of one. Without heads the same step
with a one-node tree is plain autoregressive decoding on the same cache, which is the honest baseline.

Everything in a step stays on the device with static shapes, so it is captured as a CUDA graph
(``medusa.graphs``); the only host sync per step is the engine's read of the accepted tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from medusa.acceptance import AcceptanceScheme, StepKind, accept, target_tokens, token_logprobs
from medusa.attention import RAGGED_KEYWORD, RaggedRows, flash_runs, prefill_attention
from medusa.cache import (
    MedusaCache,
    attention_mask_for,
    cache_keyword,
    chunk_visibility,
    num_cache_layers,
    tree_visibility,
)
from medusa.devices import model_device, spans_devices
from medusa.heads import MedusaHeads
from medusa.lookup import DEFAULT_MAX_NGRAM, ngram_continuation
from medusa.sampling import RowSampling, SamplingParams
from medusa.tree import Tree

# Steps attend over the cache's first 256, 512, ... slots, the fewest that hold every row's tree: attention
# then reads the text so far, not every preallocated slot (each span is its own CUDA graph).
ATTENTION_SPAN_STEP = 256
MAX_TOP_LOGPROBS = 20  # the most alternatives a token's log-probabilities list (OpenAI's limit)
PAD_TOKEN = 0  # fills a prefill's rows past their prompt; those positions are never read
PREFILL_GROUP = 8  # joining prompts prefilled together (their logits cost rows x rows x vocabulary)
# Prompt widths a prefill is padded to where it replays a captured graph (one per group size, width and kind):
# an eager prefill is over a thousand small kernels launched from Python, 40-50 ms on the H100 against 5-6 ms
# captured, and an eighth of Spec-Bench's prompts are 513-1187 tokens long. Longer prompts prefill eagerly.
PREFILL_WIDTHS = (32, 64, 128, 256, 512, 1024, 2048)
# The most prompt tokens (prompts x width) one captured prefill holds: its cache is kept for good, so a wide
# prefill takes fewer prompts (4 at 1024, 2 at 2048) rather than the kept cache growing with the width.
PREFILL_TOKENS = PREFILL_GROUP * 512


def prefill_width(longest: int, max_length: int) -> int | None:
    """The captured prefill width that holds prompts of up to ``longest`` tokens in a cache of ``max_length``
    slots per row, or None (prefill eagerly)."""
    return next((width for width in PREFILL_WIDTHS if longest <= width <= max_length), None)


def prefill_group_limit(width: int, group: int) -> int:
    """The most prompts a captured prefill of ``width`` takes on a decoder that prefills ``group`` at once: what
    fits ``PREFILL_TOKENS``, and always one."""
    return min(group, max(1, PREFILL_TOKENS // width))


def prefill_capacity(group: int, max_length: int) -> int:
    """The token slots the kept prefill cache holds: the most prompts x width of any captured prefill that fits
    rows of ``max_length`` slots (0 where none does)."""
    return max(
        (prefill_group_limit(width, group) * width for width in PREFILL_WIDTHS if width <= max_length), default=0
    )


def prefill_kind(kind: StepKind) -> StepKind:
    """The part of a step kind that choosing a prefill's first token depends on: its graphs are keyed on it."""
    return StepKind(sample=kind.sample, filtered=kind.filtered)


def attention_spans(max_length: int, least: int, step: int | None) -> tuple[int, ...]:
    """Multiples of ``step`` from ``least`` up, then ``max_length`` (only that without a step)."""
    if step is None:
        return (max_length,)
    first = -(-least // step) * step
    return (*range(first, max_length, step), max_length)


@dataclass
class StepOutput:
    tokens: list[int]  # the tokens this step commits, after EOS / length / stop-string truncation
    accepted: int  # tokens the step committed before truncation: 1 (the base token) + accepted guesses
    text: str = ""  # new text (when the generation has a detokenizer)
    # Per kept token: the base model's log-probability, and its top alternatives as (token, logprob).
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


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


class Decoder:
    """Device state of up to ``max_rows`` generations on a cache of ``max_length`` slots per row.

    ``trees`` maps each batch bucket (the ``rows`` a step runs) to its tree; a tree without head paths
    runs no heads. Row state lives in fixed buffers updated in place, so a captured step replays on it.
    """

    def __init__(
        self,
        base_model: PreTrainedModel,
        heads: MedusaHeads | None,
        trees: Mapping[int, Tree],
        max_rows: int,
        max_length: int,
        lookup_ngram: int = DEFAULT_MAX_NGRAM,
        one_store: bool = True,
        ragged_attention: bool | None = False,
    ) -> None:
        """``one_store``: keep every layer's K/V in one buffer so a commit is two kernels (``MedusaCache``);
        never for a base model split over devices. ``ragged_attention``: a step's attention reads each row's own
        slots, not the span (``medusa.attention.RaggedRows``; models on other attention functions ignore it); None:
        where FlashAttention's variable-length kernel runs."""
        for tree in trees.values():
            if heads is None and tree.paths:
                raise ValueError("decoding without heads needs trees without head paths (the root, or a lookup chain)")
            if heads is not None:
                tree.check_heads(heads.config.num_heads)
        self.base = base_model
        self.cache_keyword = cache_keyword(base_model)  # once: the step may be compiled
        self.heads = heads
        self.device = model_device(base_model)
        self.dtype = base_model.dtype
        self.trees = {rows: tree.to(self.device) for rows, tree in trees.items()}
        # What a plain step verifies, in any bucket: the root alone (``step(..., plain=True)``).
        self.plain_tree = Tree.from_paths([]).to(self.device)
        # Sequential heads grow each bucket's tree one depth at a time (``Tree.expansion``).
        sequential = heads is not None and heads.config.sequential
        self.expansions = {rows: tree.expansion() for rows, tree in self.trees.items()} if sequential else {}
        self.max_rows = max_rows
        self.max_length = max_length
        self.lookup_ngram = lookup_ngram
        # The kernel is probed here, once, before any step is captured (the probe allocates).
        self.flash_attention = ragged_attention is not False and flash_runs(self.device, self.dtype)
        self.ragged_attention = self.flash_attention if ragged_attention is None else ragged_attention
        device = self.device
        self.lengths = torch.zeros(max_rows, dtype=torch.long, device=device)  # committed slots per row
        self.one_store = one_store and not spans_devices(base_model)
        self.cache = MedusaCache(num_cache_layers(base_model.config), max_length, self.lengths, self.one_store)
        self.active = torch.zeros(max_rows, dtype=torch.bool, device=device)  # rows past the running ones: False
        self.root_token = torch.zeros(max_rows, dtype=torch.long, device=device)  # each row's next token
        hidden_size = base_model.config.get_text_config().hidden_size
        self.last_hidden = torch.zeros(max_rows, hidden_size, dtype=self.dtype, device=device)
        self.sampling = RowSampling.empty(max_rows, device)
        # The root token's log-probability and top alternatives, computed by the step that chose it.
        vocab = base_model.get_output_embeddings().weight.shape[0]
        self.top_logprobs = min(MAX_TOP_LOGPROBS, vocab)
        self.root_logprob = torch.zeros(max_rows, device=device)
        self.root_top_ids = torch.zeros(max_rows, self.top_logprobs, dtype=torch.long, device=device)
        self.root_top_logprobs = torch.zeros(max_rows, self.top_logprobs, device=device)
        # Each row's text so far (prompt and committed tokens), for the lookup branch; kept only if a tree has one.
        has_lookup = any(tree.lookup for tree in trees.values())
        self.history = torch.zeros(max_rows, max_length if has_lookup else 0, dtype=torch.long, device=device)
        # Heads with Hydra++'s prefix layer: its K/V at every committed position of every row, and last_hidden holds
        # the layer's output at each row's last position (what the heads read) instead of the base hidden state.
        self.prefix = heads.prefix if heads is not None else None
        self.prefix_keys = self.prefix_values = None
        if self.prefix is not None:
            shape = (max_rows, self.prefix.num_heads, max_length, self.prefix.head_dim)
            self.prefix_keys = torch.zeros(shape, dtype=self.prefix.qkv.weight.dtype, device=device)
            self.prefix_values = torch.zeros_like(self.prefix_keys)
        # A joining group's prompts (right-padded), the rows they go to and their last positions: fixed buffers
        # that ``load_prompts`` fills and ``prefill_step`` reads, so that a captured prefill replays on them.
        group = min(max_rows, PREFILL_GROUP)
        self.prompt_ids = torch.full((group, max_length), PAD_TOKEN, dtype=torch.long, device=device)
        self.prompt_rows = torch.zeros(group, dtype=torch.long, device=device)
        self.prompt_last = torch.zeros(group, dtype=torch.long, device=device)
        self.prompt_starts = torch.zeros(group, dtype=torch.long, device=device)  # every prefill row starts at 0
        # The cache prefills run in (packed views of it, see ``prefill_cache``): one row of ``prefill_capacity``
        # slots, made once, outside any CUDA graph, since a fresh cache allocates and copies on first use, which a
        # captured prefill cannot hold.
        self.prefill_capacity = prefill_capacity(group, max_length)
        self._prefill_cache: MedusaCache | None = None
        self._views: dict[tuple[int, int], MedusaCache] = {}
        self._keeps_some_logits = "logits_to_keep" in inspect.signature(base_model.forward).parameters

    # ----- what a step needs, known on the host ---------------------------------------------------

    def tree_for(self, rows: int, plain: bool = False) -> Tree:
        return self.plain_tree if plain else self.trees[rows]

    def largest_tree(self) -> int:
        return max(tree.size for tree in self.trees.values())

    def deepest_tree(self) -> int:
        return max(tree.max_depth for tree in self.trees.values())

    def _cache_view(self, rows: int, span: int) -> MedusaCache:
        if (rows, span) not in self._views:
            self._views[rows, span] = self.cache.view(rows, span)
        return self._views[rows, span]

    def _forward(
        self,
        input_ids: torch.Tensor,
        visibility: tuple[torch.Tensor, ...],
        cache: MedusaCache,
        keep: torch.Tensor | None = None,
        ragged: RaggedRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and last hidden states ``[rows, queries, ...]``; ``keep [rows]``: the logits of only each row's
        query ``keep[row]`` (``[rows, 1, vocab]``), the hidden states of every query still. ``ragged``: the rows'
        lengths and tree, for attention that reads only each row's own slots (the mask still says the same)."""
        allowed, query_positions, key_positions = visibility
        mask = attention_mask_for(self.base.config, allowed, query_positions, key_positions, self.dtype)
        cache.lengths.begin()
        extra = {}
        if ragged is not None:
            extra[RAGGED_KEYWORD] = ragged
        if keep is not None and self._keeps_some_logits:
            extra["logits_to_keep"] = keep  # logits at those positions for every row: [rows, rows, vocab]
        output = self.base(
            input_ids=input_ids,
            position_ids=query_positions,
            attention_mask=mask,
            **{self.cache_keyword: cache},
            use_cache=True,
            output_hidden_states=True,
            **extra,
        )
        hidden = output.hidden_states[-1].to(self.device)
        logits = output.logits.to(self.device)
        if keep is None:
            return logits, hidden
        rows = torch.arange(keep.numel(), device=self.device)
        picked = logits[rows, rows] if "logits_to_keep" in extra else logits[rows, keep]
        return picked[:, None], hidden

    # ----- joining: the prefill -------------------------------------------------------------------

    def prefill(
        self,
        rows: Sequence[int],
        prompts: Sequence[torch.Tensor],
        schemes: Sequence[AcceptanceScheme],
        seeds: Sequence[int],
    ) -> None:
        """Run ``prompts`` (1-D token ids) together into rows ``rows`` and choose each one's first token, eagerly
        at the longest prompt's width (the engine replays captured prefills instead where it has them)."""
        width = max(int(prompt.numel()) for prompt in prompts)
        kind = self.load_prompts(rows, prompts, schemes, seeds, width)
        self.prefill_step(len(rows), width, kind)

    def load_prompts(
        self,
        rows: Sequence[int],
        prompts: Sequence[torch.Tensor],
        schemes: Sequence[AcceptanceScheme],
        seeds: Sequence[int],
        width: int,
    ) -> StepKind:
        """Put a joining group's prompts, right-padded to ``width``, in the prefill's buffers, and each row's
        sampling settings and seed in place; returns the kind of prefill they need (``prefill_kind``)."""
        count = len(rows)
        lengths = [int(prompt.numel()) for prompt in prompts]
        if not 0 < count <= self.prompt_rows.shape[0]:
            raise ValueError(f"a prefill takes 1 to {self.prompt_rows.shape[0]} prompts, got {count}")
        if max(lengths) > width or width > self.max_length:
            raise ValueError(f"prompts of up to {max(lengths)} tokens at width {width} in {self.max_length} slots")
        ids = torch.full((count, width), PAD_TOKEN, dtype=torch.long)
        for index, prompt in enumerate(prompts):
            ids[index, : lengths[index]] = prompt.cpu()
        self.prompt_ids[:count, :width].copy_(ids)
        self.prompt_rows[:count].copy_(torch.tensor(list(rows)))
        self.prompt_last[:count].copy_(torch.tensor(lengths) - 1)
        for row, scheme, seed in zip(rows, schemes, seeds):
            self.sampling.write(
                row, scheme.scheme_id, scheme.sampling or SamplingParams(), scheme.eps, scheme.delta, seed
            )
        return prefill_kind(StepKind.of(list(schemes)))

    def prefill_step(self, count: int, width: int, kind: StepKind = StepKind()) -> None:
        """Prefill the first ``count`` loaded prompts at ``width`` tokens each, all on the device (capturable).

        The prompts run in a cache of their own whose rows are then copied into place, so the running rows are
        untouched; pad tokens past a prompt write slots past its length, which nothing reads. Each row's first
        token is chosen from its last prompt position's logits, by its own scheme and seed.
        """
        device = self.device
        ids = self.prompt_ids[:count, :width]
        row_index = self.prompt_rows[:count]
        last = self.prompt_last[:count]
        starts = self.prompt_starts[:count]
        cache = self.prefill_cache(count, width)
        with prefill_attention(device):
            logits, hidden = self._forward(ids, chunk_visibility(starts, width, width), cache, keep=last)
        if self.prefix is not None:
            head_input = self._prefix_prefill(hidden, row_index, last)
        else:
            head_input = hidden[torch.arange(count, device=device), last]
        settings = RowSampling(*(getattr(self.sampling, name)[row_index] for name in RowSampling.__dataclass_fields__))
        positions = (last + 1)[:, None]  # the first new token's position
        first = target_tokens(logits, settings, positions, torch.zeros(1, dtype=torch.long, device=device), kind)
        logprob, top_ids, top_logprobs = token_logprobs(logits, torch.zeros_like(first), first, self.top_logprobs)
        self.cache.copy_rows(cache, row_index, width)
        self.lengths.index_copy_(0, row_index, last + 1)
        self.root_token.index_copy_(0, row_index, first[:, 0])
        self.last_hidden.index_copy_(0, row_index, head_input.to(self.dtype))
        self.root_logprob.index_copy_(0, row_index, logprob[:, 0])
        self.root_top_ids.index_copy_(0, row_index, top_ids[:, 0])
        self.root_top_logprobs.index_copy_(0, row_index, top_logprobs[:, 0])
        self.active.index_fill_(0, row_index, True)
        if self.history.shape[1]:
            self.history[:, :width].index_copy_(0, row_index, ids)

    def prefill_cache(self, count: int, width: int) -> MedusaCache:
        """A cache for the prefill of ``count`` prompts at ``width`` slots, every row starting at slot 0: a packed
        view (``MedusaCache.packed_view``) of the kept prefill cache once the decoder's own cache exists (made here
        on first use, never inside a capture: ``StepGraphs`` makes it before capturing), else, or for a prefill of
        more than its ``prefill_capacity`` tokens, a fresh one."""
        if (
            self._prefill_cache is None
            and self.prefill_capacity
            and all(layer.is_initialized for layer in self.cache.layers)
        ):
            kept = MedusaCache(len(self.cache.layers), self.prefill_capacity, self.prompt_starts[:1], self.one_store)
            for layer, whole in zip(kept.layers, self.cache.layers):
                shape = (1, whole.keys.shape[1], 1, whole.keys.shape[3])
                layer.lazy_initialization(whole.keys.new_empty(shape), whole.values.new_empty(shape))
            self._prefill_cache = kept
        if self._prefill_cache is None or count * width > self.prefill_capacity:
            return MedusaCache(len(self.cache.layers), width, self.prompt_starts[:count], self.one_store)
        return self._prefill_cache.packed_view(count, width, self.prompt_starts[:count])

    def _prefix_prefill(self, hidden: torch.Tensor, row_index: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The prefix layer over a prefill's hidden states ``[count, width, hidden]``: its K/V go to rows ``row_index``
        (slot i holds position i), and each row's output at its ``last`` position is returned ``[count, hidden]``."""
        count, width, _ = hidden.shape
        positions = torch.arange(width, device=self.device).expand(count, width)
        query, key, value = self.prefix.project(hidden, positions)
        self.prefix_keys[:, :, :width].index_copy_(0, row_index, key.to(self.prefix_keys.dtype))
        self.prefix_values[:, :, :width].index_copy_(0, row_index, value.to(self.prefix_values.dtype))
        visible = torch.ones(width, width, dtype=torch.bool, device=self.device).tril().expand(count, -1, -1)
        output = self.prefix.attend(hidden, query, key, value, visible)
        return output[torch.arange(count, device=self.device), last]

    def _prefix_step(
        self, rows: int, span: int, hidden: torch.Tensor, path: torch.Tensor, accepted: torch.Tensor
    ) -> torch.Tensor:
        """The prefix layer over a step's accepted path: its K/V written at the path's slots, and the output at each
        row's last accepted node returned ``[rows, hidden]``. ``hidden [rows, nodes, hidden]`` (the tree's),
        ``path [rows, depth + 1]`` (node indices), ``accepted [rows]``. Path entries past the accepted ones land
        past the row's new length, where the next step writes before anything reads them."""
        path_hidden = hidden.gather(1, path[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [rows, depth + 1, hidden]
        positions = self.lengths[:rows, None] + torch.arange(path.shape[1], device=self.device)  # slot = position
        query, key, value = self.prefix.project(path_hidden, positions)
        keys, values = self.prefix_keys[:rows], self.prefix_values[:rows]
        slots = positions.clamp(max=keys.shape[2] - 1)[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
        keys.scatter_(2, slots, key.to(keys.dtype))
        values.scatter_(2, slots, value.to(values.dtype))
        visible = torch.arange(span, device=self.device)[None, None, :] <= positions[:, :, None]  # [rows, n, span]
        output = self.prefix.attend(path_hidden, query, keys[:, :, :span], values[:, :, :span], visible)
        return output.gather(1, accepted[:, None, None].expand(-1, 1, output.shape[-1]))[:, 0]

    def _row_index(self, rows: Sequence[int]) -> torch.Tensor:
        """Row numbers on the device without waiting for it: rows leave while the next step runs (overlapped
        steps), and a plain copy from host memory would wait for that step to end."""
        index = torch.tensor(list(rows), dtype=torch.long)
        if self.device.type != "cuda":
            return index.to(self.device)
        return index.pin_memory().to(self.device, non_blocking=True)

    def release(self, rows: Sequence[int]) -> None:
        """Rows leave: they stop committing, and their length returns to 0 so their tree stays inside any span."""
        index = self._row_index(rows)
        self.active.index_fill_(0, index, False)
        self.lengths.index_fill_(0, index, 0)

    def move(self, sources: Sequence[int], targets: Sequence[int]) -> None:
        """Move running rows ``sources`` to free rows ``targets`` (so running rows fill a small bucket)."""
        source, target = self._row_index(sources), self._row_index(targets)
        self.cache.move_rows(source, target)
        for buffer in (
            self.lengths,
            self.active,
            self.root_token,
            self.last_hidden,
            self.root_logprob,
            self.root_top_ids,
            self.root_top_logprobs,
            self.history,
            *vars(self.sampling).values(),
            *((self.prefix_keys, self.prefix_values) if self.prefix is not None else ()),
        ):
            buffer.index_copy_(0, target, buffer.index_select(0, source))
        self.release(sources)

    # ----- the step -------------------------------------------------------------------------------

    def propose(self, rows: int, tree: Tree) -> torch.Tensor:
        """Tree tokens ``[rows, size]``: each row's root, then its lookup guesses and heads' top-k at each node."""
        root = self.root_token[:rows]
        if self.history.shape[1]:
            self.history[:rows].scatter_(1, self.lengths[:rows, None], root[:, None])
        # A copy: the step overwrites root_token with the next token before it returns these.
        candidates = [root[:, None].clone()]
        if tree.lookup:
            history, lengths = self.history[:rows], self.lengths[:rows]
            candidates.append(ngram_continuation(history, lengths, self.lookup_ngram, tree.lookup))
        if tree.paths and self.expansions:
            return self._grow(rows, tree, torch.cat(candidates, dim=1))
        if tree.paths:
            head_logits = self.heads(self.last_hidden[:rows])  # [heads, rows, vocab]
            top = head_logits.topk(tree.topk, dim=-1).indices.to(self.device)  # [heads, rows, topk]
            candidates.append(top.permute(1, 0, 2).flatten(1))
        if len(candidates) == 1:
            return candidates[0]
        return torch.cat(candidates, dim=1)[:, tree.candidate_index]

    def _grow(self, rows: int, tree: Tree, root_and_lookup: torch.Tensor) -> torch.Tensor:
        """Tree tokens ``[rows, size]`` from sequential heads: depth by depth, one head call for every parent of
        the depth, each reading the tokens from the root down to its parent. ``root_and_lookup [rows, 1 + lookup]``."""
        tokens = torch.zeros(rows, tree.size, dtype=torch.long, device=self.device)
        tokens[:, 0] = root_and_lookup[:, 0]
        if tree.lookup:  # the chain's nodes come last
            tokens[:, tree.size - tree.lookup :] = root_and_lookup[:, 1:]
        hidden = self.last_hidden[:rows]
        for depth, expansion in enumerate(self.expansions[rows]):
            parents = expansion.ancestors.shape[0]
            path = tokens[:, expansion.ancestors]  # [rows, parents, depth + 1]
            logits = self.heads.head_logits(depth, hidden[:, None].expand(-1, parents, -1), path)
            top = logits.topk(tree.topk, dim=-1).indices.to(self.device).flatten(1)  # [rows, parents * topk]
            tokens[:, expansion.children] = top[:, expansion.source]
        return tokens

    def step(self, rows: int, span: int, kind: StepKind = StepKind(), plain: bool = False) -> tuple[torch.Tensor, ...]:
        """One propose/verify/accept/commit for the first ``rows`` rows, all on the device (capturable).

        ``span``: attend over only the first ``span`` cache slots (every running row's tree must end inside
        it). ``plain``: verify each row's next token alone, not the bucket's tree (where the tree does not pay,
        ``medusa.speculation``); what the heads and the lookup branch read is kept up to date all the same.

        Returns ``counts_and_tokens [rows, 1 + depth + 1]``: how many tokens each row commits (0 on rows
        not running), then its chosen path's tokens; with ``kind.logprobs >= 0`` also each of those tokens'
        log-probability ``[rows, depth + 1]`` and top alternatives ``[rows, depth + 1, top_logprobs]`` (ids,
        then log-probabilities).
        """
        tree = self.tree_for(rows, plain)
        lengths = self.lengths[:rows]
        tree_tokens = self.propose(rows, tree)
        visibility = tree_visibility(lengths, tree.attention_mask, tree.depths, span)
        ragged = RaggedRows(lengths, tree.attention_mask, self.flash_attention) if self.ragged_attention else None
        logits, hidden = self._forward(tree_tokens, visibility, self._cache_view(rows, span), ragged=ragged)
        offsets = torch.arange(tree.max_depth + 1, device=self.device)
        positions = lengths[:, None] + offsets + 1  # the position a token after a node of each depth takes
        verdict = accept(tree, tree_tokens, logits, self.sampling.rows(rows), positions, kind)
        running = self.active[:rows]
        counts = (verdict.accepted + 1) * running
        if tree.size > 1:  # a one-node tree's token is already in place: nothing to move
            self._cache_view(rows, span).commit(lengths[:, None] + verdict.path)
        path_tokens = tree_tokens.gather(1, verdict.path)  # [rows, depth + 1]
        if self.history.shape[1]:  # slots past the accepted ones are rewritten later
            slots = (lengths[:, None] + offsets).clamp(max=self.history.shape[1] - 1)
            self.history[:rows].scatter_(1, slots, path_tokens)
        outputs = [torch.cat([counts[:, None], path_tokens], dim=1)]
        if kind.logprobs >= 0:
            outputs += self._logprobs(rows, logits, verdict, tree_tokens)
        if self.prefix is not None:  # before the lengths move: the path's positions start at each row's length
            self.last_hidden[:rows] = self._prefix_step(rows, span, hidden, verdict.path, verdict.accepted).to(
                self.dtype
            )
        else:
            last_node = verdict.path.gather(1, verdict.accepted[:, None])  # [rows, 1]
            self.last_hidden[:rows] = hidden.gather(1, last_node[:, :, None].expand(-1, 1, hidden.shape[-1]))[:, 0]
        lengths += counts
        self.root_token[:rows] = verdict.next_token
        return tuple(outputs)

    def _logprobs(self, rows: int, logits: torch.Tensor, verdict, tree_tokens: torch.Tensor) -> list[torch.Tensor]:
        """Log-probabilities of the tokens a step commits: the root's from the step that chose it, each guess's
        from its parent's logits here; the next root's are kept for the next step."""
        depth = verdict.path.shape[1]
        offsets = torch.arange(depth, device=self.device)
        child = tree_tokens.gather(1, verdict.path[:, 1:].clamp_min(0)) if depth > 1 else tree_tokens[:, :0]
        # The token after each path node: the next path token, or the next root after the last accepted one.
        following = torch.cat([child, verdict.next_token[:, None]], dim=1)
        following = torch.where(offsets[None] == verdict.accepted[:, None], verdict.next_token[:, None], following)
        logprob, top_ids, top_logprobs = token_logprobs(logits, verdict.path, following, self.top_logprobs)
        emitted = torch.cat([self.root_logprob[:rows, None], logprob[:, :-1]], dim=1)
        emitted_ids = torch.cat([self.root_top_ids[:rows, None], top_ids[:, :-1]], dim=1)
        emitted_top = torch.cat([self.root_top_logprobs[:rows, None], top_logprobs[:, :-1]], dim=1)
        last = verdict.accepted[:, None]
        self.root_logprob[:rows] = logprob.gather(1, last)[:, 0]
        pick = last[:, :, None].expand(-1, 1, self.top_logprobs)
        self.root_top_ids[:rows] = top_ids.gather(1, pick)[:, 0]
        self.root_top_logprobs[:rows] = top_logprobs.gather(1, pick)[:, 0]
        return [emitted, emitted_ids, emitted_top]
