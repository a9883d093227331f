"""The engine with dynamic batching: greedy requests decoded together, joining and leaving at step
boundaries, each answer exactly the one the request gets alone."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from helpers.serve import make_slow_model, running_server
from medusa.engine import PREFILL_GROUP, EngineOptions
from medusa.errors import MedusaError
from medusa.model import GenerationChunk, GenerationConfig
from medusa.serve.engine import Engine, EngineConfig, Failed, Finished, Job

PROMPTS = ["hello", "Tell me a long story about a dragon.", "2+2?", "What is the capital of France, and why?"]


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

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events if isinstance(e, GenerationChunk) for t in e.token_ids]


def ids(model, text: str) -> list[int]:
    return model.encode_prompt(text).tolist()


def start_long(engine: Engine, model, max_new_tokens: int) -> Collector:
    """Submit a long generation and wait until it is running (its first chunk is out)."""
    long = Collector()
    engine.submit(ids(model, PROMPTS[1]), GenerationConfig(max_new_tokens=max_new_tokens), long)
    deadline = time.monotonic() + 10
    while not long.events and time.monotonic() < deadline:
        time.sleep(0.01)
    return long


class ForwardCounter:
    def __init__(self, model) -> None:
        self.calls = 0
        self.handle = model.base_model.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        self.calls += 1


def test_waiting_greedy_requests_run_as_one_batch(serve_model):
    engine = Engine(serve_model, EngineConfig(max_batch=4))
    limits = [20, 12, 24, 7]
    expected = [serve_model.generate(p, max_new_tokens=n) for p, n in zip(PROMPTS, limits)]
    sinks = [Collector() for _ in PROMPTS]
    counter = ForwardCounter(serve_model)
    engine.start()
    try:
        for prompt, limit, sink in zip(PROMPTS, limits, sinks):
            engine.submit(ids(serve_model, prompt), GenerationConfig(max_new_tokens=limit), sink)
        for sink in sinks:
            assert sink.done.wait(30)
    finally:
        engine.stop()
        counter.handle.remove()
    for sink, result in zip(sinks, expected):
        finished = sink.events[-1]
        assert isinstance(finished, Finished), sink.events[-1]
        assert sink.text == result.text and sink.tokens == result.token_ids
        assert finished.finish_reason == result.finish_reason and finished.completion_tokens == len(result.token_ids)
    steps = [sink.events[-1].stats.steps for sink in sinks]
    # Alone, each would take a prefill and its steps; together the steps are shared.
    assert counter.calls < sum(steps), (counter.calls, steps)
    assert engine.metrics.finished.get("length", 0) + engine.metrics.finished.get("stop", 0) == 4


@pytest.mark.parametrize("overlap", [False, True], ids=["steps", "overlapped-steps"])
def test_a_request_joins_a_running_batch_and_leaves_before_it(one_thread, overlap):
    model = make_slow_model(0.02)
    engine = Engine(model, EngineConfig(max_batch=4, options=EngineOptions(overlap=overlap)))
    engine.start()
    try:
        long, short = start_long(engine, model, 60), Collector()
        engine.submit(ids(model, PROMPTS[0]), GenerationConfig(max_new_tokens=5), short)
        assert short.done.wait(30)
        assert not long.done.is_set()  # the long one is still going
        assert long.done.wait(60)
    finally:
        engine.stop()
    assert short.tokens == model.generate(PROMPTS[0], max_new_tokens=5).token_ids
    assert long.tokens == model.generate(PROMPTS[1], max_new_tokens=60).token_ids


@pytest.mark.parametrize("overlap", [False, True], ids=["steps", "overlapped-steps"])
def test_cancelling_one_member_leaves_the_others_going(one_thread, overlap):
    """A cancelled member leaves after the current step (with overlapped steps, after the one already launched)."""
    model = make_slow_model(0.02)
    engine = Engine(model, EngineConfig(max_batch=3, options=EngineOptions(overlap=overlap)))
    engine.start()
    try:
        sinks = [Collector() for _ in range(3)]
        jobs = [engine.submit(ids(model, p), GenerationConfig(max_new_tokens=30), s) for p, s in zip(PROMPTS, sinks)]
        deadline = time.monotonic() + 10
        while engine.running < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.cancel(jobs[1])
        for sink in sinks:
            assert sink.done.wait(30)
    finally:
        engine.stop()
    assert isinstance(sinks[1].events[-1], Failed) and sinks[1].events[-1].reason == "cancelled"
    for index in (0, 2):
        assert isinstance(sinks[index].events[-1], Finished)
        assert sinks[index].tokens == model.generate(PROMPTS[index], max_new_tokens=30).token_ids
    assert engine.metrics.finished["cancelled"] == 1


def test_sampled_requests_and_stop_strings_with_batching(serve_model):
    engine = Engine(serve_model, EngineConfig(max_batch=4))
    alone = serve_model.generate(PROMPTS[1], max_new_tokens=24)
    stop = alone.text[6:8]
    engine.start()
    try:
        sampled, stopped, plain = Collector(), Collector(), Collector()
        engine.submit(
            ids(serve_model, PROMPTS[0]), GenerationConfig(max_new_tokens=10, temperature=0.8, seed=1), sampled
        )
        engine.submit(ids(serve_model, PROMPTS[1]), GenerationConfig(max_new_tokens=24, stop=(stop,)), stopped)
        engine.submit(ids(serve_model, PROMPTS[2]), GenerationConfig(max_new_tokens=8), plain)
        for sink in (sampled, stopped, plain):
            assert sink.done.wait(30)
    finally:
        engine.stop()
    expected = serve_model.generate(PROMPTS[0], max_new_tokens=10, temperature=0.8, seed=1)
    assert sampled.text == expected.text
    with_stop = serve_model.generate(PROMPTS[1], max_new_tokens=24, stop=stop)
    assert stopped.text == with_stop.text and stopped.events[-1].finish_reason == "stop"
    assert plain.text == serve_model.generate(PROMPTS[2], max_new_tokens=8).text


def test_max_batch_must_be_positive():
    with pytest.raises(MedusaError, match="max_batch must be a positive integer"):
        EngineConfig(max_batch=0)


def test_concurrent_http_requests_are_batched(serve_model):
    with running_server(serve_model, max_batch=4) as server:
        results: dict[int, str] = {}

        def ask(index: int) -> None:
            body = {"model": "tiny", "prompt": PROMPTS[index], "max_tokens": 12, "temperature": 0}
            results[index] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).json()["choices"][0][
                "text"
            ]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    for index in range(4):
        assert results[index] == serve_model.generate(PROMPTS[index], max_new_tokens=12, chat_template=False).text


def test_a_lone_request_waits_up_to_join_wait_to_join_a_running_batch(one_thread):
    """While a batch runs, a request joins only once it has waited ``join_wait`` (others could have joined it,
    sharing one prefill); it still joins before the running one ends."""
    model = make_slow_model(0.02)
    engine = Engine(model, EngineConfig(max_batch=4, join_wait=1.0))
    engine.start()
    try:
        long, short = start_long(engine, model, 200), Collector()
        submitted = time.monotonic()
        engine.submit(ids(model, PROMPTS[0]), GenerationConfig(max_new_tokens=5), short)
        while not short.events and time.monotonic() < submitted + 30:
            time.sleep(0.005)
        assert time.monotonic() - submitted >= 1.0
        assert short.done.wait(30)
        assert not long.done.is_set()
    finally:
        engine.stop()
    assert short.tokens == model.generate(PROMPTS[0], max_new_tokens=5).token_ids


def test_a_full_prefill_group_joins_a_running_batch_at_once(one_thread):
    """As many waiting requests as one prefill takes join at the next step boundary, whatever ``join_wait``."""
    model = make_slow_model(0.02)
    engine = Engine(model, EngineConfig(max_batch=PREFILL_GROUP + 1, join_wait=600.0))
    engine.start()
    try:
        long = start_long(engine, model, 190)
        group = [Collector() for _ in range(PREFILL_GROUP)]
        engine.submit_all(ids(model, PROMPTS[2]), [GenerationConfig(max_new_tokens=4)] * PREFILL_GROUP, group)
        for sink in group:
            assert sink.done.wait(30)
        assert not long.done.is_set()
    finally:
        engine.stop()
    expected = model.generate(PROMPTS[2], max_new_tokens=4).token_ids
    assert all(sink.tokens == expected for sink in group)
    prefills = engine.metrics.prefill_batch_size  # the long one alone, then the group in one prefill
    assert (prefills.count, prefills.sum) == (2, 1 + PREFILL_GROUP)


def test_join_wait_must_be_a_non_negative_number_of_seconds():
    with pytest.raises(MedusaError, match="join_wait must be 0 or more seconds"):
        EngineConfig(join_wait=-1)


def test_warm_up_on_the_cpu_runs_a_generation_and_refuses_to_capture_a_busy_engine(serve_model):
    from medusa.acceptance import StepKind

    engine = Engine(serve_model, EngineConfig(max_batch=2))
    decoding = engine.warm_up()
    assert decoding is engine.decoding_engine() and decoding.active == 0
    assert decoding.capture_report() is None  # no graphs on the CPU
    generation = serve_model.prepare("hello", GenerationConfig(max_new_tokens=4))
    decoding.add([generation])
    with pytest.raises(MedusaError, match="only on an idle engine"):
        decoding.capture([StepKind()])
    decoding.finish([generation])


@pytest.mark.parametrize("adaptive", [False, True])
def test_warm_up_gives_an_adaptive_engine_room_for_both_graphs_of_each_step(serve_model, monkeypatch, adaptive):
    """An adaptive engine captures a plain step's graph beside each tree step's: the start-up budget doubles, or the
    longer spans' graphs would be captured while requests wait."""
    from medusa.engine import DecodingEngine
    from medusa.serve.engine import MAX_WARM_GRAPHS

    budgets = []
    monkeypatch.setattr(DecodingEngine, "capture", lambda self, kinds, max_graphs=None: budgets.append(max_graphs))
    Engine(serve_model, EngineConfig(max_batch=2, options=EngineOptions(adaptive=adaptive))).warm_up()
    assert budgets == [MAX_WARM_GRAPHS * (2 if adaptive else 1)]


