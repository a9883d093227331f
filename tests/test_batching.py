"""Batches through the one engine: every row's tokens are its own single-sequence answer.

Greedy rows equal transformers' ``generate(do_sample=False)``; seeded sampled rows give the same tokens
alone and beside other requests. The oracle (``helpers.decoding``) makes rows accept different, long paths,
so per-row compaction, rows joining a running batch and rows leaving it (the others moving into their
place) are all exercised.
"""

from __future__ import annotations

import json
import logging
import random
import runpy
import sys
from pathlib import Path

import pytest
import torch

import medusa.tuned_trees
from helpers.decoding import (
    CUSTOM_TREE,
    architecture_of,
    oracle_engine,
    oracle_generation,
    plain_greedy,
    random_prompts,
    reference,
    run_in_engine,
)
from helpers.models import ARCHITECTURES, EOS_ID, make_tiny_model
from helpers.text_model import make_tokenizer
from medusa.engine import BATCH_BUCKETS, bucket_for
from medusa.errors import MedusaError
from medusa.model import GenerationConfig, MedusaModel, is_prompt_batch
from medusa.tree import Tree, default_tree

NEW_TOKENS = 16
# Mixed lengths, a one-token prompt among them; references are shared with test_decoding's cache.
BATCH = random_prompts(4, seed=31) + [[17]]


def references(architecture: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    return [list(reference(architecture, tuple(prompt), max_new_tokens)) for prompt in prompts]


# ----- through MedusaModel ------------------------------------------------------------------------


@pytest.mark.parametrize("tree", ["8", "64", CUSTOM_TREE], ids=["8", "64", "custom"])
def test_batch_equals_each_sequence_alone(tiny_model, tree):
    model = MedusaModel.from_pretrained(tiny_model, tree=tree)
    expected = references(architecture_of(tiny_model), BATCH, NEW_TOKENS)
    results = model.generate(BATCH, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in results] == expected
    for result in results:
        assert result.finish_reason == ("stop" if EOS_ID in result.token_ids else "length")
        assert result.stats.steps >= 1 and result.stats.new_tokens == len(result.token_ids)


def test_plain_decoding_in_a_batch(tiny_model):
    model = MedusaModel.from_pretrained(tiny_model, tree="16")
    results = model.generate(BATCH, max_new_tokens=NEW_TOKENS, use_heads=False)
    assert [r.token_ids for r in results] == references(architecture_of(tiny_model), BATCH, NEW_TOKENS)
    assert all(r.stats.accepted_per_step == [1] * r.stats.steps for r in results)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_lookup_branch_per_row(architecture):
    model = MedusaModel.from_pretrained(make_tiny_model(architecture), tree="8")
    results = model.generate(BATCH, max_new_tokens=NEW_TOKENS, lookup=4)
    assert [r.token_ids for r in results] == references(architecture, BATCH, NEW_TOKENS)


def test_each_sequence_stops_at_its_own_eos():
    base = make_tiny_model("llama")
    unbounded = references("llama", BATCH, NEW_TOKENS)
    stop_token = unbounded[0][5]
    base.generation_config.eos_token_id = stop_token
    model = MedusaModel.from_pretrained(base, tree="16")
    expected = [plain_greedy(base, prompt, NEW_TOKENS) for prompt in BATCH]
    assert any(len(e) < NEW_TOKENS for e in expected) and any(len(e) == NEW_TOKENS for e in expected)
    results = model.generate(BATCH, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in results] == expected
    assert [r.finish_reason for r in results] == ["stop" if e[-1] == stop_token else "length" for e in expected]


def test_per_row_limits_and_settings_in_one_batch():
    """Each row its own max_new_tokens and sampling: greedy rows stay exact, seeded rows reproduce alone."""
    model = MedusaModel.from_pretrained(make_tiny_model("llama"), tree="16")
    configs = [
        GenerationConfig(max_new_tokens=5),
        GenerationConfig(max_new_tokens=20, temperature=0.8, seed=11),
        GenerationConfig(max_new_tokens=12, temperature=1.2, top_k=20, top_p=0.9, seed=5),
        GenerationConfig(max_new_tokens=9, temperature=0.7, acceptance="typical", seed=2),
        GenerationConfig(max_new_tokens=16),
    ]
    batched = model.generate_batch(BATCH, configs)
    alone = [model.generate(prompt, config) for prompt, config in zip(BATCH, configs)]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [len(r.token_ids) for r in batched] == [5, 20, 12, 9, 16] or EOS_ID in sum(
        (r.token_ids for r in batched), []
    )
    assert batched[0].token_ids == list(reference("llama", tuple(BATCH[0]), 5))


def test_a_seeded_sample_does_not_depend_on_heads_tree_or_batch():
    """The noise of each position is fixed by the seed, so the tree that verified a token cannot change it."""
    model = MedusaModel.from_pretrained(make_tiny_model("qwen2"), tree="64")
    config = GenerationConfig(max_new_tokens=24, temperature=0.9, seed=1234)
    alone = model.generate(BATCH[1], config).token_ids
    assert model.generate(BATCH[1], config, use_heads=False).token_ids == alone
    assert model.generate(BATCH[1], config, tree="8").token_ids == alone
    assert model.generate(BATCH[1], config, lookup=5).token_ids == alone
    mixed = [GenerationConfig(max_new_tokens=24, temperature=0.5, seed=seed) for seed in (1, 2)]
    assert model.generate_batch([BATCH[0], BATCH[1], BATCH[2]], [mixed[0], config, mixed[1]])[1].token_ids == alone
    assert model.generate(BATCH[1], GenerationConfig(max_new_tokens=24, temperature=0.9, seed=4321)).token_ids != alone


def test_more_prompts_than_rows_run_in_turns():
    model = MedusaModel.from_pretrained(make_tiny_model("gemma"), tree="8")
    prompts = random_prompts(70, seed=5)
    results = model.generate(prompts, max_new_tokens=3)
    assert [r.token_ids for r in results[:3]] == references("gemma", prompts[:3], 3)
    assert len(results) == 70 and all(len(r.token_ids) == 3 or EOS_ID in r.token_ids for r in results)


@pytest.mark.parametrize("architecture", ["mistral", "qwen2"])
def test_batch_with_a_short_sliding_window(architecture):
    config_class, model_class, _ = ARCHITECTURES[architecture]
    base = make_tiny_model(architecture)
    window = {"sliding_window": 6}
    if architecture == "qwen2":
        window.update(use_sliding_window=True, max_window_layers=1)
    settings = {k: v for k, v in base.config.to_dict().items() if k != "layer_types"}
    torch.manual_seed(0)
    windowed = model_class(config_class(**{**settings, **window})).eval()
    prompts = [p + [10] * 8 for p in random_prompts(3, seed=2)]
    expected = [plain_greedy(windowed, prompt, NEW_TOKENS) for prompt in prompts]
    model = MedusaModel.from_pretrained(windowed, tree="64")
    assert [r.token_ids for r in model.generate(prompts, max_new_tokens=NEW_TOKENS)] == expected


def test_stop_strings_per_sequence():
    model = MedusaModel.from_pretrained(make_tiny_model("llama", seed=1), tokenizer=make_tokenizer(), tree="16")
    prompts = ["Tell me a story.", "Hi", "What is the capital of a country with a long name?"]
    alone = [model.generate(p, max_new_tokens=24) for p in prompts]
    stop = alone[0].text[8:10]  # surely in the first answer; maybe in the others
    expected = [model.generate(p, max_new_tokens=24, stop=stop) for p in prompts]
    results = model.generate(prompts, max_new_tokens=24, stop=stop)
    assert [(r.text, r.token_ids, r.finish_reason) for r in results] == [
        (e.text, e.token_ids, e.finish_reason) for e in expected
    ]
    assert results[0].finish_reason == "stop" and stop not in results[0].text


# ----- buckets and per-bucket trees ---------------------------------------------------------------


def test_bucket_choice():
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 8, 9, 33, 64)] == [1, 2, 4, 4, 8, 8, 16, 64, 64]
    with pytest.raises(MedusaError, match="largest batch bucket"):
        bucket_for(BATCH_BUCKETS[-1] + 1)


