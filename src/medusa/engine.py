"""The decoding engine: generations join and leave a running batch between steps, on one ``Decoder``.

Every way of generating goes through here: ``MedusaModel.generate`` and ``stream`` (a batch of one),
batched ``generate``, the server's continuous batching. The engine keeps the running rows within the
smallest batch bucket that holds them (1, 2, 4, ..., with that bucket's tree) and runs each step in it,
replays the step as a CUDA graph on a GPU, and does the host bookkeeping that every caller shares: EOS,
stop strings, length limits, log-probabilities and statistics.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import PreTrainedModel

from medusa.acceptance import AcceptanceScheme, StepKind
from medusa.decoding import (
    ATTENTION_SPAN_STEP,
    PREFILL_GROUP,
    PREFILL_WIDTHS,
    Decoder,
    DecodingStats,
    StepOutput,
    attention_spans,
    prefill_group_limit,
    prefill_kind,
    prefill_width,
)
from medusa.devices import spans_devices, synchronize
from medusa.errors import MedusaError
from medusa.graphs import StepGraphs
from medusa.heads import MedusaHeads
from medusa.lookup import DEFAULT_MAX_NGRAM, check_lookup
from medusa.speculation import SpeculationSwitch
from medusa.tree import Tree

logger = logging.getLogger("medusa")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # a step runs the smallest that holds the running rows
CACHE_BUCKET = 256  # slots per row are rounded up to this, so one engine (and its graphs) serves many prompts


def bucket_for(rows: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int:
    """The smallest batch bucket that holds ``rows`` running rows."""
    for bucket in buckets:
        if bucket >= rows:
            return bucket
    raise MedusaError(f"{rows} rows do not fit the largest batch bucket, {buckets[-1]}")


PREFILL_PIECES = (8, 4, 2, 1)  # the group sizes a captured prefill has graphs for (largest first)
# A captured prefill of fewer prompts than a size graphs exist for may be filled up with copies of its first prompt
# (written to the same row: the same values, or values within rounding of them where a matrix kernel sums rows in
# different orders) when they are at most a quarter of it or cost at most this many tokens. On the H100 a captured
# prefill of the default model took 4.6 ms for one 73-token prompt and 6.1 ms for eight (it is launch-bound), and
# a join of 8 mixed Spec-Bench prompts had run as about four prefills, most of 1-2 prompts
# (docs/benchmarks/h200-batch-engine-v4/).
PREFILL_COPY_TOKENS = 256


def prefill_piece_size(count: int, largest: int, width: int) -> int:
    """How many prompts the next captured prefill of ``width`` takes when ``count`` are waiting (at most
    ``largest``): a size of ``PREFILL_PIECES``, filled with copies where they are cheap, else the largest that fits."""
    fits = [size for size in PREFILL_PIECES if size <= largest]
    smallest_holding = min((size for size in fits if size >= count), default=None)
    if smallest_holding is not None:
        copies = smallest_holding - count
        if 4 * copies <= smallest_holding or copies * width <= PREFILL_COPY_TOKENS:
            return smallest_holding
    return max(size for size in fits if size <= count)


def prefill_plan(
    lengths: Sequence[int], max_length: int, captured: bool, group: int = PREFILL_GROUP
) -> list[tuple[list[int], int, bool]]:
    """How a joining group of prompts of ``lengths`` tokens is prefilled: ``(members, width, from a graph)``;
    a member may repeat (a copy filling a captured prefill up to a size graphs exist for). ``group``: the most
    prompts one prefill takes (the decoder's prompt buffers, ``min(rows, PREFILL_GROUP)``).

    Eagerly, the whole group at once at its longest prompt's width. With captured prefills, the longest prompts
    first: each prefill takes the longest waiting prompt's width (``decoding.prefill_width``) and the next
    prompts of that width or the one below it (a 20-token prompt is not padded to 512 because a long one joins with
    it), as many as that width allows (``prefill_group_limit``: 4 prompts at 1024, 2 at 2048) in a size graphs
    exist for (``prefill_piece_size``); prompts wider than any graph together, eagerly, last.
    """
    if not captured:
        return [(list(range(len(lengths))), max(lengths), False)]
    widths = [prefill_width(length, max_length) for length in lengths]
    waiting = sorted((index for index, width in enumerate(widths) if width), key=lambda index: -lengths[index])
    plan = []
    while waiting:
        width = widths[waiting[0]]
        limit = prefill_group_limit(width, group)
        joining = [index for index in waiting[:limit] if 2 * widths[index] >= width]  # the longest come first
        size = prefill_piece_size(len(joining), limit, width)
        members = joining[:size]
        plan.append((members + members[:1] * (size - len(members)), width, True))
        waiting = waiting[len(members) :]
    eager = [index for index, width in enumerate(widths) if width is None]
    if eager:
        plan.append((eager, max(lengths[index] for index in eager), False))
    return plan


def check_count(name: str, value: object, unit: str = "slots") -> None:
    """Refuse a count setting (cache slots, rows) that is neither None nor a positive integer (bools are not counts)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise MedusaError(f"{name} must be a positive number of {unit} or None, got {value!r}")


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs, apart from what any one request asks; frozen and hashable, it is the key under
    which a model keeps its engines."""

    # False decodes plainly, one token per step, on the same cache: the honest baseline.
    use_heads: bool = True
    # A lookup branch of this many nodes in the tree: guesses copied from where the text's last tokens
    # occurred before (medusa.lookup). None: the trees as tuned (with the chain `medusa tree tune` chose).
    lookup: int | None = None
    lookup_ngram: int = DEFAULT_MAX_NGRAM  # the longest suffix searched for
    # Replay each step as a CUDA graph on GPUs (falls back to eager, with one warning, if capture fails).
    cuda_graphs: bool = True
    # Also fuse the step's kernels with torch.compile before capture (slow first call, faster steps).
    compile: bool | str = False  # True, or "max-autotune" to also tune the matrix kernels
    # Allocate at least this many cache slots per row, so that one engine (its CUDA graphs, its compiled
    # steps) serves every prompt that fits; longer ones still get a longer cache when the engine is idle.
    cache_length: int | None = None
    # Uncompiled steps attend over the cache's first multiple of this many slots that holds every tree
    # (one CUDA graph per span), not over every preallocated slot. None: always every slot.
    attention_span_step: int | None = ATTENTION_SPAN_STEP
    # Launch each step as soon as the previous one's tokens are read, before the host's per-row bookkeeping, so
    # the device does not wait for the host between steps. None: where the device runs apart from the host (CUDA).
    overlap: bool | None = None
    # A step's attention reads each row's own committed slots and tree (FlashAttention's variable-length kernel on
    # CUDA), not every row up to the longest one's span. Off: on the H100 it made steps slower, not faster
    # (docs/benchmarks/h100-ragged-attention/); None turns it on where that kernel runs, uncompiled.
    ragged_attention: bool | None = False
    # Time the steps and, per batch bucket and step kind, run plain one-token steps where they have been committing
    # more tokens per row and second than the bucket's tree (``medusa.speculation``); the tokens are the same.
    adaptive: bool = False

    def __post_init__(self) -> None:
        check_lookup(0 if self.lookup is None else self.lookup, self.lookup_ngram)
        check_count("cache_length", self.cache_length)
        check_count("attention_span_step", self.attention_span_step)
        if self.compile not in (False, True, "max-autotune"):
            raise MedusaError(f"compile must be False, True or 'max-autotune', got {self.compile!r}")


class Detokenizer(Protocol):
    """Turns a generation's tokens into text as they come, and finds its stop strings (``TextTracker``)."""

    def add(self, tokens: list[int]) -> tuple[str, int, bool]: ...  # (new text, tokens to keep, stopped)

    def flush(self) -> str: ...


@dataclass(eq=False)
class Generation:
    """One request in the engine, seen from the host: what it asked, its tokens so far, its statistics."""

    prompt_ids: torch.Tensor  # [prompt_len]
    max_new_tokens: int
    acceptance: AcceptanceScheme
    seed: int | None = None  # None: a fresh random one
    eos_token_ids: frozenset[int] = frozenset()
    detokenizer: Detokenizer | None = None
    logprobs: int | None = None  # None: none; k: each token's log-probability and its top k alternatives
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    token_logprobs: list[float] = field(default_factory=list)
    token_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    stats: DecodingStats = field(default_factory=DecodingStats)
    finished: bool = False
    started: float = 0.0  # when its decoding began (after its prefill)
    row: int = -1

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - self.stats.new_tokens

    def absorb(self, accepted: int, tokens: list[int], logprobs=None, top=None) -> StepOutput:
        """Bookkeeping after a step: cut at EOS, ``max_new_tokens`` and stop strings; count; finish."""
        tokens = tokens[: self.remaining]
        for index, token in enumerate(tokens):
            if token in self.eos_token_ids:
                tokens = tokens[: index + 1]
                self.stats.finish_reason = "stop"
                self.finished = True
                break
        text = ""
        if self.detokenizer is not None:
            text, keep, stopped = self.detokenizer.add(tokens)
            tokens = tokens[:keep]
            if stopped:
                self.stats.finish_reason = "stop"
                self.finished = True
        self.tokens.extend(tokens)
        self.text += text
        self.stats.steps += 1
        self.stats.accepted_per_step.append(accepted)
        self.stats.new_tokens += len(tokens)
        self.stats.decode_seconds = time.perf_counter() - self.started
        if self.remaining <= 0:
            self.finished = True
        output = StepOutput(tokens=tokens, accepted=accepted, text=text)
        if self.logprobs is not None and logprobs is not None:
            output.logprobs = logprobs[: len(tokens)]
            ids, values = top
            output.top_logprobs = [
                list(zip(ids[i][: self.logprobs], values[i][: self.logprobs])) for i in range(len(tokens))
            ]
            self.token_logprobs.extend(output.logprobs)
            self.token_top_logprobs.extend(output.top_logprobs)
        return output

    def finish_text(self) -> str:
        """The text held back at the end (an unfinished stop-string prefix that never completed)."""
        tail = self.detokenizer.flush() if self.detokenizer is not None else ""
        self.text += tail
        return tail


@dataclass
class InFlight:
    """A launched step whose outputs are not read yet, and the generation each row held when it was launched."""

    rows: list[Generation | None]
    outputs: tuple[torch.Tensor, ...]
    values: list | None = None  # the outputs, once read to the host (the step's one sync)
    key: tuple[int, StepKind] | None = None  # (bucket, kind), where the adaptive switch chose the step's mode
    plain: bool = False  # it verified each row's next token alone
    launched: float = 0.0  # host time of its launch

    def read(self) -> list:
        if self.values is None:
            with torch.inference_mode():
                self.values = [tensor.tolist() for tensor in self.outputs]
        return self.values


@dataclass
class StepTimes:
    """Host seconds spent in the engine's steps, by what the host was doing: where a batch's wall time goes
    between the device's work (``wait`` is the part the device was still busy with)."""

    steps: int = 0
    plain_steps: int = 0  # of those, steps the adaptive switch ran plain (each row's next token alone)
    launch: float = 0.0  # choosing a step's shape and launching it (a graph replay, or eager kernels)
    wait: float = 0.0  # waiting for the device, and reading every row's accepted tokens: the step's one sync
    bookkeeping: float = 0.0  # per row: EOS, stop strings, limits, text, statistics
    leave: float = 0.0  # finished rows leaving the batch (their release, and the move that packs the rest)
    prefills: int = 0  # joining groups prefilled (between steps, so outside the step times above)
    prefill: float = 0.0  # seconds those prefills took, to the device's end


def running(generation: Generation | None) -> bool:
    return generation is not None and not generation.finished


class DecodingEngine:
    """Generations decoded together on one ``Decoder``; ``add`` and ``finish`` act between steps.

    ``trees`` gives the tree a batch bucket runs (``trees(bucket)``); a step runs the smallest bucket that holds
    the last running row, and ``finish`` keeps that bucket the smallest that holds the running rows.
    """

    decoder_class = Decoder  # what holds the device state (tests substitute a decoder with planted guesses)

    def __init__(
        self,
        base_model: PreTrainedModel,
        heads: MedusaHeads | None,
        trees: Callable[[int], Tree],
        options: EngineOptions = EngineOptions(),
        max_rows: int = 1,
        max_length: int = CACHE_BUCKET,
    ) -> None:
        self.base = base_model
        self.heads = heads
        self.tree_of_bucket = trees
        self.options = options
        self.decoder: Decoder | None = None
        self.graphs: StepGraphs | None = None
        self.graphs_refused = False
        # A prefill whose capture failed prefills eagerly from then on; the steps keep their graphs.
        self.prefill_graphs_refused = False
        # Row i of the decoder runs rows[i]; None is a free row inside the batch (a step masks it), left by a
        # generation that finished and filled by the next to join. Rows move down only when the running ones
        # would fit a smaller bucket: moving a row's cache costs more than stepping an idle row.
        self.rows: list[Generation | None] = []
        self.lengths: list[int] = []  # each row's committed length, known on the host (0 for a free row)
        self.times = StepTimes()
        self._in_flight: InFlight | None = None  # with ``overlaps``: the step launched before the last bookkeeping
        # With ``options.adaptive``: chooses each step's mode (the bucket's tree, or plain) from the steps timed so far.
        self.switch: SpeculationSwitch | None = None
        self._last_read = 0.0  # host time the last step's tokens were read
        self._disturbed = False  # something besides the step in flight ran since its launch: its time is not its own
        self._build(max_rows, max_length)

    # ----- sizing ---------------------------------------------------------------------------------

    def _build(self, max_rows: int, max_length: int) -> None:
        self._settle()
        rows = bucket_for(max_rows)
        buckets = [bucket for bucket in BATCH_BUCKETS if bucket <= rows]
        trees = {bucket: self.tree_of_bucket(bucket) for bucket in buckets}
        heads = self.heads if any(tree.paths for tree in trees.values()) else None
        largest = max(tree.size for tree in trees.values())
        slots = -(-max(max_length, self.options.cache_length or 0, 1) // CACHE_BUCKET) * CACHE_BUCKET
        self.decoder = self.decoder_class(
            self.base,
            heads,
            trees,
            rows,
            slots + largest,
            self.options.lookup_ngram,
            one_store=not self.options.compile,
            ragged_attention=self._ragged_attention(),
        )
        # A compiled step is specialised to its shapes, and compiling takes minutes: one attention span only.
        span_step = None if self.options.compile else self.options.attention_span_step
        self.spans = attention_spans(self.decoder.max_length, largest, span_step)
        overlap = self.options.overlap
        self.overlaps = self.decoder.device.type == "cuda" if overlap is None else overlap
        self.graphs = None
        use_graphs = self.options.cuda_graphs and self.decoder.device.type == "cuda" and not spans_devices(self.base)
        if use_graphs and not self.graphs_refused:
            self.graphs = StepGraphs(self.decoder, self.options.compile)
        # Kept when the decoder grows: what it measured still holds for the same trees on the same device.
        if self.options.adaptive and self.switch is None and largest > 1:
            self.switch = SpeculationSwitch()
        self._disturbed = True

    def _ragged_attention(self) -> bool | None:
        """The option as the decoder takes it (None: it probes for the kernel); "auto" leaves compiled steps alone."""
        ragged = self.options.ragged_attention
        return False if ragged is None and self.options.compile else ragged

    def reserve(self, rows: int, length: int) -> None:
        """Make room for ``rows`` running rows of up to ``length`` slots each; only an idle engine is rebuilt."""
        decoder = self.decoder
        if rows <= decoder.max_rows and length + decoder.largest_tree() <= decoder.max_length:
            return
        if self.generations:
            raise MedusaError(
                f"the running batch has room for {decoder.max_rows} rows of {decoder.max_length} slots; "
                f"a request needing {length} slots must wait for it to empty"
            )
        # Grow at least twofold: every rebuild drops the captured graphs, so a stream of ever longer prompts
        # rebuilds a few times, not once per prompt.
        slots = decoder.max_length - decoder.largest_tree()
        self._build(max(rows, decoder.max_rows), max(length, 2 * slots if length > slots else slots))

    def fits(self, length: int) -> bool:
        """Whether a row of ``length`` slots (prompt plus new tokens) fits the running cache."""
        return length + self.decoder.largest_tree() <= self.decoder.max_length

    @property
    def generations(self) -> list[Generation]:
        """The running generations, in row order."""
        return [generation for generation in self.rows if generation is not None]

    @property
    def active(self) -> int:
        return sum(generation is not None for generation in self.rows)

    @property
    def capacity(self) -> int:
        return self.decoder.max_rows

    # ----- joining and leaving --------------------------------------------------------------------

    def add(self, generations: Sequence[Generation]) -> None:
        """Prefill ``generations`` and let them join the running batch (between steps)."""
        for generation in generations:
            if generation.max_new_tokens < 1:
                raise MedusaError(f"max_new_tokens must be a positive integer, got {generation.max_new_tokens!r}")
            if generation.prompt_ids.numel() < 1:
                raise MedusaError("the prompt is empty")
            if generation.seed is None:
                generation.seed = random.randrange(2**63)
        self._disturbed = True  # the prefill runs inside the step in flight's time
        if self._in_flight is not None:
            # Read the step in flight before a prefill runs: the captured graphs share one memory pool, and a prefill
            # captured before a step may reuse, as its own scratch memory, what became that step's outputs (the first
            # H100 run of overlapped steps decoded garbage tokens this way).
            started = time.perf_counter()
            self._in_flight.read()
            self.times.wait += time.perf_counter() - started
        longest = max(g.prompt_ids.numel() + g.max_new_tokens for g in generations)
        self.reserve(self.active + len(generations), longest)
        for start in range(0, len(generations), PREFILL_GROUP):
            self._prefill(generations[start : start + PREFILL_GROUP])
        if self._capture_ahead(longest):  # not timed: decoding starts after it
            now = time.perf_counter()
            for generation in generations:
                generation.started = now

    def _capture_ahead(self, longest: int) -> bool:
        """Capture the graphs the running batch may need before its next step: every bucket up to its own, every
        span up to its longest row's end, for the kind of step its rows ask for. A capture then never lands inside
        a step (each graph is kept for the engine's life, so this costs something only the first time). Returns
        whether anything was captured."""
        if self.graphs is None:
            return False
        captured = self.graphs.report.graphs
        kind = self.step_shape()[2]
        buckets = [bucket for bucket in BATCH_BUCKETS if bucket <= bucket_for(len(self.rows))]
        # Only spans that hold every running row's next tree: a capture's warm-up steps run on the rows as they are.
        now = max(self.lengths) + self.decoder.largest_tree()
        end = max(longest, *self.lengths) + self.decoder.largest_tree()
        last = next((s for s in self.spans if s >= end), self.spans[-1])
        spans = [span for span in self.spans if now <= span <= last] or [last]
        try:
            with torch.inference_mode():
                for bucket in buckets:
                    for span in spans:
                        for plain in self._modes():
                            self.graphs.prepare(bucket, span, kind, plain)
        except Exception as error:  # a model whose forward cannot be captured still decodes eagerly
            self.graphs, self.graphs_refused = None, True
            logger.warning("CUDA graph capture failed, decoding eagerly instead: %s", error)
        return self.graphs is not None and self.graphs.report.graphs > captured

    def capture(self, kinds: Sequence[StepKind], max_graphs: int | None = None) -> bool:
        """Capture now the graphs this engine's prefills and steps of ``kinds`` may replay: the prefill of every
        prompt width and group size it takes (``prefill_group_limit``), then every bucket up to its rows and every
        attention span, the shortest spans first, up to ``max_graphs`` graphs in all (None: all). A server does this
        before it takes requests, so that no capture lands in a request's time; what is left out is captured when a
        batch first needs it. Only an idle engine, after its first generation (which makes the cache's
        buffers), captures like this. Returns whether steps replay graphs (False on a CPU, or where capture
        failed and steps run eagerly)."""
        if self.rows:
            raise MedusaError("the graphs are captured up front only on an idle engine")
        self._settle()
        if self.graphs is None:
            return False
        if not all(layer.is_initialized for layer in self.decoder.cache.layers):
            raise MedusaError("the graphs are captured after the engine's first generation (its cache has no buffers)")
        decoder = self.decoder
        buckets = [bucket for bucket in BATCH_BUCKETS if bucket <= decoder.max_rows]
        keys = [
            (bucket, span, kind, plain)
            for span in self.spans
            for kind in kinds
            for bucket in buckets
            for plain in self._modes()
        ]
        # The prefills first (fewer, and every request runs one): each width and group size it takes, idle rows loaded.
        group = decoder.prompt_rows.shape[0]
        widths = [width for width in PREFILL_WIDTHS if width <= decoder.max_length]
        prefill_kinds = list(dict.fromkeys(prefill_kind(kind) for kind in kinds))
        prefills = [
            (size, width, kind)
            for kind in prefill_kinds
            for width in widths
            for size in sorted(PREFILL_PIECES)
            if size <= prefill_group_limit(width, group)
        ]
        budget = len(prefills) + len(keys) if max_graphs is None else max_graphs
        try:
            with torch.inference_mode():
                for size, width, kind in prefills[:budget] if not self.prefill_graphs_refused else ():
                    decoder.prompt_rows[:size].copy_(torch.arange(size))
                    decoder.prompt_last[:size].fill_(0)
                    self.graphs.prepare_prefill(size, width, kind)
                    decoder.release(range(size))  # the capture's warm-ups prefilled those idle rows
        except Exception as error:  # prefills stay eager; the steps still capture
            self._refuse_prefill_graphs(error)
            with torch.inference_mode():
                decoder.release(range(decoder.prompt_rows.shape[0]))
        try:
            with torch.inference_mode():
                for key in keys[: max(budget - len(prefills), 0)]:
                    self.graphs.prepare(*key)
        except Exception as error:  # a model whose forward cannot be captured still decodes eagerly
            self.graphs, self.graphs_refused = None, True
            logger.warning("CUDA graph capture failed, decoding eagerly instead: %s", error)
        return self.graphs is not None

    def _modes(self) -> tuple[bool, ...]:
        """The step modes (plain or not) the engine may run: both where the adaptive switch chooses."""
        return (False, True) if self.switch is not None else (False,)

    def _prefill(self, generations: Sequence[Generation]) -> None:
        started = time.perf_counter()
        free = [row for row, generation in enumerate(self.rows) if generation is None]
        rows = (free + list(range(len(self.rows), len(self.rows) + len(generations))))[: len(generations)]
        lengths = [int(g.prompt_ids.numel()) for g in generations]
        with torch.inference_mode():
            group = self.decoder.prompt_rows.shape[0]
            for members, width, captured in prefill_plan(
                lengths, self.decoder.max_length, self.captures_prefills, group
            ):
                piece = [generations[index] for index in members]
                kind = self.decoder.load_prompts(
                    [rows[index] for index in members],
                    [g.prompt_ids for g in piece],
                    [g.acceptance for g in piece],
                    [g.seed for g in piece],
                    width,
                )
                self.run_prefill(len(piece), width, kind, captured)
            synchronize(self.decoder.device)
        now = time.perf_counter()
        for row, generation in zip(rows, generations):
            generation.row = row
            generation.stats.prompt_tokens = int(generation.prompt_ids.numel())
            generation.stats.acceptance = generation.acceptance.name
            generation.stats.prefill_seconds = now - started
            generation.started = now
            if row == len(self.rows):
                self.rows.append(None)
                self.lengths.append(0)
            self.rows[row] = generation
            self.lengths[row] = int(generation.prompt_ids.numel())
        self.times.prefills += 1
        self.times.prefill += now - started

    @property
    def captures_prefills(self) -> bool:
        """Whether prompts of up to 2048 tokens prefill through captured graphs: on a GPU with graphs, once the
        cache's buffers exist (the engine's first prefill, eager, makes them)."""
        ready = all(layer.is_initialized for layer in self.decoder.cache.layers)
        return self.graphs is not None and not self.prefill_graphs_refused and ready

    def run_prefill(self, prompts: int, width: int, kind: StepKind, captured: bool) -> None:
        """Prefill the ``prompts`` prompts loaded in the decoder at ``width``: a graph's replay where ``captured``."""
        if captured and self.graphs is not None and not self.prefill_graphs_refused:
            try:
                self.graphs.prefill(prompts, width, kind)
                return
            except Exception as error:  # this prefill, and every later one, runs eagerly (idempotent: it redoes all)
                self._refuse_prefill_graphs(error)
        self.decoder.prefill_step(prompts, width, kind)

    def _refuse_prefill_graphs(self, error: Exception) -> None:
        self.prefill_graphs_refused = True
        logger.warning("CUDA graph capture of a prefill failed, prefilling eagerly (steps keep theirs): %s", error)

    def finish(self, generations: Iterable[Generation], reason: str | None = None) -> None:
        """Take generations out of the batch now (between steps); ``reason`` overrides their finish reason.

        Their rows become free; the last running rows move down into free ones only when the batch then fits a
        smaller bucket, so a step never runs a bucket larger than its running rows need.
        """
        leaving = {id(g) for g in generations}
        rows = [row for row, g in enumerate(self.rows) if g is not None and id(g) in leaving]
        if not rows:
            return
        for row in rows:
            self.rows[row].finished = True
            if reason is not None:
                self.rows[row].stats.finish_reason = reason
            self.rows[row], self.lengths[row] = None, 0
        with torch.inference_mode():
            self.decoder.release(rows)
        self._trim()
        running = self.active
        if running and bucket_for(running) < bucket_for(len(self.rows)):
            holes = [row for row in range(running) if self.rows[row] is None]
            movers = [row for row in range(running, len(self.rows)) if self.rows[row] is not None]
            with torch.inference_mode():
                self.decoder.move(movers, holes)
            for hole, mover in zip(holes, movers):
                self.rows[hole], self.rows[mover] = self.rows[mover], None
                self.lengths[hole], self.lengths[mover] = self.lengths[mover], 0
                self.rows[hole].row = hole
            self._trim()

    def _trim(self) -> None:
        """Drop the free rows at the end: a step runs the smallest bucket that holds the last running row."""
        while self.rows and self.rows[-1] is None:
            self.rows.pop()
            self.lengths.pop()

    # ----- the step -------------------------------------------------------------------------------

    def step_shape(self) -> tuple[int, int, StepKind]:
        """The bucket, attention span and step kind the next step runs (host-side)."""
        rows = bucket_for(len(self.rows))
        tree = self.decoder.tree_for(rows)
        end = max(self.lengths) + tree.size
        span = next((s for s in self.spans if s >= end), self.decoder.max_length)
        wanted = [g.logprobs for g in self.generations if g.logprobs is not None]
        kind = StepKind.of([g.acceptance for g in self.generations], logprobs=max(wanted) if wanted else -1)
        return rows, span, kind

    def run_step(self, rows: int, span: int, kind: StepKind, plain: bool = False) -> tuple[torch.Tensor, ...]:
        """Run one step of this shape (``step_shape``) on the running rows, replayed as a graph where there is one;
        the device outputs, not yet read (timing and profiling call this directly). ``plain``: verify each row's next
        token alone instead of the bucket's tree."""
        if self.graphs is not None:
            try:
                return self.graphs(rows, span, kind, plain)
            except Exception as error:  # a model whose forward cannot be captured still decodes eagerly
                self.graphs, self.graphs_refused = None, True
                logger.warning("CUDA graph capture failed, decoding eagerly instead: %s", error)
        return self.decoder.step(rows, span, kind, plain)

    def step(self) -> list[tuple[Generation, StepOutput]]:
        """One step of every running generation; finished ones leave the batch before this returns.

        With ``overlaps``, the next step is launched as soon as this one's tokens are read, before the per-row
        bookkeeping (EOS, stop strings, text, statistics), so the device does not wait for the host between
        steps. A row that finishes in that bookkeeping has run one step more, whose output is never read; a row
        that reaches its token limit is released first, so that extra step cannot write past its cache.
        """
        if not self.rows:
            return []
        started = time.perf_counter()
        if self._in_flight is None or not any(running(g) for g in self._in_flight.rows):
            self._launch()
        launched = time.perf_counter()
        flight, self._in_flight = self._in_flight, None
        values = flight.read()  # the one host sync of the step: every row's accepted tokens (and log-probabilities)
        read = time.perf_counter()
        stepped = []  # (generation, accepted, tokens, logprobs, top alternatives)
        for row, generation in enumerate(flight.rows):
            if not running(generation):  # a free row, or one that left after this step was launched
                continue
            counts_and_tokens = values[0][row]
            accepted = counts_and_tokens[0]
            self.lengths[generation.row] += accepted  # its row now: it may have moved since the launch
            logprobs = top = None
            if len(values) > 1:
                logprobs, top = values[1][row][:accepted], (values[2][row], values[3][row])
            stepped.append((generation, accepted, counts_and_tokens[1 : 1 + accepted], logprobs, top))
        self._measure(flight, stepped, read)
        if self.overlaps:
            at_limit = [generation.row for generation, accepted, *_ in stepped if accepted >= generation.remaining]
            with torch.inference_mode():
                if at_limit:
                    self.decoder.release(at_limit)
                if len(at_limit) < self.active:
                    self._launch()
        relaunched = time.perf_counter()
        results = [(generation, generation.absorb(*rest)) for generation, *rest in stepped]
        absorbed = time.perf_counter()
        self.finish([g for g in self.rows if g is not None and g.finished])
        times = self.times
        times.steps += 1
        times.plain_steps += flight.plain
        times.launch += (launched - started) + (relaunched - read)
        times.wait += read - launched
        times.bookkeeping += absorbed - relaunched
        times.leave += time.perf_counter() - absorbed
        return results

    def _launch(self) -> None:
        """Launch the next step over the running rows, to be read by ``step``."""
        rows, span, kind = self.step_shape()
        plain = self.switch is not None and self.switch.plain((rows, kind))
        captured = self.graphs.report.graphs if self.graphs is not None else 0
        launched = time.perf_counter()
        self._disturbed = False
        with torch.inference_mode():
            outputs = self.run_step(rows, span, kind, plain)
        if self.graphs is not None and self.graphs.report.graphs != captured:
            self._disturbed = True  # a first replay captured its graph
        self._in_flight = InFlight(list(self.rows), outputs, key=(rows, kind), plain=plain, launched=launched)

    def _measure(self, flight: InFlight, stepped: list[tuple], read: float) -> None:
        """Tell the adaptive switch what a step just read took and committed per running row. Its time runs from its
        launch, or from the previous read where it was launched before that (overlapped), to its own read; a step
        that shared its time with a prefill, a capture or a rebuild is left out."""
        if self.switch is not None and flight.key is not None and stepped and not self._disturbed:
            seconds = read - max(flight.launched, self._last_read)
            tokens = sum(accepted for _, accepted, *_ in stepped) / len(stepped)
            self.switch.record(flight.key, flight.plain, seconds, tokens)
        self._last_read = read

    def _settle(self) -> None:
        """Wait for a step still in flight and drop it (its rows have all left): before the decoder is rebuilt or
        graphs are captured."""
        if self._in_flight is not None:
            synchronize(self.decoder.device)
            self._in_flight = None

    def run(
        self, generations: Sequence[Generation], max_rows: int | None = None
    ) -> Iterable[list[tuple[Generation, StepOutput]]]:
        """Decode ``generations`` to their ends, yielding each step's outputs, with at most ``max_rows`` running at
        once (None: the engine's rows). More join as earlier ones finish (continuous batching: no row waits for a
        whole batch to end), several at a time so that they share a prefill (a quarter of the rows, at most a
        prefill group)."""
        check_count("max_rows", max_rows, "rows")
        capacity = min(self.capacity, max_rows or self.capacity)
        pending = deque(generations)
        group = max(1, min(PREFILL_GROUP, capacity // 4))

        def join() -> None:
            room = capacity - self.active
            if pending and room and (not self.active or room >= min(group, len(pending))):
                self.add([pending.popleft() for _ in range(min(room, len(pending)))])

        try:
            join()
            while any(not g.finished for g in generations):
                yield self.step()
                join()
        finally:  # the caller stopped early (a client gone, a stop string): free the rows
            self.finish([g for g in generations if not g.finished])

    def capture_report(self):
        return self.graphs.report if self.graphs is not None else None