def test_when_waiting_requests_join_a_running_batch(serve_model, monkeypatch):
    """The admission rule alone, on a clock: at once with no batch running or a full prefill group; otherwise
    after ``join_wait`` counted from when the first waiting request had a free row to take."""
    now = [100.0]
    monkeypatch.setattr("medusa.serve.engine.time.monotonic", lambda: now[0])
    engine = Engine(serve_model, EngineConfig(max_batch=16, join_wait=0.5))

    def wait_line(count: int, submitted: float) -> None:
        engine._waiting.clear()
        for _ in range(count):
            job = Job([1, 2], GenerationConfig(max_new_tokens=2), lambda event: None, deadline=1e9)
            job.submitted = submitted
            engine._waiting.append(job)

    assert not engine._may_join(running=3)  # nobody waits
    wait_line(1, submitted=100.0)
    assert engine._may_join(running=0)  # no batch running: join now
    engine._room_since = None
    assert not engine._may_join(running=3)
    now[0] = 100.4
    assert not engine._may_join(running=3)
    now[0] = 100.5
    assert engine._may_join(running=3)  # waited join_wait with a free row
    engine._room_since = None
    wait_line(PREFILL_GROUP, submitted=now[0])
    assert engine._may_join(running=3)  # a full prefill group joins at once
    engine._room_since = None
    # More requests than rows: the first has waited long, but for a full batch; its wait starts with a free row.
    wait_line(3, submitted=90.0)
    assert not engine._may_join(running=16)
    now[0] = 101.0
    assert not engine._may_join(running=15)  # a row just came free
    now[0] = 101.5
    assert engine._may_join(running=14)
    zero = Engine(serve_model, EngineConfig(max_batch=16, join_wait=0))
    zero._waiting.extend(engine._waiting)
    assert zero._may_join(running=3)  # join_wait 0: the next step boundary