def test_each_bucket_runs_its_own_tree():
    model = MedusaModel.from_pretrained(make_tiny_model("llama"), tree="64")
    model.node_budget = 64
    assert [model.tree_for(rows=n).size for n in (1, 2, 4, 8, 64)] == [64, 32, 16, 8, 1]
    model.batch_trees = {4: Tree.from_paths([[0], [1]]), 8: Tree.from_paths([])}
    assert model.tree_for(rows=3).size == 3 and model.tree_for(rows=5).size == 1
    engine = model.engine(max_rows=8, max_length=40)
    assert {rows: tree.size for rows, tree in engine.decoder.trees.items()} == {1: 64, 2: 32, 4: 3, 8: 1}
    # A bucket whose tree has no head paths runs no heads, and stays lossless.
    results = model.generate(BATCH, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in results] == references("llama", BATCH, NEW_TOKENS)
    assert all(r.stats.accepted_per_step == [1] * r.stats.steps for r in results)  # bucket 8: one node


# ----- the oracle: rows accept different, long paths; they join and leave ---------------------------


@pytest.mark.parametrize("architecture", ["llama", "gemma", "phi3"])
def test_oracle_batch_long_paths_mixed_limits_and_eos(architecture):
    base = make_tiny_model(architecture)
    truths = references(architecture, BATCH, 40)
    limits = [30, 7, 22, 30, 13]
    engine = oracle_engine(base, default_tree(64), max_rows=8, max_length=80)
    generations = [oracle_generation(engine, p, t, n, {EOS_ID}) for p, t, n in zip(BATCH, truths, limits)]
    for _ in engine.run(generations):
        pass
    for generation, truth, limit in zip(generations, truths, limits):
        expected = truth[:limit]
        if EOS_ID in expected:
            expected = expected[: expected.index(EOS_ID) + 1]
        assert generation.tokens == expected
    accepted = [a for g in generations for a in g.stats.accepted_per_step]
    assert max(accepted) == 5 and sum(accepted) / len(accepted) > 2


def test_oracle_rows_join_a_running_batch_and_leave_it():
    """Rows join mid-run and leave at different times: a joiner takes a row freed in the middle, and the last
    rows move down only when the batch fits a smaller bucket; every answer stays its own."""
    base = make_tiny_model("qwen2")
    prompts = random_prompts(6, seed=44)
    truths = references("qwen2", prompts, 40)
    engine = oracle_engine(base, default_tree(32), max_rows=8, max_length=80)
    limits = (4, 30, 12, 30)
    first = [oracle_generation(engine, p, t, n, set()) for p, t, n in zip(prompts[:4], truths[:4], limits)]
    engine.add(first)
    while not first[0].finished:
        engine.step()
    assert [g is None for g in engine.rows] == [True, False, False, False]  # row 0 is free; nothing moved
    later = [oracle_generation(engine, p, t, 25, set()) for p, t in zip(prompts[4:], truths[4:])]
    engine.add(later)
    assert [g.row for g in later] == [0, 4]  # the free row first
    everyone = first + later
    moved = False
    while engine.active:
        rows_before = {id(g): g.row for g in engine.generations}
        engine.step()
        moved |= any(g.row != rows_before[id(g)] for g in engine.generations)
        assert bucket_for(len(engine.rows)) == bucket_for(max(engine.active, 1))  # the smallest bucket
        assert all(engine.rows[g.row] is g for g in engine.generations)
        assert all(length == 0 for g, length in zip(engine.rows, engine.lengths) if g is None)
    for generation, truth in zip(everyone, truths):
        assert generation.tokens == truth[: generation.max_new_tokens]
    assert moved  # the batch shrank to a smaller bucket, and its last rows moved down


