"""Continuous batching in front of a ``MedusaModel``: a bounded wait line, deadlines and cancellation.

One worker thread owns a ``DecodingEngine`` (``medusa.engine``) and runs every request through it: at
each step boundary the requests at the head of the line join the running batch, up to ``max_batch``,
greedy and sampled alike (each row has its own settings and seed), and each leaves at its own EOS, stop
string, limit, cancellation or deadline while the others go on. With ``max_batch`` 1 requests run one
at a time. Requests beyond the line's capacity are refused at once (the server answers 429) rather than
left to pile up. A request's choices (``n``) enter the line together (``submit_all``); a job may first
score its prompt (``echo`` with logprobs), on the worker, which owns the model. Events go back through a
callback, so the engine knows nothing of asyncio or HTTP.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from medusa.acceptance import StepKind
from medusa.cache import kv_bytes_per_row
from medusa.decoding import DecodingStats
from medusa.engine import BATCH_BUCKETS, PREFILL_GROUP, DecodingEngine, EngineOptions, Generation
from medusa.errors import MedusaError
from medusa.model import GenerationChunk, GenerationConfig, MedusaModel
from medusa.serve.metrics import Metrics

log = logging.getLogger(__name__)


GPU_MAX_BATCH = 32  # the running batch on a GPU when no tuned trees say how far speculation pays
# The share of the GPU memory free at start that the running batch's KV cache may take by default (the rest is
# for the captured graphs, prefills and activations).
KV_MEMORY_SHARE = 0.5


def default_max_batch(
    model: MedusaModel, options: EngineOptions, cache_length: int, free_bytes: int | None = None
) -> int:
    """The running batch a GPU server allows by default: the largest batch bucket whose tuned tree still has
    guesses (where none pays, a bucket decodes with the root alone, and more rows only add latency), or
    ``GPU_MAX_BATCH`` without heads or without trees tuned per batch size for this device; at most as many
    rows of ``cache_length`` slots as fit ``KV_MEMORY_SHARE`` of ``free_bytes`` (default: the GPU's free
    memory)."""
    wanted = GPU_MAX_BATCH
    if options.use_heads and model.heads is not None and model.batch_trees:
        tuned = [1, *sorted(model.batch_trees)]  # bucket 1 runs the model's own (tuned) tree
        wanted = max((bucket for bucket in tuned if model.tree_for(options, bucket).size > 1), default=wanted)
    if free_bytes is None and model.device.type == "cuda":
        free_bytes = torch.cuda.mem_get_info(model.device)[0]
    if free_bytes is not None:
        row = kv_bytes_per_row(model.base_model.config, cache_length, model.base_model.dtype)
        fitting = [
            bucket for bucket in BATCH_BUCKETS if bucket <= wanted and bucket * row <= KV_MEMORY_SHARE * free_bytes
        ]
        wanted = max(fitting, default=1)
    return wanted


class QueueFull(Exception):
    """The wait line is full: come back in ``retry_after`` seconds (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineStopped(Exception):
    """The engine is shutting down and takes no more work (HTTP 503)."""


@dataclass
class EngineConfig:
    max_waiting: int = 16  # requests that may wait beyond the running batch; more are refused
    request_timeout: float = 300.0  # seconds from arrival to the end of the generation, queueing included
    max_batch: int = 1  # requests decoded together (continuous batching); 1 runs one generation at a time
    options: EngineOptions = field(default_factory=EngineOptions)  # how the decoding engine runs
    cache_length: int = 2048  # slots per row the running batch keeps (prompt plus new tokens)
    # Seconds a request may wait to join a running batch together with others, so that one prefill serves
    # them all (a prefill stalls every running row); None: JOIN_WAIT_PREFILLS times the mean prefill, as
    # measured; 0: each joins at the next step boundary. Nothing waits when no batch is running.
    join_wait: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or not 1 <= self.max_batch:
            raise MedusaError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        if self.max_batch > BATCH_BUCKETS[-1]:
            raise MedusaError(f"max_batch must be at most {BATCH_BUCKETS[-1]}, got {self.max_batch}")
        if self.max_waiting < 0:
            raise MedusaError(f"max_waiting must be 0 or more, got {self.max_waiting}")
        if self.request_timeout <= 0:
            raise MedusaError(f"request_timeout must be positive, got {self.request_timeout}")
        if self.join_wait is not None and not (isinstance(self.join_wait, (int, float)) and self.join_wait >= 0):
            raise MedusaError(f"join_wait must be 0 or more seconds (or None), got {self.join_wait!r}")


@dataclass
class Finished:
    finish_reason: str  # "stop" or "length"
    completion_tokens: int
    stats: DecodingStats


@dataclass
class Failed:
    reason: str  # "timeout", "invalid" (a MedusaError), "error", "cancelled", "shutdown"
    message: str


@dataclass
class PromptScored:
    """The prompt's tokens' log-probabilities (None for the first) and top alternatives, before any chunk."""

    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


Event = PromptScored | GenerationChunk | Finished | Failed
Sink = Callable[[Event], None]
WORKER_DIED = "the server's engine has stopped (its worker thread died); see the server's log"
# Retry-After before any generation has finished: an assumed generation time, in seconds.
ASSUMED_GENERATION_SECONDS = 1.0
GENERATION_SECONDS_WEIGHT = 0.2  # of the newest generation in the running mean of generation times
# A request joining a running batch waits up to this many prefills' time (as measured while serving) for others
# to join with it: on the H100 an eager prefill of one prompt took 35-47 ms against a 3-5 ms step, and one of
# eight cost about the same. Prompts of up to 2048 tokens now replay captured prefills (4.6-6.1 ms on the H100
# for prompts of up to 512), which shortens the wait; the server under load has not run with them yet.
JOIN_WAIT_PREFILLS = 3
PREFILL_SECONDS_WEIGHT = 0.2  # of the newest prefill in the running mean of prefill times
# The step kinds captured at start: greedy, sampled, and sampled with top-k/top-p (other kinds, such as
# typical acceptance or log-probabilities, are captured when a batch first needs them).
WARM_KINDS = (StepKind(), StepKind(sample=True), StepKind(sample=True, filtered=True))
# The most graphs captured at start: the prefills (widths 32-2048 and the group sizes each takes, three kinds:
# 75), then the steps, shortest attention spans first. On the H100, 162 step graphs (batch 32, 2,048 slots) took
# 21 s and 1 GiB; a longer --cache-length or a larger --max-batch leaves its longest spans to be captured when first
# needed rather than lengthening the start without bound.
MAX_WARM_GRAPHS = 256


class Job:
    """One request's generation. ``sink`` receives its events on the worker thread; it must not block.

    ``prompt_logprobs`` (top k) first scores the prompt's tokens (``PromptScored``); a job without a
    ``config`` generates nothing (it only scores the prompt, then finishes with no tokens).
    """

    def __init__(
        self,
        prompt_ids: list[int],
        config: GenerationConfig | None,
        sink: Sink,
        deadline: float,
        prompt_logprobs: int | None = None,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.config = config
        self.sink = sink
        self.prompt_logprobs = prompt_logprobs
        self.submitted = time.monotonic()
        self.started: float | None = None  # when the worker took it up
        self.deadline = deadline
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        try:
            self.sink(event)
        except Exception:  # a broken sink must not take the worker down
            log.exception("event sink failed")


class Engine:
    def __init__(self, model: MedusaModel, config: EngineConfig | None = None, metrics: Metrics | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        self.metrics = metrics or Metrics()
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._batch: list[Job] = []  # the jobs of the running batch
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Set under the lock as the worker dies, before it drops the line: its thread still runs for a moment,
        # and a request queued then would wait for nobody.
        self._died = False
        self._decoder: DecodingEngine | None = None
        self._generation_seconds: float | None = None  # a running mean, from the worker's start to the end
        self._prefill_seconds: float | None = None  # a running mean of the worker's prefills (engine.add)
        self._room_since: float | None = None  # since when requests have waited with a free row to join

    # ----- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._stopping = self._died = False
            self._thread = threading.Thread(target=self._work, name="medusa-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, drop the waiting requests, stop the running ones after the current step."""
        with self._lock:
            self._stopping = True
            dropped = list(self._waiting)
            self._waiting.clear()
            for job in self._batch:
                job._cancelled.set()
            self._lock.notify_all()
            thread, self._thread = self._thread, None
        for job in dropped:
            job.emit(Failed("shutdown", "the server is shutting down"))
        if thread is not None:
            thread.join(timeout)

    def warm_up(self) -> DecodingEngine:
        """Before taking requests: build the running batch's engine, run one short generation (it makes the
        cache's buffers), then capture the prefill graphs and those of every batch bucket and attention span for
        ``WARM_KINDS`` (on a GPU), up to ``MAX_WARM_GRAPHS``."""
        engine = self.decoding_engine()
        generation = self.model.prepare("Hello", GenerationConfig(max_new_tokens=8))
        for _ in engine.run([generation]):
            pass
        # An adaptive engine has two graphs per step shape (its tree's and a plain step's): room for both, or the
        # longer spans' are captured while requests wait. On the H100 an adaptive server within the one budget ran a
        # 32-client load at 0.61x the fixed-tree server, its admissions 3 s longer (docs/benchmarks/h100-sampled-steps);
        # with twice the budget, at 1.00x, its admissions as long as the fixed-tree server's (h100-fused-noise).
        engine.capture(WARM_KINDS, MAX_WARM_GRAPHS * (2 if engine.switch is not None else 1))
        return engine

    def decoding_engine(self) -> DecodingEngine:
        """The engine the worker decodes with, built on first use with room for the whole batch."""
        if self._decoder is None:
            self._decoder = self.model.engine(
                self.config.options, max_rows=self.config.max_batch, max_length=self.config.cache_length, keep=False
            )
        return self._decoder

    # ----- requests -----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping and not self._died

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._batch)

    @property
    def capacity(self) -> int:
        """The most jobs the line holds at once: the running batch and those waiting beyond it."""
        return self.config.max_batch + self.config.max_waiting

    def submit(
        self, prompt_ids: list[int], config: GenerationConfig | None, sink: Sink, prompt_logprobs: int | None = None
    ) -> Job:
        """Queue a generation; raise ``QueueFull`` when the line is full, ``EngineStopped`` when stopping."""
        return self.submit_all(prompt_ids, [config], [sink], prompt_logprobs)[0]

    def submit_all(
        self,
        prompt_ids: list[int],
        configs: list[GenerationConfig | None],
        sinks: list[Sink],
        prompt_logprobs: int | None = None,
    ) -> list[Job]:
        """Queue one job per config (a request's choices), all or none; the first scores the prompt when
        ``prompt_logprobs`` is given. Raise ``QueueFull`` when the line has no room for them all."""
        deadline = time.monotonic() + self.config.request_timeout
        jobs = [
            Job(prompt_ids, config, sink, deadline, prompt_logprobs if index == 0 else None)
            for index, (config, sink) in enumerate(zip(configs, sinks, strict=True))
        ]
        with self._lock:
            if self._stopping or self._thread is None:
                raise EngineStopped("the engine is not running")
            if self._died or not self._thread.is_alive():
                raise EngineStopped(WORKER_DIED)
            # max_waiting wait beyond the running batch; the batch also takes in as many as it has free places.
            if len(self._waiting) + len(jobs) > self.capacity - self.running:
                wanted = f"; this request needs {len(jobs)} places" if len(jobs) > 1 else ""
                raise QueueFull(
                    f"{self.running} generations running and {len(self._waiting)} waiting, "
                    f"the most this server queues ({self.config.max_waiting} waiting){wanted}",
                    retry_after=self.retry_after(),
                )
            self._waiting.extend(jobs)
            self._lock.notify()
        return jobs

    def retry_after(self) -> int:
        """Whole seconds until the line ahead of a new request has likely cleared: the generations
        running and waiting, at the mean time of recent generations, ``max_batch`` at a time."""
        seconds = self._generation_seconds or ASSUMED_GENERATION_SECONDS
        ahead = self.running + len(self._waiting)
        estimate = math.ceil(seconds * ahead / self.config.max_batch)
        return max(1, min(estimate, math.ceil(self.config.request_timeout)))

    def _observe_generation(self, job: Job) -> None:
        """The worker finished a generation it ran (not one refused before starting)."""
        if job.started is None:
            return
        seconds = time.monotonic() - job.started
        mean = self._generation_seconds
        self._generation_seconds = seconds if mean is None else mean + GENERATION_SECONDS_WEIGHT * (seconds - mean)

    def cancel(self, job: Job) -> None:
        """Stop a job: a waiting one leaves the line now, a running one after the current step."""
        job._cancelled.set()
        with self._lock:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass

    # ----- the worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            self._work_batched()
        except BaseException:
            # A bug, not a request's failure (those are caught per step): without a worker no request can be
            # served, so the waiting ones fail now and submit() refuses new ones (503).
            with self._lock:
                self._died = True
            log.exception("the engine's worker thread died; requests now get 503")
            with self._lock:
                dropped = list(self._waiting) + list(self._batch)
                self._waiting.clear()
            for job in dropped:
                job.emit(Failed("shutdown", WORKER_DIED))

    def _work_batched(self) -> None:
        active: list[_Member] = []
        while True:
            joining: list[Job] = []
            with self._lock:
                while not self._waiting and not active and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    for member in active:
                        member.job.emit(Failed("shutdown", "the server is shutting down"))
                        self._record_end(member, "cancelled")
                    self._batch = []
                    return
                if self._may_join(len(active)):
                    while self._waiting and len(active) + len(joining) < self.config.max_batch:
                        joining.append(self._waiting.popleft())
                    self._room_since = None
                self._batch = [m.job for m in active] + joining
            try:
                engine = self.decoding_engine()
                if joining:
                    started = time.perf_counter()
                    joined = self._admit(engine, joining)
                    self.metrics.record_worker("admit", time.perf_counter() - started)
                    if joined:  # the prefill alone (a group of up to PREFILL_GROUP prompts), not scoring or capture
                        self._observe_prefill(max(m.generation.stats.prefill_seconds for m in joined))
                    active += joined
                if active:
                    active = self._step(engine, active)
            except Exception as error:  # the batch is lost; its jobs are told, the engine goes on
                log.exception("batched generation failed")
                self._fail(active, error)
                if self._decoder is not None:
                    self._decoder.finish([m.generation for m in active])
                active = []
            with self._lock:
                self._batch = [m.job for m in active]
            self.metrics.record_batch(len(active))

    def _may_join(self, running: int) -> bool:
        """Whether the waiting requests join the batch at this step boundary (the lock is held): at once when
        no batch is running or a full prefill group can join; else once the first of them has waited
        ``join_wait`` with a free row to join (a server with more requests than rows waits as one with fewer)."""
        free = self.config.max_batch - running
        if not self._waiting or not free:
            self._room_since = None  # the wait for a shared prefill starts when a row is free
            return False
        if not running or min(len(self._waiting), free) >= PREFILL_GROUP:
            return True
        now = time.monotonic()
        if self._room_since is None:
            self._room_since = now
        wait = self.config.join_wait
        if wait is None:
            wait = JOIN_WAIT_PREFILLS * (self._prefill_seconds or 0.0)
        return now - max(self._waiting[0].submitted, self._room_since) >= wait

    def _observe_prefill(self, seconds: float) -> None:
        mean = self._prefill_seconds
        self._prefill_seconds = seconds if mean is None else mean + PREFILL_SECONDS_WEIGHT * (seconds - mean)

    def _admit(self, engine: DecodingEngine, jobs: list[Job]) -> list[_Member]:
        """Prefill the jobs that are still wanted, together, into the running batch."""
        members = []
        for job in jobs:
            if job.cancelled:  # by its client, or by stop() after the worker took it from the line
                job.emit(self._cancelled_event())
                self.metrics.record_generation(len(job.prompt_ids), "cancelled", time.monotonic() - job.submitted)
                continue
            if time.monotonic() > job.deadline:
                job.emit(Failed("timeout", self.timeout_message()))
                self.metrics.record_generation(len(job.prompt_ids), "timeout", time.monotonic() - job.submitted)
                continue
            try:
                if job.prompt_logprobs is not None:
                    scores = self.model.prompt_logprobs(torch.tensor(job.prompt_ids), job.prompt_logprobs)
                    job.emit(PromptScored(*scores))
                if job.config is None:  # scoring alone: done
                    job.emit(Finished("length", 0, DecodingStats()))
                    self.metrics.record_generation(len(job.prompt_ids), "length", time.monotonic() - job.submitted)
                    continue
                generation = self.model.prepare(job.prompt_ids, job.config)
                if not engine.fits(generation.prompt_ids.numel() + job.config.max_new_tokens):
                    raise MedusaError(
                        f"the prompt ({generation.prompt_ids.numel()} tokens) plus max_tokens "
                        f"({job.config.max_new_tokens}) exceeds this server's {self.config.cache_length} slots per "
                        "request (--cache-length)"
                    )
            except MedusaError as error:
                job.emit(Failed("invalid", str(error)))
                self.metrics.record_generation(len(job.prompt_ids), "invalid", time.monotonic() - job.submitted)
                continue
            except Exception as error:  # a bug in preparing this request: it fails, the others go on
                log.exception("preparing a request failed")
                job.emit(Failed("error", f"generation failed: {type(error).__name__}: {error}"))
                self.metrics.record_generation(len(job.prompt_ids), "error", time.monotonic() - job.submitted)
                continue
            job.started = time.monotonic()
            members.append(_Member(job, generation))
        self.metrics.record_admission([m.job.started - m.job.submitted for m in members])
        if members:
            try:
                engine.add([m.generation for m in members])
            except Exception as error:
                log.exception("prefill failed")
                engine.finish([m.generation for m in members])
                self._fail(members, error)
                return []
        return members

    def _fail(self, members: list[_Member], error: Exception) -> None:
        for member in members:
            member.job.emit(Failed("error", f"generation failed: {type(error).__name__}: {error}"))
            self._record_end(member, "error")

    def _step(self, engine: DecodingEngine, active: list[_Member]) -> list[_Member]:
        """One batched step: each member's chunk goes out; members that are done leave. Returns the rest.

        Members leave the running batch (and its count) before their last event goes out, so a client told its
        generation ended never finds it still counted against the line.
        """
        by_generation = {id(m.generation): m for m in active}
        leaving: list[tuple[_Member, str]] = []
        events: list[tuple[Job, Event]] = []
        started = time.perf_counter()
        plain_before = engine.times.plain_steps
        outputs = engine.step()
        stepped = time.perf_counter()
        self.metrics.record_worker("step", stepped - started)
        if engine.times.plain_steps > plain_before:
            self.metrics.record_plain_step()
        for generation, output in outputs:
            member = by_generation[id(generation)]
            job = member.job
            chunk = GenerationChunk(
                text=output.text,
                token_ids=output.tokens,
                accepted=output.accepted,
                logprobs=output.logprobs,
                top_logprobs=output.top_logprobs,
            )
            self.metrics.record_step(output.accepted, len(chunk.token_ids))
            if chunk.token_ids and member.completion_tokens == 0:
                self.metrics.record_first_token(time.monotonic() - job.submitted)
            member.completion_tokens += len(chunk.token_ids)
            events.append((job, chunk))
            if job.cancelled:
                events.append((job, self._cancelled_event()))
                leaving.append((member, "cancelled"))
            elif generation.finished:
                tail = generation.finish_text()
                if tail:
                    events.append((job, GenerationChunk(text=tail, token_ids=[], accepted=0)))
                events.append(
                    (job, Finished(generation.stats.finish_reason, member.completion_tokens, generation.stats))
                )
                leaving.append((member, generation.stats.finish_reason))
            elif time.monotonic() > job.deadline:
                events.append((job, Failed("timeout", self.timeout_message())))
                leaving.append((member, "timeout"))
        engine.finish([m.generation for m, _ in leaving])
        gone = {id(m) for m, _ in leaving}
        remaining = [m for m in active if id(m) not in gone]
        with self._lock:
            self._batch = [m.job for m in remaining]
        for member, outcome in leaving:
            self._record_end(member, outcome)
        for job, event in events:
            job.emit(event)
        self.metrics.record_worker("events", time.perf_counter() - stepped)
        return remaining

    def _record_end(self, member: _Member, outcome: str) -> None:
        self._observe_generation(member.job)
        self.metrics.record_generation(len(member.job.prompt_ids), outcome, time.monotonic() - member.job.submitted)

    def _cancelled_event(self) -> Failed:
        """What a cancelled job is told: the server shut down, or its request was cancelled."""
        if self._stopping:
            return Failed("shutdown", "the server is shutting down")
        return Failed("cancelled", "the request was cancelled")

    def timeout_message(self) -> str:
        return f"the request took longer than this server's limit of {self.config.request_timeout:g} seconds"


@dataclass(eq=False)
class _Member:
    """A job in the running batch, and its generation in the ``DecodingEngine``."""

    job: Job
    generation: Generation
    completion_tokens: int = 0