def test_the_default_running_batch_is_the_largest_bucket_whose_tuned_tree_pays_and_fits():
    from medusa.cache import kv_bytes_per_row
    from medusa.engine import EngineOptions
    from medusa.serve.engine import GPU_MAX_BATCH, KV_MEMORY_SHARE, default_max_batch
    from medusa.tree import Tree, default_tree

    model = make_slow_model(0.0)
    options, slots, plenty = EngineOptions(), 2048, 10**15
    assert default_max_batch(model, options, slots, plenty) == GPU_MAX_BATCH  # no trees tuned per batch size
    root = Tree.from_paths([])
    model.batch_trees = {2: default_tree(16), 4: default_tree(8), 8: root, 16: root, 32: root, 64: root}
    assert default_max_batch(model, options, slots, plenty) == 4  # from batch 8 on, no tree pays
    model.batch_trees[64] = default_tree(8)
    assert default_max_batch(model, options, slots, plenty) == 64
    assert default_max_batch(model, EngineOptions(use_heads=False), slots, plenty) == GPU_MAX_BATCH
    # Memory caps it: room for the KV cache of 20 rows is room for a bucket of 16.
    row = kv_bytes_per_row(model.base_model.config, slots, model.base_model.dtype)
    assert default_max_batch(model, options, slots, int(20 * row / KV_MEMORY_SHARE)) == 16
    assert default_max_batch(model, options, slots, 0) == 1
    assert default_max_batch(model, options, slots) == 64  # on the CPU nothing is measured: no cap