def test_oracle_cache_rows_hold_each_rows_plain_sequence():
    """After a batch with long accepted paths, every row's committed K/V are those of its plain sequence."""
    base = make_tiny_model("mistral")
    truths = references("mistral", BATCH[:3], 40)
    engine = oracle_engine(base, default_tree(64), max_rows=4, max_length=80)
    generations = [oracle_generation(engine, p, t, 30, set()) for p, t in zip(BATCH[:3], truths)]
    engine.add(generations)
    while all(g.stats.new_tokens < 20 for g in generations):
        engine.step()
    for row, (prompt, truth) in enumerate(zip(BATCH, truths)):
        committed = engine.lengths[row]
        sequence = torch.tensor([prompt + truth])[:, :committed]
        with torch.no_grad():
            fresh = base(sequence, use_cache=True).past_key_values
        for layer, fresh_layer in zip(engine.decoder.cache.layers, fresh.layers):
            torch.testing.assert_close(layer.keys[row : row + 1, :, :committed], fresh_layer.keys, rtol=1e-4, atol=1e-5)
    engine.finish(generations)


# ----- overlapped steps: the next step launched before the host's bookkeeping ----------------------


def ahead_of_bookkeeping(engine) -> list[bool]:
    """After each of ``engine``'s steps that leaves rows running: whether the next step was already launched."""
    seen = []
    step = engine.step

    def watched():
        results = step()
        if engine.active:
            seen.append(engine._in_flight is not None)
        return results

    engine.step = watched
    return seen


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_overlapped_steps_keep_every_row_its_own_answer(architecture):
    """What a GPU does by default: each step is launched before the last one's bookkeeping. Rows ending at EOS
    or at their limit, rows joining as others leave and rows moving down all keep their own answers. Three rows
    end exactly where the cache's slots do (prompt + limit = 256), so a row at its limit whose last step
    accepted more than it needed would write its extra step past the cache unless it is released first."""
    base = make_tiny_model(architecture)
    prompts = random_prompts(7, seed=21)
    truths = references(architecture, prompts, 262)
    limits = [256 - len(prompts[0]), 7, 256 - len(prompts[2]), 30, 13, 256 - len(prompts[5]), 25]
    engine = oracle_engine(base, default_tree(64), max_rows=4, max_length=256, overlap=True)
    assert engine.decoder.max_length == 256 + 64  # the slots a row's tokens take, and one tree beyond
    eos = [set() if limit > 200 else {EOS_ID} for limit in limits]
    generations = [oracle_generation(engine, *row) for row in zip(prompts, truths, limits, eos)]
    ahead = ahead_of_bookkeeping(engine)
    moved, rows_before = False, {}
    for _ in engine.run(generations, max_rows=3):
        moved |= any(g.row != rows_before.get(id(g), g.row) for g in engine.generations)
        rows_before = {id(g): g.row for g in engine.generations}
        assert all(engine.rows[g.row] is g for g in engine.generations)
    for generation, truth, limit, stop in zip(generations, truths, limits, eos):
        expected = truth[:limit]
        if stop & set(expected):
            expected = expected[: expected.index(EOS_ID) + 1]
        assert generation.tokens == expected
    assert ahead and all(ahead) and moved
    assert max(a for g in generations for a in g.stats.accepted_per_step) == 5


def test_overlapped_steps_change_no_answer_of_any_kind():
    """Greedy, seeded sampled, log-probability and stop-string rows, joining as earlier ones finish: the same
    answers with the next step launched before the bookkeeping as without."""
    from medusa.engine import EngineOptions

    model = MedusaModel.from_pretrained(make_tiny_model("llama", seed=1), tokenizer=make_tokenizer(), tree="16")
    prompts = ["Tell me a story.", "Hi", "What is the capital of a country with a long name?", "Count.", "Why?"]
    stop = model.generate(prompts[0], max_new_tokens=24).text[8:10]
    configs = [
        GenerationConfig(max_new_tokens=24, stop=stop),
        GenerationConfig(max_new_tokens=9, temperature=0.8, top_p=0.9, seed=4),
        GenerationConfig(max_new_tokens=20, logprobs=2),
        GenerationConfig(max_new_tokens=17, temperature=1.0, seed=5),
        GenerationConfig(max_new_tokens=12),
    ]
    runs = {}
    for overlap in (False, True):
        options = EngineOptions(overlap=overlap)
        engine = model.engine(options, max_rows=2, max_length=64)
        ahead = ahead_of_bookkeeping(engine)
        results = model.generate_batch(prompts, configs, options=options, max_batch=2)
        runs[overlap] = [(r.text, r.token_ids, r.finish_reason, r.logprobs) for r in results]
        assert ahead and set(ahead) == {overlap}
    assert runs[True] == runs[False]
    assert runs[True][0][2] == "stop" and runs[True][2][3] is not None


