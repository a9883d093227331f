"""Server metrics in the Prometheus text format (version 0.0.4), written by hand: a few counters and histograms.

One ``Metrics`` object per app (no module-level registry), shared by the HTTP layer and the engine's
worker thread, hence the lock.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ACCEPTED_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 16)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# admit: preparing and prefilling joining requests; step: the decoding step and its host bookkeeping (detokenising,
# stop strings); events: handing each request's chunk to its connection.
WORKER_PHASES = ("admit", "step", "events")


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
                break
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        lines, cumulative = [], 0
        for bound, count in zip(self.bounds, self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {_number(self.sum)}")
        lines.append(f"{name}_count {self.count}")
        return lines


class Metrics:
    """What the server counts: requests by endpoint and status, tokens, acceptance, and timings."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.finished: Counter[str] = Counter()  # generations by finish reason (stop, length, cancelled, ...)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.plain_steps = 0  # batched steps the engine's adaptive switch ran plain
        self.accepted_tokens = 0
        self.accepted_per_step = Histogram(ACCEPTED_BUCKETS)
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)  # running rows, observed once per batched step
        self.prefill_batch_size = Histogram(BATCH_BUCKETS)  # requests joining together, once per admission
        self.queue_time = Histogram(TTFT_BUCKETS)  # from a request's arrival to the start of its prefill
        # The worker thread's busy seconds by phase (WORKER_PHASES): where a step's wall time goes under load.
        self.worker_seconds: Counter[str] = Counter()

    def record_batch(self, rows: int) -> None:
        """The running batch after a step (0 when it emptied)."""
        if rows:
            with self._lock:
                self.batch_size.observe(rows)

    def record_admission(self, queue_seconds: Sequence[float]) -> None:
        """Requests that joined the running batch together, each with the seconds it waited in line."""
        if queue_seconds:
            with self._lock:
                self.prefill_batch_size.observe(len(queue_seconds))
                for seconds in queue_seconds:
                    self.queue_time.observe(seconds)

    def record_worker(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.worker_seconds[phase] += seconds

    def record_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, str(status))] += 1

    def record_plain_step(self) -> None:
        """A batched step the adaptive switch ran plain: the tree had not been paying at that batch size."""
        with self._lock:
            self.plain_steps += 1

    def record_step(self, accepted: int, new_tokens: int) -> None:
        """One decoding step: ``accepted`` tokens committed by the tree (1 + accepted guesses)."""
        with self._lock:
            self.steps += 1
            self.accepted_tokens += accepted
            self.generated_tokens += new_tokens
            self.accepted_per_step.observe(accepted)

    def record_first_token(self, seconds: float) -> None:
        with self._lock:
            self.time_to_first_token.observe(seconds)

    def record_generation(self, prompt_tokens: int, finish_reason: str, seconds: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.finished[finish_reason] += 1
            self.latency.observe(seconds)

    def render(self, waiting: int, running: int) -> str:
        with self._lock:
            out: list[str] = []
            _family(out, "medusa_requests_total", "counter", "HTTP requests by endpoint and status code.")
            for (endpoint, status), count in sorted(self.requests.items()):
                out.append(f'medusa_requests_total{{endpoint="{_escape(endpoint)}",status="{status}"}} {count}')
            _family(out, "medusa_generations_total", "counter", "Generations by finish reason.")
            for reason, count in sorted(self.finished.items()):
                out.append(f'medusa_generations_total{{finish_reason="{_escape(reason)}"}} {count}')
            for name, value, text in (
                ("medusa_prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished generations."),
                ("medusa_generated_tokens_total", self.generated_tokens, "Tokens generated."),
                (
                    "medusa_decoding_steps_total",
                    self.steps,
                    "Decoding steps (base model forward passes after prefill).",
                ),
                (
                    "medusa_plain_steps_total",
                    self.plain_steps,
                    "Batched steps that verified each row's next token alone, not the tree: the engine's adaptive "
                    "switch found the tree committing fewer tokens per second at that batch size and step kind.",
                ),
                (
                    "medusa_accepted_tokens_total",
                    self.accepted_tokens,
                    "Tokens committed by decoding steps; "
                    "divided by medusa_decoding_steps_total it is the mean accepted tokens per step.",
                ),
            ):
                _family(out, name, "counter", text)
                out.append(f"{name} {value}")
            for name, histogram, text in (
                ("medusa_accepted_tokens_per_step", self.accepted_per_step, "Tokens committed per decoding step."),
                (
                    "medusa_time_to_first_token_seconds",
                    self.time_to_first_token,
                    "From request arrival to its first generated token.",
                ),
                ("medusa_request_latency_seconds", self.latency, "From request arrival to the end of its generation."),
                ("medusa_batch_size", self.batch_size, "Generations in the running batch, once per decoding step."),
                (
                    "medusa_prefill_batch_size",
                    self.prefill_batch_size,
                    "Requests that joined the running batch together (prefilled in groups of up to 8), once per "
                    "admission.",
                ),
                (
                    "medusa_request_queue_seconds",
                    self.queue_time,
                    "From request arrival to the start of its prefill (waiting for a row, or for others to join).",
                ),
            ):
                _family(out, name, "histogram", text)
                out.extend(histogram.lines(name))
            _family(
                out,
                "medusa_worker_seconds_total",
                "counter",
                "Seconds the engine's worker thread spent per phase: admit (prepare and prefill joining requests), "
                "step (decode and its host bookkeeping), events (hand chunks to the connections).",
            )
            for phase in WORKER_PHASES:
                out.append(f'medusa_worker_seconds_total{{phase="{phase}"}} {_number(self.worker_seconds[phase])}')
            _family(out, "medusa_queue_waiting", "gauge", "Requests waiting for the model.")
            out.append(f"medusa_queue_waiting {waiting}")
            _family(out, "medusa_generation_running", "gauge", "Generations in the running batch now.")
            out.append(f"medusa_generation_running {running}")
            return "\n".join(out) + "\n"


def _family(out: list[str], name: str, kind: str, text: str) -> None:
    out.append(f"# HELP {name} {text}")
    out.append(f"# TYPE {name} {kind}")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(float(value))
