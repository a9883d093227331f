"""The engine alone: one generation at a time, a bounded line, cancellation, deadlines, shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from helpers.serve import make_slow_model
from medusa.engine import EngineOptions
from medusa.model import GenerationChunk, GenerationConfig
from medusa.serve.engine import Engine, EngineConfig, EngineStopped, Failed, Finished, QueueFull


class Collector:
    def __init__(self) -> None:
        self.events: list = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if not isinstance(event, GenerationChunk):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, GenerationChunk))


@pytest.fixture(scope="module")
def slow_model(one_thread):
    return make_slow_model(0.03)


def ids(model, text: str) -> list[int]:
    return model.encode_prompt(text).tolist()


def test_a_generation_matches_the_library(serve_model):
    engine = Engine(serve_model)
    engine.start()
    try:
        sink = Collector()
        engine.submit(ids(serve_model, "hello"), GenerationConfig(max_new_tokens=20), sink)
        assert sink.done.wait(30)
        finished = sink.events[-1]
        assert isinstance(finished, Finished) and finished.completion_tokens == 20
        assert sink.text == serve_model.generate("hello", max_new_tokens=20).text
        assert finished.stats.steps == engine.metrics.steps
    finally:
        engine.stop()


def test_the_line_is_bounded_and_a_cancelled_waiter_leaves_it(slow_model):
    engine = Engine(slow_model, EngineConfig(max_waiting=1))
    engine.start()
    try:
        long = Collector()
        running = engine.submit(ids(slow_model, "a"), GenerationConfig(max_new_tokens=100), long)
        deadline = time.monotonic() + 10
        while engine.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        waiter = Collector()
        waiting = engine.submit(ids(slow_model, "b"), GenerationConfig(max_new_tokens=2), waiter)
        with pytest.raises(QueueFull, match="1 waiting"):
            engine.submit(ids(slow_model, "c"), GenerationConfig(max_new_tokens=2), Collector())
        engine.cancel(waiting)
        assert engine.waiting == 0
        third = Collector()
        engine.submit(ids(slow_model, "c"), GenerationConfig(max_new_tokens=2), third)  # room again
        started = time.monotonic()
        engine.cancel(running)
        assert third.done.wait(10)
        assert time.monotonic() - started < 3  # the running one stopped after a step, not 100 tokens later
        assert isinstance(third.events[-1], Finished)
        assert waiter.events == []  # never ran
        assert not any(isinstance(e, Finished) for e in long.events)
        assert engine.metrics.finished["cancelled"] == 1
    finally:
        engine.stop()


def test_a_request_past_its_deadline_fails_with_a_timeout(slow_model):
    engine = Engine(slow_model, EngineConfig(request_timeout=0.5))
    engine.start()
    try:
        sink = Collector()
        started = time.monotonic()
        engine.submit(ids(slow_model, "a"), GenerationConfig(max_new_tokens=150), sink)
        assert sink.done.wait(10)
        assert time.monotonic() - started < 3
        failure = sink.events[-1]
        assert isinstance(failure, Failed) and failure.reason == "timeout" and "0.5 seconds" in failure.message
    finally:
        engine.stop()


def test_a_model_error_is_reported_not_raised(serve_model):
    engine = Engine(serve_model)
    engine.start()
    try:
        sink = Collector()
        engine.submit([5] * 300, GenerationConfig(max_new_tokens=2), sink)  # over the 256-token context
        assert sink.done.wait(10)
        assert sink.events[-1].reason == "invalid" and "context" in sink.events[-1].message
        ok = Collector()
        engine.submit([5, 6], GenerationConfig(max_new_tokens=2), ok)
        assert ok.done.wait(10) and isinstance(ok.events[-1], Finished)
    finally:
        engine.stop()


def test_stop_drops_the_waiting_and_refuses_new_work(slow_model):
    engine = Engine(slow_model, EngineConfig(max_waiting=4))
    engine.start()
    first, second = Collector(), Collector()
    engine.submit(ids(slow_model, "a"), GenerationConfig(max_new_tokens=100), first)
    engine.submit(ids(slow_model, "b"), GenerationConfig(max_new_tokens=100), second)
    started = time.monotonic()
    engine.stop()
    assert time.monotonic() - started < 5
    assert second.events and second.events[-1].reason == "shutdown"
    assert first.events and first.events[-1].reason == "shutdown"  # the running one is told too
    with pytest.raises(EngineStopped):
        engine.submit(ids(slow_model, "c"), GenerationConfig(max_new_tokens=2), Collector())


def test_a_request_taken_up_just_as_the_server_stops_is_told_so(serve_model):
    """The worker has taken the request from the line but not prefilled it when stop() comes: it must still hear
    that the server shut down (it used to be skipped without a word, and its client waited)."""
    engine = Engine(serve_model, EngineConfig(max_waiting=4))
    taken, release = threading.Event(), threading.Event()
    build = engine.decoding_engine

    def decoding_engine_after_stop():  # the worker's first call after taking the request up
        taken.set()
        release.wait(10)
        return build()

    engine.decoding_engine = decoding_engine_after_stop
    engine.start()
    sink = Collector()
    engine.submit(ids(serve_model, "a"), GenerationConfig(max_new_tokens=2), sink)
    assert taken.wait(10)
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    deadline = time.monotonic() + 10
    while not engine._stopping and time.monotonic() < deadline:
        time.sleep(0.001)
    release.set()
    stopper.join(10)
    assert sink.done.wait(10)
    assert isinstance(sink.events[-1], Failed) and sink.events[-1].reason == "shutdown"


def test_a_dead_worker_fails_the_waiting_and_refuses_new_work(serve_model):
    engine = Engine(serve_model, EngineConfig(max_waiting=4))
    second_queued = threading.Event()

    def crash(rows):  # a bug outside any one step's error handling
        second_queued.wait(10)
        raise RuntimeError("a bug in the worker")

    engine.metrics.record_batch = crash
    engine.start()
    try:
        engine.submit(ids(serve_model, "a"), GenerationConfig(max_new_tokens=2), Collector())
        waiting = Collector()
        engine.submit(ids(serve_model, "b"), GenerationConfig(max_new_tokens=2), waiting)
        second_queued.set()
        assert waiting.done.wait(10)  # failed at once, not at its deadline
        assert isinstance(waiting.events[-1], Failed) and waiting.events[-1].reason == "shutdown"
        assert not engine.alive
        with pytest.raises(EngineStopped, match="worker thread died"):
            engine.submit(ids(serve_model, "c"), GenerationConfig(max_new_tokens=2), Collector())
    finally:
        engine.stop()


def test_retry_after_estimates_the_wait_from_the_line(slow_model):
    engine = Engine(
        slow_model, EngineConfig(max_waiting=3, request_timeout=120, options=EngineOptions(use_heads=False))
    )
    engine.start()
    try:
        plain = GenerationConfig(max_new_tokens=10)  # 11 forward passes of 30 ms or more
        seed = Collector()
        engine.submit(ids(slow_model, "a"), plain, seed)
        assert seed.done.wait(30) and isinstance(seed.events[-1], Finished)
        engine.submit(ids(slow_model, "b"), GenerationConfig(max_new_tokens=100), Collector())
        for prompt in "cde":
            engine.submit(ids(slow_model, prompt), plain, Collector())
        with pytest.raises(QueueFull) as refused:
            engine.submit(ids(slow_model, "f"), plain, Collector())
        # four generations ahead, each taking at least the 0.33 s the first one took
        assert refused.value.retry_after >= 2
        assert refused.value.retry_after == engine.retry_after()
    finally:
        engine.stop()