def test_a_prefill_joining_while_a_step_is_in_flight_cannot_clobber_its_outputs(monkeypatch):
    """On a GPU a prefill's graph may reuse, as scratch memory, the pool memory that holds a step graph's outputs
    (graphs share one pool, and the prefills are captured first). With steps launched ahead, a prefill can run
    between a step's launch and the reading of its tokens: the engine must read them first. Simulated here: every
    prefill scribbles over the last step's outputs."""
    from medusa.decoding import Decoder
    from medusa.engine import DecodingEngine, EngineOptions

    model = MedusaModel.from_pretrained(make_tiny_model("qwen2"), tree="16")
    prompts = random_prompts(6, seed=17)
    configs = [GenerationConfig(max_new_tokens=n, chat_template=False) for n in (3, 11, 5, 8, 2, 9)]
    expected = [model.generate(p, c).token_ids for p, c in zip(prompts, configs)]
    last_outputs = []
    run_step, prefill_step = DecodingEngine.run_step, Decoder.prefill_step

    def recording_step(self, *args):
        outputs = run_step(self, *args)
        last_outputs[:] = outputs
        return outputs

    def clobbering_prefill(self, *args, **kwargs):
        prefill_step(self, *args, **kwargs)
        for tensor in last_outputs:
            tensor.fill_(-7)

    monkeypatch.setattr(DecodingEngine, "run_step", recording_step)
    monkeypatch.setattr(Decoder, "prefill_step", clobbering_prefill)
    results = model.generate_batch(prompts, configs, options=EngineOptions(overlap=True), max_batch=2)
    assert [r.token_ids for r in results] == expected


# ----- bad input ----------------------------------------------------------------------------------


def test_bad_batches_are_refused_clearly():
    model = MedusaModel.from_pretrained(make_tiny_model("llama"), tokenizer=make_tokenizer(), tree="8")
    with pytest.raises(MedusaError, match="the list of prompts is empty"):
        model.generate_batch([], max_new_tokens=4)
    with pytest.raises(MedusaError, match="prompt 1: the prompt is empty"):
        model.generate(["hello", ""], max_new_tokens=4)
    with pytest.raises(MedusaError, match="prompt 1: the prompt is empty"):
        model.generate([[5, 6], []], max_new_tokens=4)
    with pytest.raises(MedusaError, match=r"prompt 0: prompt token ids must lie in \[0, 256\)"):
        model.generate([[5, 999], [5]], max_new_tokens=4)
    with pytest.raises(MedusaError, match="takes a list of prompts"):
        model.generate_batch("hello", max_new_tokens=4)
    with pytest.raises(MedusaError, match="2 configs for 3 prompts"):
        model.generate_batch(["a", "b", "c"], [GenerationConfig(), GenerationConfig()])
    with pytest.raises(MedusaError, match="unknown generation setting"):
        model.generate(["a", "b"], max_new_tokens=4, temprature=0.5)
    with pytest.raises(MedusaError, match="the prompt is empty"):  # an empty list is one empty prompt
        model.generate([], max_new_tokens=4)


def test_a_busy_engine_is_not_resized():
    model = MedusaModel.from_pretrained(make_tiny_model("llama"), tree="8")
    engine = model.engine(max_rows=2, max_length=40)
    generation = model.prepare([5, 6, 7], GenerationConfig(max_new_tokens=4))
    engine.add([generation])
    with pytest.raises(MedusaError, match="must wait for it to empty"):
        engine.reserve(2, 500)
    engine.finish([generation])
    engine.reserve(2, 500)  # idle: rebuilt with room
    assert engine.fits(500)


def test_what_counts_as_a_batch():
    assert is_prompt_batch(["a", "b"]) and is_prompt_batch([[1, 2], [3]]) and is_prompt_batch([torch.tensor([1])])
    assert is_prompt_batch([[{"role": "user", "content": "hi"}]])  # one message list in a batch
    assert not is_prompt_batch([1, 2, 3]) and not is_prompt_batch("abc") and not is_prompt_batch([])
    assert not is_prompt_batch([{"role": "user", "content": "hi"}])  # a message list is one prompt


