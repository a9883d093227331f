"""Batched Medusa decoding: several sequences verified in one forward pass per step.

Layout (the reasons are in docs/batching.md). All rows share one static cache of ``capacity`` slots
and one write position ``W``: a step writes every row's tree K/V at slots ``[W, W + tree size)``,
then moves each row's accepted path (``a_b`` tokens, its own number) to ``[W, W + a_b)`` and advances
``W`` by the largest ``a_b``. The slots a row did not fill, and left padding, are holes that a
per-row validity mask ``valid[b, slot]`` hides; each row's attention mask is its valid slots plus the
tree mask. Positions are per row (its own committed count plus the node's depth) and the K/V were
rotated with them when written, so a hole changes which slot a key sits in, never what it computes.

Shapes stay static within a step (shared ``W``, a fixed tree), so a step is still one forward pass
and one host sync (reading every row's accepted tokens). The host knows ``W`` and every row's length
from that read, so the rare re-layouts it orders (a row finished, a row joined, the slots ran out)
need no further sync: they compact every row's valid slots to the right of a new, smaller ``W``.

Only greedy acceptance is batched: each row's tokens are then exactly its own greedy continuation.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from medusa.acceptance import AcceptanceScheme, GreedyAcceptance
from medusa.cache import MedusaCache, attention_mask_for, num_cache_layers
from medusa.decoding import DecodingStats, StepOutput, model_device
from medusa.errors import MedusaError
from medusa.heads import MedusaHeads
from medusa.tree import Tree

PAD_TOKEN = 0  # any id in the vocabulary: padded slots are never visible to a real token


def greedy_batch(tree: Tree, tree_tokens: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``GreedyAcceptance.accept`` for every row at once.

    ``tree_tokens [batch, size]``, ``logits [batch, size, vocab]`` -> ``(path [batch, depth + 1],
    accepted [batch], next_token [batch])``: per row the longest path matching the base argmax.
    """
    predicted = logits.argmax(-1)  # [batch, size]
    candidates = tree_tokens[:, tree.retrieve_paths]  # [batch, leaves, depth + 1]
    parent_prediction = predicted[:, tree.retrieve_paths]
    matches = (candidates[:, :, 1:] == parent_prediction[:, :, :-1]) & tree.retrieve_valid[None, :, 1:]
    accepted_per_path = matches.long().cumprod(dim=2).sum(dim=2)  # [batch, leaves]
    best = accepted_per_path.argmax(dim=1)  # [batch]; the first of equals, like the single-row rule
    path = tree.retrieve_paths.index_select(0, best)  # [batch, depth + 1]
    accepted = accepted_per_path.gather(1, best[:, None])[:, 0]
    next_token = predicted.gather(1, path.gather(1, accepted[:, None]))[:, 0]
    return path, accepted, next_token


