"""One generation at a time in front of a ``MedusaModel``: a bounded wait line, deadlines and cancellation.

The model is synchronous and holds one sequence's cache, so a single worker thread runs generations
one after another. Requests beyond the line's capacity are refused at once (the server answers 429)
rather than left to pile up. ``MedusaModel.stream`` is a generator, so a cancelled or expired request
is stopped between two decoding steps simply by no longer iterating it: the model is free again after
at most one step. Events go back through a callback, so the engine knows nothing of asyncio or HTTP.

With ``max_batch`` above 1 the worker batches greedy requests dynamically (``medusa.batching``): at
every step boundary the requests at the head of the line join the running batch, up to ``max_batch``;
each leaves at its own EOS, stop string, limit, cancellation or deadline while the others go on.
Sampled requests are not batched: one runs alone once the batch has drained.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from medusa.batching import BatchRunner, BatchSequence
from medusa.decoding import DecodingStats
from medusa.errors import MedusaError
from medusa.model import GenerationChunk, GenerationConfig, MedusaModel, TextTracker
from medusa.serve.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The wait line is full: come back in ``retry_after`` seconds (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineStopped(Exception):
    """The engine is shutting down and takes no more work (HTTP 503)."""


@dataclass
class EngineConfig:
    max_waiting: int = 16  # requests that may wait while one generates; more are refused
    request_timeout: float = 300.0  # seconds from arrival to the end of the generation, queueing included
    max_batch: int = 1  # greedy requests decoded together; 1 runs one generation at a time

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise MedusaError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        if self.max_waiting < 0:
            raise MedusaError(f"max_waiting must be 0 or more, got {self.max_waiting}")
        if self.request_timeout <= 0:
            raise MedusaError(f"request_timeout must be positive, got {self.request_timeout}")


@dataclass
class Finished:
    finish_reason: str  # "stop" or "length"
    completion_tokens: int
    stats: DecodingStats


@dataclass
class Failed:
    reason: str  # "timeout", "invalid" (a MedusaError), "error", "cancelled", "shutdown"
    message: str


Event = GenerationChunk | Finished | Failed
Sink = Callable[[Event], None]
WORKER_DIED = "the server's engine has stopped (its worker thread died); see the server's log"
# Retry-After before any generation has finished: an assumed generation time, in seconds.
ASSUMED_GENERATION_SECONDS = 1.0
GENERATION_SECONDS_WEIGHT = 0.2  # of the newest generation in the running mean of generation times


class Job:
    """One request's generation. ``sink`` receives its events on the worker thread; it must not block."""

    def __init__(self, prompt_ids: list[int], config: GenerationConfig, sink: Sink, deadline: float) -> None:
        self.prompt_ids = prompt_ids
        self.config = config
        self.sink = sink
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
        self._running: Job | None = None
        self._batch: list[Job] = []  # the jobs of the running batch (max_batch > 1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._generation_seconds: float | None = None  # a running mean, from the worker's start to the end

    # ----- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="medusa-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, drop the waiting requests, stop the running one after its current step."""
        with self._lock:
            self._stopping = True
            dropped = list(self._waiting)
            self._waiting.clear()
            if self._running is not None:
                self._running._cancelled.set()
            for job in self._batch:
                job._cancelled.set()
            self._lock.notify_all()
            thread, self._thread = self._thread, None
        for job in dropped:
            job.emit(Failed("shutdown", "the server is shutting down"))
        if thread is not None:
            thread.join(timeout)

    # ----- requests -----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return int(self._running is not None) + len(self._batch)

    def submit(self, prompt_ids: list[int], config: GenerationConfig, sink: Sink) -> Job:
        """Queue a generation; raise ``QueueFull`` when the line is full, ``EngineStopped`` when stopping."""
        job = Job(prompt_ids, config, sink, time.monotonic() + self.config.request_timeout)
        with self._lock:
            if self._stopping or self._thread is None:
                raise EngineStopped("the engine is not running")
            if not self._thread.is_alive():
                raise EngineStopped(WORKER_DIED)
            # With one generation at a time: max_waiting wait behind the running one. A batch also
            # takes in as many as it has free places at its next step.
            if len(self._waiting) >= self.config.max_waiting + self.config.max_batch - self.running:
                raise QueueFull(
                    f"{self.running} generation running and {len(self._waiting)} waiting, "
                    f"the most this server queues ({self.config.max_waiting} waiting)",
                    retry_after=self.retry_after(),
                )
            self._waiting.append(job)
            self._lock.notify()
        return job

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
            if self.config.max_batch > 1:
                self._work_batched()
            else:
                self._work_one_at_a_time()
        except BaseException:
            # A bug, not a request's failure (those are caught per generation): without a worker no
            # request can be served, so the waiting ones fail now and submit() refuses new ones (503).
            log.exception("the engine's worker thread died; requests now get 503")
            with self._lock:
                dropped = list(self._waiting) + [job for job in (self._running, *self._batch) if job is not None]
                self._waiting.clear()
            for job in dropped:
                job.emit(Failed("shutdown", WORKER_DIED))

    def _work_one_at_a_time(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                job = self._waiting.popleft()
                self._running = job
            try:
                if job.cancelled:
                    continue
                if time.monotonic() > job.deadline:
                    job.emit(Failed("timeout", self.timeout_message()))
                    self.metrics.record_generation(len(job.prompt_ids), "timeout", time.monotonic() - job.submitted)
                    continue
                job.started = time.monotonic()
                self._generate(job)
            finally:
                with self._lock:
                    self._running = None

    def _generate(self, job: Job) -> None:
        stats = DecodingStats()
        completion_tokens = 0
        outcome: str | None = None
        try:
            stream = self.model.stream(job.prompt_ids, job.config, stats=stats)
            try:
                for chunk in stream:
                    if chunk.accepted:
                        self.metrics.record_step(chunk.accepted, len(chunk.token_ids))
                    if chunk.token_ids and completion_tokens == 0:
                        self.metrics.record_first_token(time.monotonic() - job.submitted)
                    completion_tokens += len(chunk.token_ids)
                    job.emit(chunk)
                    if job.cancelled:
                        outcome = "cancelled"
                        if self._stopping:
                            job.emit(Failed("shutdown", "the server is shutting down"))
                        else:
                            job.emit(Failed("cancelled", "the request was cancelled"))
                        break
                    if time.monotonic() > job.deadline:
                        outcome = "timeout"
                        job.emit(Failed("timeout", self.timeout_message()))
                        break
            finally:
                stream.close()  # runs the generator's cleanup now, on this thread
        except MedusaError as error:
            outcome = "invalid"
            job.emit(Failed("invalid", str(error)))
        except Exception as error:
            log.exception("generation failed")
            outcome = "error"
            job.emit(Failed("error", f"generation failed: {type(error).__name__}: {error}"))
        if outcome is None:
            outcome = stats.finish_reason
            job.emit(Finished(stats.finish_reason, completion_tokens, stats))
        self._observe_generation(job)
        self.metrics.record_generation(len(job.prompt_ids), outcome, time.monotonic() - job.submitted)

    # ----- the batched worker -------------------------------------------------------------------

    def _work_batched(self) -> None:
        runner: BatchRunner | None = None
        use_heads: bool | None = None
        active: list[_Member] = []
        while True:
            alone: Job | None = None
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
                if not active and self._waiting and not self._waiting[0].config.sampling().greedy:
                    alone = self._waiting.popleft()
                    self._running = alone
                else:
                    if not active:
                        use_heads = self._waiting[0].config.use_heads if self._waiting else None
                    while (self._waiting and len(active) + len(joining) < self.config.max_batch
                           and self._waiting[0].config.sampling().greedy
                           and self._waiting[0].config.use_heads == use_heads):
                        joining.append(self._waiting.popleft())
                    self._batch = [m.job for m in active] + joining
            if alone is not None:
                try:
                    if not alone.cancelled:
                        if time.monotonic() > alone.deadline:
                            alone.emit(Failed("timeout", self.timeout_message()))
                            self.metrics.record_generation(len(alone.prompt_ids), "timeout",
                                                           time.monotonic() - alone.submitted)
                        else:
                            alone.started = time.monotonic()
                            self._generate(alone)
                finally:
                    with self._lock:
                        self._running = None
                continue
            try:
                if not active:
                    runner = BatchRunner(self.model.batch_decoder(GenerationConfig(use_heads=bool(use_heads))))
                active += self._admit(runner, joining)
                if active:
                    active = self._step(runner, active)
            except Exception as error:  # the batch is lost; its jobs are told, the engine goes on
                log.exception("batched generation failed")
                self._fail(active, error)
                active = []
            with self._lock:
                self._batch = [m.job for m in active]

    def _admit(self, runner: BatchRunner, jobs: list[Job]) -> list["_Member"]:
        """Prefill the jobs that are still wanted, together, into the running batch."""
        members = []
        for job in jobs:
            if job.cancelled:
                continue
            if time.monotonic() > job.deadline:
                job.emit(Failed("timeout", self.timeout_message()))
                self.metrics.record_generation(len(job.prompt_ids), "timeout", time.monotonic() - job.submitted)
                continue
            try:
                ids = self.model.encode_prompt(job.prompt_ids)
                self.model._check_lengths(ids.numel(), job.config.max_new_tokens)
            except MedusaError as error:
                job.emit(Failed("invalid", str(error)))
                self.metrics.record_generation(len(job.prompt_ids), "invalid", time.monotonic() - job.submitted)
                continue
            job.started = time.monotonic()
            sequence = BatchSequence(ids, job.config.max_new_tokens, frozenset(self.model.eos_token_ids()))
            members.append(_Member(job, sequence, TextTracker(self.model.tokenizer, job.config.stop)))
        if members:
            try:
                runner.add([m.sequence for m in members])  # leaves the running rows as they were if it fails
            except Exception as error:
                log.exception("prefill failed")
                self._fail(members, error)
                return []
        return members

    def _fail(self, members: list["_Member"], error: Exception) -> None:
        for member in members:
            member.job.emit(Failed("error", f"generation failed: {type(error).__name__}: {error}"))
            self._record_end(member, "error")

    def _step(self, runner: BatchRunner, active: list["_Member"]) -> list["_Member"]:
        """One batched step: each member's chunk goes out; members that are done leave. Returns the rest."""
        by_sequence = {id(m.sequence): m for m in active}
        leaving: list[tuple[_Member, str]] = []
        for sequence, output in runner.step():
            member = by_sequence[id(sequence)]
            job = member.job
            text, keep, stopped = member.tracker.add(output.tokens)
            chunk = GenerationChunk(text=text, token_ids=output.tokens[:keep], accepted=output.accepted)
            self.metrics.record_step(output.accepted, len(chunk.token_ids))
            if chunk.token_ids and member.completion_tokens == 0:
                self.metrics.record_first_token(time.monotonic() - job.submitted)
            member.completion_tokens += len(chunk.token_ids)
            job.emit(chunk)
            if stopped:
                sequence.stats.finish_reason = "stop"
            if job.cancelled:
                job.emit(Failed("shutdown", "the server is shutting down") if self._stopping
                         else Failed("cancelled", "the request was cancelled"))
                leaving.append((member, "cancelled"))
            elif stopped or sequence.finished:
                tail = member.tracker.flush()
                if tail:
                    job.emit(GenerationChunk(text=tail, token_ids=[], accepted=0))
                job.emit(Finished(sequence.stats.finish_reason, member.completion_tokens, sequence.stats))
                leaving.append((member, sequence.stats.finish_reason))
            elif time.monotonic() > job.deadline:
                job.emit(Failed("timeout", self.timeout_message()))
                leaving.append((member, "timeout"))
        runner.finish([m.sequence for m, _ in leaving])
        for member, outcome in leaving:
            self._record_end(member, outcome)
        gone = {id(m) for m, _ in leaving}
        return [m for m in active if id(m) not in gone]

    def _record_end(self, member: "_Member", outcome: str) -> None:
        self._observe_generation(member.job)
        self.metrics.record_generation(len(member.job.prompt_ids), outcome, time.monotonic() - member.job.submitted)

    def timeout_message(self) -> str:
        return f"the request took longer than this server's limit of {self.config.request_timeout:g} seconds"


@dataclass(eq=False)
class _Member:
    """A job in the running batch: its sequence in the ``BatchRunner``, its text so far."""

    job: Job
    sequence: BatchSequence | None
    tracker: TextTracker | None
    completion_tokens: int = 0