def test_throughput_script_runs_on_a_tiny_model(tmp_path, monkeypatch):
    script = Path(__file__).resolve().parents[1] / "scripts" / "batch_throughput.py"
    out = tmp_path / "batch.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [str(script), "--tiny", "--batch-sizes", "1,2", "--prompts", "3", "--max-new-tokens", "4", "--out", str(out)],
    )
    runpy.run_path(str(script), run_name="__main__")
    report = json.loads(out.read_text())
    assert [row["batch_size"] for row in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["identical_answers"] == 3  # greedy: Medusa's answers are the plain ones
        assert row["medusa"]["new_tokens"] == row["autoregressive"]["new_tokens"] > 0
    assert out.with_suffix(".png").is_file()
    host = report["rows"][1]["medusa"]["host_ms_per_step"]  # where the steps' host time went, by phase
    assert set(host) == {"launch", "wait", "bookkeeping", "leave"} and host["launch"] > 0


def test_batch_steps_script_counts_both_schedules_on_the_default_model(default_model, tmp_path, monkeypatch):
    """``scripts/batch_steps.py``: the same answers batched consecutively and continuously, with the trees tuned for
    a GPU, and the steps each took (continuous joining never takes more)."""
    questions = tmp_path / "question.jsonl"
    turns = ["Name three colours.", "What is 2 + 3?", "Say hello in French.", "Write one short sentence."]
    rows = [{"question_id": i, "category": ("a", "b")[i % 2], "turns": [text]} for i, text in enumerate(turns)]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    script = Path(__file__).resolve().parents[1] / "scripts" / "batch_steps.py"
    out = tmp_path / "steps.json"
    argv = [str(script), "--questions", str(questions), "--prompts", "4", "--max-new-tokens", "6"]
    argv += ["--batch-sizes", "2", "--trees-for", "NVIDIA H100 80GB HBM3", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.syspath_prepend(str(script.parent))
    # --trees-for replaces medusa.tuned_trees.device_kind for the script's process: put it back after this test.
    monkeypatch.setattr(medusa.tuned_trees, "device_kind", medusa.tuned_trees.device_kind)
    runpy.run_path(str(script), run_name="__main__")
    assert medusa.tuned_trees.device_kind("cpu") != "cpu"  # the script did replace it
    report = json.loads(out.read_text())
    assert "NVIDIA H100 80GB HBM3" in report["meta"]["tree_origin"]
    assert [(row["batch_size"], row["method"]) for row in report["rows"]] == [(2, "medusa"), (2, "autoregressive")]
    for row in report["rows"]:
        assert row["identical_answers"] == 4
        assert row["continuous"]["new_tokens"] == row["consecutive"]["new_tokens"] > 0
        assert 0 < row["continuous"]["batch_steps"] <= row["consecutive"]["batch_steps"]


def test_engine_timeline_script_runs_on_a_tiny_model(tmp_path, monkeypatch):
    script = Path(__file__).resolve().parents[1] / "scripts" / "engine_timeline.py"
    out = tmp_path / "timeline.json"
    argv = [str(script), "--shape", "tiny", "--batches", "1,2", "--prefill-lengths", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    report = json.loads(out.read_text())
    assert set(report["prefill"]) == {"default", "no_cudnn"}
    assert [(row["use_heads"], row["batch"]) for row in report["steps"]] == [
        (False, 1),
        (False, 2),
        (True, 1),
        (True, 2),
    ]
    for row in report["steps"]:
        assert row["steps"] > 0 and row["new_tokens"] > 0
        assert sum(row["ms_per_step_by_phase"].values()) <= row["ms_per_step"] * 1.01


def test_capture_up_front_takes_the_prefills_then_the_shortest_spans_first_within_its_budget():
    """``capture`` asks first for the prefill of every prompt width, group size that width takes (2 prompts at
    most at 2048 tokens) and prefill kind (loaded on idle rows, which it frees again), then for every (bucket, span,
    kind) up to the engine's rows, shortest spans first, and stops at ``max_graphs``; it refuses a busy engine and
    one whose cache has no buffers yet (the graphs are planted: the CPU captures none)."""
    from medusa.acceptance import StepKind
    from medusa.decoding import PREFILL_WIDTHS

    model = MedusaModel.from_pretrained(make_tiny_model("llama", max_positions=2200), tree="8")
    engine = model.engine(max_rows=4, max_length=2100, keep=False)

    class Recorder:
        def __init__(self) -> None:
            self.keys, self.prefills = [], []

        def prepare(self, rows, span, kind, plain=False) -> None:
            assert not plain  # the engine is not adaptive: its steps always verify their trees
            self.keys.append((rows, span, kind))

        def prepare_prefill(self, prompts, width, kind) -> None:
            assert engine.decoder.prompt_rows[:prompts].tolist() == list(range(prompts))
            engine.decoder.prefill_step(prompts, width, kind)  # as a capture's warm-up does
            self.prefills.append((prompts, width, kind))

    engine.graphs = Recorder()
    with pytest.raises(MedusaError, match="after the engine's first generation"):
        engine.capture([StepKind()])
    engine.graphs = None
    for _ in engine.run([model.prepare([5, 6, 7], GenerationConfig(max_new_tokens=2, chat_template=False))]):
        pass
    assert not engine.capture([StepKind()])  # no graphs on the CPU
    engine.graphs = recorder = Recorder()
    kinds = [StepKind(), StepKind(sample=True), StepKind(sample=True, logprobs=3)]  # two kinds of prefill
    assert len(engine.spans) >= 2
    sizes = {2048: (1, 2)}  # 4 prompts of 2048 tokens would pass the prefill's token budget
    prefills = [
        (size, width, kind) for kind in kinds[:2] for width in PREFILL_WIDTHS for size in sizes.get(width, (1, 2, 4))
    ]
    assert engine.capture(kinds, max_graphs=len(prefills) + 7)
    assert recorder.prefills == prefills
    first_span = [(bucket, engine.spans[0], kind) for kind in kinds[:2] for bucket in (1, 2, 4)]
    assert recorder.keys == [*first_span, (1, engine.spans[0], kinds[2])]
    assert not engine.decoder.active.any() and not engine.decoder.lengths.any()  # the prefilled rows are free again
    recorder.keys.clear()
    assert engine.capture(kinds, max_graphs=5)
    assert recorder.keys == []  # the budget went to prefills
    assert engine.capture(kinds)
    assert len(recorder.keys) == 3 * 3 * len(engine.spans)
    generation = model.prepare([5, 6], GenerationConfig(max_new_tokens=2, chat_template=False))
    engine.graphs = None
    engine.add([generation])
    with pytest.raises(MedusaError, match="only on an idle engine"):
        engine.capture(kinds)
    engine.finish([generation])


def test_more_generations_than_rows_join_as_earlier_ones_finish():
    """``run`` with more generations than rows: each joins when an earlier one finishes, not when a whole batch
    has ended, and every answer is its own."""
    model = MedusaModel.from_pretrained(make_tiny_model("llama"), tree="8")
    engine = model.engine(max_rows=2, max_length=64, keep=False)
    prompts = random_prompts(5, seed=3)
    limits = [3, 12, 4, 6, 2]
    configs = [GenerationConfig(max_new_tokens=n, chat_template=False) for n in limits]
    generations = [model.prepare(p, c) for p, c in zip(prompts, configs)]
    most, joined_beside_a_running_one = 0, False
    for _ in engine.run(generations):
        most = max(most, engine.active)
        joined_beside_a_running_one |= generations[2] in engine.generations and not generations[1].finished
    assert all(g.finished for g in generations) and most == 2 and engine.active == 0
    assert joined_beside_a_running_one
    for generation, prompt, config in zip(generations, prompts, configs):
        assert generation.tokens == model.generate(prompt, config).token_ids


def test_generate_batch_with_more_prompts_than_the_largest_bucket():
    model = MedusaModel.from_pretrained(make_tiny_model("qwen2"), tree="8")
    prompts = random_prompts(BATCH_BUCKETS[-1] + 6, seed=5)
    results = model.generate_batch(prompts, max_new_tokens=3, chat_template=False)
    assert len(results) == len(prompts)
    for index in (0, BATCH_BUCKETS[-1] - 1, BATCH_BUCKETS[-1] + 5):
        alone = model.generate(prompts[index], max_new_tokens=3, chat_template=False)
        assert results[index].token_ids == alone.token_ids


def test_generate_batch_runs_at_most_max_batch_rows_at_once():
    """``max_batch`` bounds the running rows; the rest join as rows free up, each answer still its own."""
    model = MedusaModel.from_pretrained(make_tiny_model("llama"), tree="8")
    prompts = random_prompts(7, seed=8)
    engine = model.engine()
    most = []
    original_step = type(engine).step

    def counting_step(self):
        most.append(self.active)
        return original_step(self)

    type(engine).step = counting_step
    try:
        results = model.generate_batch(prompts, max_new_tokens=5, chat_template=False, max_batch=3)
    finally:
        type(engine).step = original_step
    assert max(most) == 3
    assert [r.token_ids for r in results] == [
        model.generate(p, max_new_tokens=5, chat_template=False).token_ids for p in prompts
    ]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(MedusaError, match="max_batch must be a positive number of rows"):
            model.generate_batch(prompts, max_new_tokens=2, max_batch=bad)


def test_a_captured_prefill_takes_a_size_graphs_exist_for_filled_with_copies_only_where_cheap():
    from medusa.engine import PREFILL_PIECES, prefill_piece_size

    assert [prefill_piece_size(n, 8, 32) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]  # copies cost little
    assert [prefill_piece_size(n, 8, 512) for n in range(1, 9)] == [1, 2, 4, 4, 4, 8, 8, 8]  # at most a quarter
    assert [prefill_piece_size(n, 4, 1024) for n in range(1, 5)] == [1, 2, 4, 4]
    assert prefill_piece_size(8, 2, 2048) == 2 and prefill_piece_size(3, 1, 64) == 1
    for largest in (1, 2, 4, 8):
        for width in (32, 512, 2048):
            for count in range(1, 9):
                size = prefill_piece_size(count, largest, width)
                assert size in PREFILL_PIECES and size <= largest


def test_a_captured_prefill_holds_at_most_its_token_budget():
    from medusa.decoding import PREFILL_TOKENS, prefill_capacity, prefill_group_limit

    assert [prefill_group_limit(width, 8) for width in (32, 512, 1024, 2048, 4096)] == [8, 8, 4, 2, 1]
    assert prefill_group_limit(1024, 3) == 3 and prefill_group_limit(32, 1) == 1
    assert prefill_capacity(8, 4096) == PREFILL_TOKENS == 4096
    assert prefill_capacity(1, 4096) == 2048  # one prompt of the widest width
    assert prefill_capacity(8, 700) == 8 * 512 and prefill_capacity(1, 700) == 512  # no width past the rows
    assert prefill_capacity(4, 20) == 0  # no captured width fits: every prefill has a cache of its own


def test_prefill_plan_takes_the_longest_prompts_first_with_those_of_the_next_width_down():
    from medusa.engine import prefill_plan

    lengths = [10, 600, 40, 20, 30, 2100, 31, 5]
    assert prefill_plan(lengths, 4096, captured=False) == [(list(range(8)), 2100, False)]
    assert prefill_plan(lengths, 4096, captured=True) == [
        ([1], 1024, True),  # no prompt of 513-1024 (or 1025-2048) tokens joins it
        ([2, 6, 4, 3, 0, 7, 2, 2], 64, True),  # the 32-token width joins the 64; two copies fill it to 8
        ([5], 2100, False),  # wider than any graph: eagerly, at its own width, last
    ]
    assert prefill_plan([200], 240, captured=True) == [([0], 200, False)]  # 256 slots would not fit the rows
    assert prefill_plan([600], 1000, captured=True) == [([0], 600, False)]  # nor would 1024
    # At most 4 prompts of 1024 tokens and 2 of 2048 in one captured prefill (``PREFILL_TOKENS``).
    assert prefill_plan([600] * 7 + [1500], 4096, captured=True) == [
        ([7, 0], 2048, True),
        ([1, 2, 3, 4], 1024, True),
        ([5, 6], 1024, True),
    ]
    assert prefill_plan([1100] * 5, 4096, captured=True) == [
        ([0, 1], 2048, True),
        ([2, 3], 2048, True),
        ([4], 2048, True),
    ]
    # A 300-token prompt (width 512) joins a 1024-wide prefill, a 200-token one (256) does not; three 100-token
    # ones and a copy fill a piece of 4.
    assert prefill_plan([700, 300, 200, 100, 100, 100], 4096, captured=True) == [
        ([0, 1], 1024, True),
        ([2, 3, 4, 5], 256, True),
    ]
    assert prefill_plan([100, 100, 100], 4096, captured=True) == [([0, 1, 2, 0], 128, True)]
    # A decoder of 2 rows takes at most 2 prompts a prefill: no copy makes a prefill larger than its buffers.
    assert prefill_plan([100, 100, 100], 4096, captured=True, group=2) == [([0, 1], 128, True), ([2], 128, True)]


def test_every_prompt_of_a_join_is_prefilled_once_in_graphs_that_exist():
    from medusa.decoding import PREFILL_GROUP, prefill_group_limit, prefill_width
    from medusa.engine import PREFILL_PIECES, prefill_plan

    generator = random.Random(0)
    for _ in range(300):
        lengths = [
            generator.choice([3, 30, 60, 120, 250, 500, 900, 1500, 3000]) for _ in range(generator.randint(1, 8))
        ]
        group = generator.choice([1, 2, 4, PREFILL_GROUP])
        plan = prefill_plan(lengths, 4096, captured=True, group=group)
        seen = [index for members, _, _ in plan for index in dict.fromkeys(members)]
        assert sorted(seen) == list(range(len(lengths)))  # each once (copies repeat a member of the same prefill)
        for members, width, captured in plan:
            if captured:
                assert len(members) in PREFILL_PIECES and len(members) <= prefill_group_limit(width, group)
                assert all(prefill_width(lengths[index], 4096) in (width, width // 2) for index in members)
            else:
                assert all(prefill_width(lengths[index], 4096) is None for index in members)


def test_prefill_width_is_the_smallest_captured_width_that_fits():
    from medusa.decoding import PREFILL_WIDTHS, prefill_width

    assert prefill_width(1, 4096) == PREFILL_WIDTHS[0]
    assert prefill_width(PREFILL_WIDTHS[1], 4096) == PREFILL_WIDTHS[1]
    assert prefill_width(PREFILL_WIDTHS[1] + 1, 4096) == PREFILL_WIDTHS[2]
    assert prefill_width(PREFILL_WIDTHS[-1] + 1, 4096) is None  # longer prompts prefill eagerly
    assert PREFILL_WIDTHS[-1] == 2048 and prefill_width(513, 4096) == 1024 and prefill_width(1187, 4096) == 2048
    assert prefill_width(200, 300) == 256 and prefill_width(300, 300) is None  # never wider than a row's cache
    assert prefill_width(1100, 2000) is None and prefill_width(600, 1024) == 1024


@pytest.mark.parametrize("architecture", ["llama", "gemma", "qwen2"])
def test_prefills_padded_to_captured_widths_and_filled_with_copies_change_no_answer(architecture, monkeypatch):
    """The path a GPU takes with prefill graphs, run eagerly on the CPU: a joining group of 7 as one prefill of 8
    (a copy of its first prompt fills it), padded to a fixed width, and single rows joining running ones. Greedy,
    seeded sampled and log-probability rows give exactly what an unpadded prefill of the whole group gives."""
    from medusa.decoding import PREFILL_WIDTHS
    from medusa.engine import DecodingEngine

    model = MedusaModel.from_pretrained(make_tiny_model(architecture), tree="16")
    prompts = random_prompts(5, seed=12) + [[17], [(5 * i) % 90 + 4 for i in range(40)]]  # widths 32 and 64
    configs = [
        GenerationConfig(max_new_tokens=10, chat_template=False, temperature=0.8, top_k=20, seed=i)
        if i % 3 == 0
        else GenerationConfig(max_new_tokens=10, chat_template=False, logprobs=2 if i == 1 else None)
        for i in range(len(prompts))
    ]
    settings = [{"max_batch": 7}, {"max_batch": 3, "lookup": 4}]  # one group of 7; rows joining running ones
    unpadded = [model.generate_batch(prompts, configs, **setting) for setting in settings]

    prefills = []
    run_prefill = DecodingEngine.run_prefill

    def record(self, count, width, kind, captured):
        prefills.append((count, width, captured))
        run_prefill(self, count, width, kind, captured)

    monkeypatch.setattr(DecodingEngine, "captures_prefills", property(lambda self: True))
    monkeypatch.setattr(DecodingEngine, "run_prefill", record)
    padded = [model.generate_batch(prompts, configs, **setting) for setting in settings]
    assert prefills[0] == (8, 64, True)  # the 32-token widths join the 64; a copy fills the group of 7 to 8
    assert all(captured and width in PREFILL_WIDTHS and count in (1, 2, 4, 8) for count, width, captured in prefills)
    for before, after in zip(unpadded, padded):
        assert [r.token_ids for r in after] == [r.token_ids for r in before]
        assert after[1].logprobs == pytest.approx(before[1].logprobs, abs=1e-5)
        assert after[1].top_logprobs[0][0][0] == before[1].top_logprobs[0][0][0]


@pytest.mark.parametrize("one_store", [True, False])
def test_prefills_run_in_packed_views_of_one_kept_cache_made_outside_any_capture(one_store):
    """A fresh cache allocates and copies on first use, which a CUDA graph cannot hold: once the decoder's cache
    exists, prefills run in views of one kept cache of a flat number of token slots (not growing with the widths:
    8 prompts of 512, 4 of 1024 or 2 of 2048), each view's rows packed from its start; larger ones get their own."""
    model = MedusaModel.from_pretrained(make_tiny_model("llama", max_positions=2200), tree="8")
    engine = model.engine(max_rows=8, max_length=2100, keep=False)
    decoder = engine.decoder
    decoder.one_store = one_store  # the kept prefill cache's layout (the decoder's own cache has one store either way)
    assert decoder._prefill_cache is None  # no cache yet: the first prefill makes its own
    for _ in engine.run([model.prepare([5, 6, 7], GenerationConfig(max_new_tokens=2, chat_template=False))]):
        pass
    views = {shape: decoder.prefill_cache(*shape) for shape in ((8, 32), (8, 512), (4, 1024), (2, 2048), (1, 2100))}
    kept = decoder._prefill_cache
    heads, dim = decoder.cache.layers[0].keys.shape[1], decoder.cache.layers[0].keys.shape[3]
    assert decoder.prefill_capacity == 4096 and (kept.store is not None) == one_store
    for layer in kept.layers:
        assert layer.keys.shape == layer.values.shape == (1, heads, 4096, dim)
    for (count, width), view in views.items():
        for part, whole in zip(view.layers, kept.layers):
            for mine, theirs in ((part.keys, whole.keys), (part.values, whole.values)):
                assert mine.shape == (count, heads, width, dim) and mine.is_contiguous()
                assert mine.data_ptr() == theirs.data_ptr()  # the kept buffer's first count x width slots
            assert part.full_keys is part.keys  # where the prefill's writes land
    decoder.prefill_cache(2, 64)
    assert decoder._prefill_cache is kept  # made once, kept
    for count, width in ((3, 2048), (1, 4097)):  # more than the kept slots: a cache of its own
        assert not decoder.prefill_cache(count, width).layers[0].is_initialized  # allocated by its forward pass
    with pytest.raises(ValueError, match="3 rows of 2048 slots do not fit a cache of 4096 token slots"):
        kept.packed_view(3, 2048, decoder.prompt_starts[:3])
    prompts = random_prompts(3, seed=2)
    results = model.generate_batch(prompts, max_new_tokens=5, chat_template=False)
    assert [r.token_ids for r in results] == [
        model.generate(p, max_new_tokens=5, chat_template=False).token_ids for p in prompts
    ]


@pytest.mark.parametrize("one_store", [True, False])
def test_long_prompts_prefilled_in_packed_views_at_wide_widths_change_no_answer(one_store, monkeypatch):
    """Prompts of 513-2048 tokens take the captured path too (run eagerly on the CPU): padded to 1024 or 2048, in
    pieces of at most 4 or 2 prompts, each in a packed view of the kept prefill cache. Greedy, seeded sampled and
    log-probability rows give exactly what an unpadded prefill of the whole group gives."""
    from medusa.decoding import Decoder
    from medusa.engine import DecodingEngine

    model = MedusaModel.from_pretrained(make_tiny_model("llama", seed=3, max_positions=2200), tree="16")
    prompts = [[(7 * i + k) % 200 + 4 for i in range(560 + 37 * k)] for k in range(5)]  # 560-708 tokens: 1024
    prompts += [[(11 * i + k) % 190 + 5 for i in range(1040 + 45 * k)] for k in range(3)]  # 1040-1130: 2048
    configs = [
        GenerationConfig(max_new_tokens=8, chat_template=False, temperature=0.8, top_k=20, seed=i)
        if i % 3 == 0
        else GenerationConfig(max_new_tokens=8, chat_template=False, logprobs=2 if i == 1 else None)
        for i in range(len(prompts))
    ]
    unpadded = model.generate_batch(prompts, configs, max_batch=8)

    prefills, packed = [], []
    run_prefill, prefill_cache = DecodingEngine.run_prefill, Decoder.prefill_cache

    def record(self, count, width, kind, captured):
        prefills.append((count, width, captured))
        run_prefill(self, count, width, kind, captured)

    def record_cache(self, count, width):
        cache = prefill_cache(self, count, width)
        kept = self._prefill_cache
        packed.append(kept is not None and cache.layers[0].keys.data_ptr() == kept.layers[0].keys.data_ptr())
        return cache

    monkeypatch.setattr(DecodingEngine, "captures_prefills", property(lambda self: True))
    monkeypatch.setattr(DecodingEngine, "run_prefill", record)
    monkeypatch.setattr(Decoder, "prefill_cache", record_cache)
    engine = model.engine(max_rows=8, max_length=2200, keep=False)
    engine.decoder.one_store = one_store  # the kept prefill cache's layout
    for _ in engine.run([model.prepare([5, 6, 7], GenerationConfig(max_new_tokens=2, chat_template=False))]):
        pass  # the first prefill makes the cache (and its own prefill cache)
    prefills.clear()
    packed.clear()
    for max_rows in (8, 3):  # one group of 8, then rows joining running ones
        generations = run_in_engine(engine, model, prompts, configs, max_rows)
        assert [g.tokens for g in generations] == [r.token_ids for r in unpadded]
        assert generations[1].token_logprobs == pytest.approx(unpadded[1].logprobs, abs=1e-5)
    # The longest first: the third 2048-wide prompt takes the longest 1024-wide one with it.
    assert prefills[:3] == [(2, 2048, True), (2, 2048, True), (4, 1024, True)]
    assert all(width in (1024, 2048) and count <= 4096 // width for count, width, _ in prefills)
    assert packed and all(packed)  # every one of them ran in the kept prefill cache


def test_a_prefill_whose_capture_fails_runs_eagerly_and_the_steps_keep_their_graphs(caplog):
    """One failed prefill capture must not cost the steps their graphs (the GPU's first run of captured prefills
    fell back to eager steps): the prefill runs eagerly, every later one too, and the answers are unchanged."""
    from medusa.graphs import CaptureReport

    model = MedusaModel.from_pretrained(make_tiny_model("llama"), tree="8")
    engine = model.engine(max_rows=2, max_length=64, keep=False)
    for _ in engine.run([model.prepare([5, 6, 7], GenerationConfig(max_new_tokens=2, chat_template=False))]):
        pass

    class FailingPrefills:  # replays steps eagerly (the CPU has no graphs); every prefill capture fails
        def __init__(self, decoder) -> None:
            self.decoder, self.report, self.steps, self.prefills = decoder, CaptureReport(), 0, 0

        def prepare(self, rows, span, kind, plain=False) -> None:
            pass

        def __call__(self, rows, span, kind, plain=False):
            self.steps += 1
            return self.decoder.step(rows, span, kind, plain)

        def prefill(self, prompts, width, kind) -> None:
            self.prefills += 1
            raise RuntimeError("cannot capture this prefill")

    engine.graphs = planted = FailingPrefills(engine.decoder)
    prompts = random_prompts(4, seed=9)
    configs = [GenerationConfig(max_new_tokens=6, chat_template=False) for _ in prompts]
    generations = [model.prepare(p, c) for p, c in zip(prompts, configs)]
    with caplog.at_level(logging.WARNING, logger="medusa"):
        for _ in engine.run(generations):
            pass
    assert "capture of a prefill failed" in caplog.text and engine.prefill_graphs_refused
    assert planted.prefills == 1 and not engine.captures_prefills  # tried once, then eager
    assert engine.graphs is planted and planted.steps > 0 and not engine.graphs_refused
    assert [g.tokens for g in generations] == [model.generate(p, c).token_ids for p, c in zip(prompts, configs)]