class BatchDecoder:
    """Device state of a batch of generations; rows join (``admit``) and leave (``remove``) between steps."""

    def __init__(
        self, base_model: PreTrainedModel, heads: MedusaHeads | None, tree: Tree, acceptance: AcceptanceScheme
    ) -> None:
        if not isinstance(acceptance, GreedyAcceptance):
            raise MedusaError(
                f"batched generation supports greedy decoding only (temperature 0), not {acceptance.name!r} "
                "acceptance; generate sampled answers one prompt at a time"
            )
        if tree.lookup:
            raise MedusaError("batched generation has no lookup branch yet: set lookup to 0, or generate one prompt at a time")
        if heads is None and tree.size != 1:
            raise ValueError("decoding without heads needs the one-node tree")
        if heads is not None:
            tree.check_heads(heads.config.num_heads)
        self.base = base_model
        self.heads = heads
        self.device = model_device(base_model)
        self.dtype = base_model.dtype
        self.tree = tree.to(self.device)
        self.num_layers = num_cache_layers(base_model.config)
        self.hidden_size = base_model.config.get_text_config().hidden_size
        self.cache: MedusaCache | None = None
        self.capacity = 0  # slots per row
        self.write = 0  # W on the host: the host learns every advance from the step's one read
        self.lengths: list[int] = []  # committed tokens per row, prompt included, on the host
        self.write_position = torch.zeros((), dtype=torch.long, device=self.device)  # W on the device
        self.length = torch.zeros(0, dtype=torch.long, device=self.device)
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        self.slot_positions = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.root_token = torch.zeros(0, dtype=torch.long, device=self.device)
        self.last_hidden = torch.zeros(0, self.hidden_size, dtype=self.dtype, device=self.device)
        self._keeps_last_logits = "logits_to_keep" in inspect.signature(base_model.forward).parameters

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    # ----- joining and leaving (between steps) --------------------------------------------------

    def admit(self, prompts: Sequence[torch.Tensor], reserve: int) -> None:
        """Prefill ``prompts`` (1-D token ids) together and append them as new rows.

        Their prompts end at the (possibly raised) write position: left padding for a fresh batch, and
        for rows joining a running one the other rows get holes up to it. ``reserve`` is how many slots
        beyond that to keep free (the longest remaining generation), so the cache rarely needs re-laying.
        """
        if not prompts:
            return
        lengths = [int(p.numel()) for p in prompts]
        if min(lengths) < 1:
            raise MedusaError("the prompt is empty")
        fresh_cache, root, hidden = self._prefill(prompts)
        longest = max(lengths)
        new_write = max(self.write, longest)
        capacity = max(self.capacity, new_write + self.tree.size + reserve)
        old_rows, joining = self.batch_size, len(prompts)
        rows = old_rows + joining
        cache = MedusaCache(self.num_layers, capacity)
        for index, layer in enumerate(cache.layers):
            source = fresh_cache.layers[index]
            self._allocate(layer, source.keys, source.values, rows)
            if old_rows:
                old = self.cache.layers[index]
                layer.keys[:old_rows, :, : self.capacity] = old.keys
                layer.values[:old_rows, :, : self.capacity] = old.values
            layer.keys[old_rows:, :, new_write - longest : new_write] = source.keys
            layer.values[old_rows:, :, new_write - longest : new_write] = source.values
        slots = torch.arange(capacity, device=self.device)
        starts = torch.tensor([new_write - n for n in lengths], device=self.device)
        new_valid = (slots[None, :] >= starts[:, None]) & (slots[None, :] < new_write)
        new_positions = (slots[None, :] - starts[:, None]).clamp_min(0)
        valid = torch.zeros(rows, capacity, dtype=torch.bool, device=self.device)
        positions = torch.zeros(rows, capacity, dtype=torch.long, device=self.device)
        valid[:old_rows, : self.capacity] = self.valid
        positions[:old_rows, : self.capacity] = self.slot_positions
        valid[old_rows:] = new_valid
        positions[old_rows:] = new_positions
        self.cache, self.capacity, self.write = cache, capacity, new_write
        self.valid, self.slot_positions = valid, positions
        self.lengths = self.lengths + lengths
        self.length = torch.cat([self.length, torch.tensor(lengths, device=self.device)])
        self.root_token = torch.cat([self.root_token, root.to(self.device)])
        self.last_hidden = torch.cat([self.last_hidden, hidden.to(self.device, self.dtype)])
        self.write_position.fill_(new_write)

    def remove(self, rows: Iterable[int]) -> None:
        """Drop finished rows; the others are compacted (their holes squeezed out) in the same copy."""
        gone = set(rows)
        keep = [row for row in range(self.batch_size) if row not in gone]
        if len(keep) == self.batch_size:
            return
        if not keep:
            self._empty()
            return
        self._relayout(keep, self.capacity)

    def record(self, counts: Sequence[int]) -> None:
        """Host bookkeeping after a step, from its one read: every row's committed count, and ``W``."""
        self.lengths = [length + count for length, count in zip(self.lengths, counts)]
        self.write += max(counts)

    def _empty(self) -> None:
        """No rows: drop the cache; the next ``admit`` starts afresh."""
        self.cache, self.capacity, self.write, self.lengths = None, 0, 0, []
        self.write_position.zero_()
        self.length = self.length[:0]
        self.valid = self.valid[:0, :0]
        self.slot_positions = self.slot_positions[:0, :0]
        self.root_token = self.root_token[:0]
        self.last_hidden = self.last_hidden[:0]

    def make_room(self, reserve: int) -> None:
        """Before a step: make sure the tree fits after ``W``; compact (and grow by ``reserve``) if not."""
        if self.write + self.tree.size <= self.capacity:
            return
        needed = max(self.lengths) + self.tree.size
        self._relayout(list(range(self.batch_size)), max(self.capacity, needed + reserve))

    def _relayout(self, keep: list[int], capacity: int) -> None:
        """Keep rows ``keep`` and move each one's valid slots, in order, to end at ``W = max length``."""
        rows = torch.tensor(keep, device=self.device)
        lengths = [self.lengths[row] for row in keep]
        new_write = max(lengths)
        valid = self.valid.index_select(0, rows)
        counts = torch.tensor(lengths, device=self.device)
        # Slot s of a row goes to new_write - count + (its rank among the row's valid slots); invalid
        # slots are sent to a spare column that is cut off. ``source`` says where each new slot reads.
        ranks = valid.long().cumsum(dim=1) - 1
        targets = torch.where(valid, new_write - counts[:, None] + ranks, capacity)
        source = torch.zeros(len(keep), capacity + 1, dtype=torch.long, device=self.device)
        old_slots = torch.arange(self.capacity, device=self.device).expand(len(keep), -1)
        source.scatter_(1, targets, old_slots)
        new_valid = torch.zeros(len(keep), capacity + 1, dtype=torch.bool, device=self.device)
        new_valid.scatter_(1, targets, valid)
        source, new_valid = source[:, :capacity], new_valid[:, :capacity]
        cache = MedusaCache(self.num_layers, capacity)
        for old, layer in zip(self.cache.layers, cache.layers):
            self._allocate(layer, old.keys, old.values, len(keep))
            where = source.to(old.keys.device)
            for name in ("keys", "values"):
                kept = getattr(old, name).index_select(0, rows.to(old.keys.device))
                index = where[:, None, :, None].expand(-1, kept.shape[1], -1, kept.shape[3])
                getattr(layer, name).copy_(kept.gather(2, index))
        self.cache, self.capacity, self.write = cache, capacity, new_write
        self.valid = new_valid
        self.slot_positions = self.slot_positions.index_select(0, rows).gather(1, source)
        self.lengths = lengths
        self.length = self.length.index_select(0, rows)
        self.root_token = self.root_token.index_select(0, rows)
        self.last_hidden = self.last_hidden.index_select(0, rows)
        self.write_position.fill_(new_write)

    @staticmethod
    def _allocate(layer, keys: torch.Tensor, values: torch.Tensor, rows: int) -> None:
        """Give a fresh ``StaticLayer`` zeroed buffers for ``rows`` rows, shaped and placed like ``keys``."""
        layer.lazy_initialization(
            keys.new_empty((rows, keys.shape[1], 0, keys.shape[3])),
            values.new_empty((rows, values.shape[1], 0, values.shape[3])),
        )

    # ----- the forward passes -------------------------------------------------------------------

    def _forward(
        self, input_ids: torch.Tensor, allowed: torch.Tensor, query_positions: torch.Tensor,
        key_positions: torch.Tensor, cache: MedusaCache, last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = attention_mask_for(self.base.config, allowed, query_positions, key_positions, self.dtype)
        extra = {"logits_to_keep": 1} if last_only and self._keeps_last_logits else {}
        output = self.base(
            input_ids=input_ids,
            position_ids=query_positions,
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
            **extra,
        )
        return output.logits, output.hidden_states[-1]

    def _prefill(self, prompts: Sequence[torch.Tensor]) -> tuple[MedusaCache, torch.Tensor, torch.Tensor]:
        """Run the prompts left-padded in a cache of their own; return it, the first tokens and last hidden states."""
        longest = max(int(p.numel()) for p in prompts)
        ids = torch.full((len(prompts), longest), PAD_TOKEN, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            ids[row, longest - prompt.numel() :] = prompt.to(self.device)
        starts = torch.tensor([longest - p.numel() for p in prompts], device=self.device)
        slots = torch.arange(longest, device=self.device)
        real = slots[None, :] >= starts[:, None]  # [rows, slots]
        causal = slots[None, :] <= slots[:, None]  # [queries, slots]
        # A padding query sees itself only, so no row of the mask is empty.
        allowed = (real[:, None, :] & causal[None]) | torch.eye(longest, dtype=torch.bool, device=self.device)[None]
        positions = (slots[None, :] - starts[:, None]).clamp_min(0)
        cache = MedusaCache(self.num_layers, longest)
        cache.set_length(torch.zeros((), dtype=torch.long, device=self.device))
        logits, hidden = self._forward(ids, allowed, positions, positions, cache, last_only=True)
        return cache, logits[:, -1].argmax(-1), hidden[:, -1]

    def propose(self) -> torch.Tensor:
        """Tree tokens ``[batch, size]``: each row's root, then its heads' top-k at each node's rank."""
        if self.heads is None:
            return self.root_token.clone()[:, None]
        head_logits = self.heads(self.last_hidden)  # [heads, batch, vocab]
        top = head_logits.topk(self.tree.topk, dim=-1).indices.to(self.device)  # [heads, batch, topk]
        flat = torch.cat([self.root_token[:, None], top.permute(1, 0, 2).flatten(1)], dim=1)
        return flat[:, self.tree.candidate_index]

    def step(self) -> torch.Tensor:
        """One propose/verify/accept/commit for every row, on the device.

        Returns ``[batch, 1 + depth + 1]``: per row how many tokens it commits, then its path's tokens.
        """
        tree, rows = self.tree, self.batch_size
        tree_tokens = self.propose()
        write = self.write_position
        slots = torch.arange(self.capacity, device=self.device)
        relative = slots - write
        in_tree = (relative >= 0) & (relative < tree.size)
        node = relative.clamp(0, tree.size - 1)
        # Committed slots stop at W (every slot from W on is invalid), tree slots start there.
        allowed = self.valid[:, None, :] | (tree.attention_mask[:, node] & in_tree)[None]
        query_positions = self.length[:, None] + tree.depths[None, :]
        key_positions = torch.where(in_tree[None], self.length[:, None] + tree.depths[node][None], self.slot_positions)
        self.cache.set_length(write)
        logits, hidden = self._forward(tree_tokens, allowed, query_positions, key_positions, self.cache)
        path, accepted, next_token = greedy_batch(tree, tree_tokens, logits.to(self.device))
        counts = accepted + 1
        span = torch.arange(tree.max_depth + 1, device=self.device)
        targets = write + span
        sources = write + path  # [rows, depth + 1]: every row's path, moved to the front of its tree slots
        for layer in self.cache.layers:
            here = sources.to(layer.keys.device)
            for buffer in (layer.keys, layer.values):
                index = here[:, None, :, None].expand(-1, buffer.shape[1], -1, buffer.shape[3])
                buffer.index_copy_(2, targets.to(buffer.device), buffer.gather(2, index))
        self.valid.index_copy_(1, targets, span[None, :] < counts[:, None])
        self.slot_positions.index_copy_(1, targets, self.length[:, None] + span[None, :])
        self.length += counts
        self.write_position += counts.max()
        last_node = path.gather(1, accepted[:, None])  # [rows, 1]
        hidden = hidden.to(self.device)
        self.last_hidden = hidden.gather(1, last_node[:, :, None].expand(rows, 1, hidden.shape[-1]))[:, 0]
        self.root_token = next_token
        return torch.cat([counts[:, None], tree_tokens.gather(1, path)], dim=1)


@dataclass(eq=False)
class BatchSequence:
    """One generation in a batch, seen from the host: its limits, its tokens so far, its statistics."""

    prompt_ids: torch.Tensor
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    tokens: list[int] = field(default_factory=list)
    stats: DecodingStats = field(default_factory=DecodingStats)
    finished: bool = False
    started: float = 0.0  # when its decoding began (after its prefill)

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - self.stats.new_tokens


class BatchRunner:
    """Runs sequences through a ``BatchDecoder``: each stops at its own EOS or ``max_new_tokens``.

    ``add`` and ``finish`` act at step boundaries, so sequences may join a running batch (dynamic
    batching) and leave it (stop strings, cancellation) while the others carry on.
    """

    def __init__(self, decoder: BatchDecoder) -> None:
        self.decoder = decoder
        self.sequences: list[BatchSequence] = []  # row i of the decoder is sequences[i]

    @property
    def active(self) -> int:
        return len(self.sequences)

    def _reserve(self) -> int:
        return max((s.remaining for s in self.sequences), default=0)

    def add(self, sequences: Sequence[BatchSequence]) -> None:
        """Prefill ``sequences`` together and let them join the batch."""
        for sequence in sequences:
            if sequence.max_new_tokens < 1:
                raise MedusaError(f"max_new_tokens must be a positive integer, got {sequence.max_new_tokens!r}")
        started = time.perf_counter()
        reserve = max([s.max_new_tokens for s in sequences] + [self._reserve()])
        with torch.inference_mode():
            self.decoder.admit([s.prompt_ids for s in sequences], reserve)
            if self.decoder.device.type == "cuda":
                torch.cuda.synchronize(self.decoder.device)
        now = time.perf_counter()
        for sequence in sequences:
            sequence.stats.prompt_tokens = int(sequence.prompt_ids.numel())
            sequence.stats.acceptance = "greedy"
            sequence.stats.prefill_seconds = now - started
            sequence.started = now
        self.sequences.extend(sequences)

    def step(self) -> list[tuple[BatchSequence, StepOutput]]:
        """One step of every running sequence; finished ones leave the batch before this returns."""
        if not self.sequences:
            return []
        with torch.inference_mode():
            self.decoder.make_room(self._reserve())
            values = self.decoder.step().tolist()  # the one host sync of the step
        now = time.perf_counter()
        self.decoder.record([value[0] for value in values])
        outputs = []
        for sequence, value in zip(self.sequences, values):
            accepted = value[0]
            tokens = value[1 : 1 + accepted][: sequence.remaining]
            for index, token in enumerate(tokens):
                if token in sequence.eos_token_ids:
                    tokens = tokens[: index + 1]
                    sequence.stats.finish_reason = "stop"
                    sequence.finished = True
                    break
            sequence.tokens.extend(tokens)
            sequence.stats.steps += 1
            sequence.stats.accepted_per_step.append(accepted)
            sequence.stats.new_tokens += len(tokens)
            sequence.stats.decode_seconds = now - sequence.started
            if sequence.remaining <= 0:
                sequence.finished = True
            outputs.append((sequence, StepOutput(tokens=tokens, accepted=accepted)))
        self.finish([s for s in self.sequences if s.finished])
        return outputs

    def finish(self, sequences: Iterable[BatchSequence], reason: str | None = None) -> None:
        """Take sequences out of the batch now (between steps); ``reason`` overrides their finish reason."""
        leaving = {id(s) for s in sequences}
        rows = [row for row, s in enumerate(self.sequences) if id(s) in leaving]
        if not rows:
            return
        for row in rows:
            self.sequences[row].finished = True
            if reason is not None:
                self.sequences[row].stats.finish_reason = reason
        with torch.inference_mode():
            self.decoder.remove(rows)
        self.sequences = [s for s in self.sequences if id(s) not in leaving]
