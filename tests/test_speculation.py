"""The adaptive switch: per batch bucket and step kind, plain one-token steps where the tree does not pay.

The switch itself learns from the rates it is told (measured here by hand); the engine tells it each step's time
and tokens per row, and steps of either mode interleave freely without changing a token: greedy rows stay the base
model's own, seeded sampled rows their own samples, while the oracle makes long paths accepted between plain
steps (cache compaction, the lookup history and the prefix layer's K/V all carried across the switches).
"""

from __future__ import annotations

import pytest
import torch

from helpers.decoding import AlternatingSwitch, oracle_engine, oracle_generation, plain_greedy, random_prompts
from helpers.heads import sequential_heads
from helpers.models import make_tiny_model
from helpers.text_model import make_tokenizer
from medusa.acceptance import StepKind
from medusa.engine import EngineOptions
from medusa.model import GenerationConfig, MedusaModel
from medusa.serve.metrics import Metrics
from medusa.speculation import Rate, SpeculationSwitch, SwitchSettings
from medusa.tree import default_tree


def decide(switch: SpeculationSwitch, key, rates: dict[bool, tuple[float, float]], steps: int) -> list[bool]:
    """Run ``steps`` decisions, telling the switch after each the (seconds, tokens per row) of the mode it chose."""
    choices = []
    for _ in range(steps):
        plain = switch.plain(key)
        switch.record(key, plain, *rates[plain])
        choices.append(plain)
    return choices


# ----- the switch ---------------------------------------------------------------------------------


def test_the_switch_measures_the_tree_then_plain_then_runs_the_faster_and_probes_the_other():
    switch = SpeculationSwitch(SwitchSettings(warmup=2, probe_every=4))
    # The tree commits 2 tokens per row in 30 ms (67 a second), plain 1 in 10 ms (100): plain wins.
    choices = decide(switch, "k", {False: (0.030, 2.0), True: (0.010, 1.0)}, 12)
    assert choices[:4] == [False, False, True, True]
    assert choices[4:] == [True, True, True, False, True, True, True, False]  # decisions 8 and 12 probe the tree
    report = switch.report()["k"]
    assert report["plain_tokens_per_row_second"] == pytest.approx(100.0)
    assert report["tree_tokens_per_row_second"] == pytest.approx(2.0 / 0.030)
    assert report["plain_share"] == pytest.approx(8 / 12)


def test_a_tree_that_pays_keeps_running_and_each_key_learns_on_its_own():
    switch = SpeculationSwitch(SwitchSettings(warmup=1, probe_every=8))
    paying = decide(switch, (32, StepKind()), {False: (0.012, 3.0), True: (0.010, 1.0)}, 17)
    assert paying[:2] == [False, True] and paying.count(True) == 1 + 2  # the warm-up, then a probe every 8
    losing = decide(switch, (32, StepKind(sample=True)), {False: (0.020, 1.5), True: (0.010, 1.0)}, 9)
    assert losing[:2] == [False, True] and losing[2:] == [True] * 5 + [False] + [True]


def test_the_switch_follows_a_tree_that_starts_paying_again():
    """The rates are running means: when sampled rows leave and the tree accepts more again, probes bring it back."""
    switch = SpeculationSwitch(SwitchSettings(warmup=2, probe_every=4, smoothing=0.5))
    decide(switch, "k", {False: (0.020, 1.2), True: (0.010, 1.0)}, 12)
    assert switch.plain("k")
    later = decide(switch, "k", {False: (0.020, 3.5), True: (0.010, 1.0)}, 12)
    assert later[-4:].count(False) == 3  # the tree again, but for one probe of plain steps in every four


def test_a_rate_starts_at_its_first_measurement_then_moves_by_the_smoothing():
    rate = Rate()
    rate.add(0.02, 3.0, smoothing=0.25)
    assert (rate.seconds, rate.tokens, rate.per_row_second) == (0.02, 3.0, pytest.approx(150.0))
    rate.add(0.06, 1.0, smoothing=0.25)
    assert rate.seconds == pytest.approx(0.03) and rate.tokens == pytest.approx(2.5) and rate.samples == 2
    assert Rate().per_row_second == 0.0


@pytest.mark.parametrize(
    "settings", [SwitchSettings(warmup=0), SwitchSettings(probe_every=1), SwitchSettings(smoothing=0.0)]
)
def test_settings_out_of_range_are_refused(settings):
    with pytest.raises(ValueError, match="switch settings out of range"):
        SpeculationSwitch(settings)


# ----- the engine ---------------------------------------------------------------------------------


@pytest.mark.parametrize("head_type, prefix_layer", [("medusa", False), ("sequential", False), ("sequential", True)])
def test_steps_switching_between_tree_and_plain_change_no_token(head_type, prefix_layer):
    """Greedy, seeded sampled (rejection, top-p) and log-probability rows, joining as others finish, with a lookup
    branch: the same tokens when every other step runs plain as when every step verifies the tree."""
    base = make_tiny_model("llama", seed=1)
    heads = sequential_heads(base, head_type=head_type, prefix_layer=prefix_layer, path_gain=4.0)
    model = MedusaModel.from_pretrained(base, heads=heads, tokenizer=make_tokenizer(), tree="16")
    prompts = ["Tell me a story.", "Hi", "What is the capital of a country with a long name?", "Count.", "Why?"]
    configs = [
        GenerationConfig(max_new_tokens=24),
        GenerationConfig(max_new_tokens=9, temperature=0.8, top_p=0.9, seed=4),
        GenerationConfig(max_new_tokens=20, logprobs=2),
        GenerationConfig(max_new_tokens=17, temperature=1.0, seed=5),
        GenerationConfig(max_new_tokens=12),
    ]
    expected = model.generate_batch(prompts, configs, max_batch=2, lookup=4)
    options = EngineOptions(adaptive=True, lookup=4)
    engine = model.engine(options, max_rows=2, max_length=96)
    engine.switch = switch = AlternatingSwitch()
    results = model.generate_batch(prompts, configs, options=options, max_batch=2)
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    # A token's log-probability comes from a forward pass over a different tree: equal up to float rounding.
    assert results[2].logprobs == pytest.approx(expected[2].logprobs, abs=1e-5)
    assert engine.times.plain_steps == switch.choices.count(True) > 0 and False in switch.choices
    # Plain steps commit one token a row, tree steps sometimes more: both ran.
    accepted = [a for r in results for a in r.stats.accepted_per_step]
    assert max(accepted) >= 2 and accepted.count(1) > len(accepted) / 3


@pytest.mark.parametrize("prefix_layer", [False, True])
def test_long_accepted_paths_between_plain_steps_keep_every_row_right(prefix_layer):
    """The oracle makes paths of up to five tokens accepted on tree steps; plain steps in between commit one token
    each. Every root the oracle sees is the base model's own next token (it asserts so), the prefix layer's state is
    that of the whole text, and the answers are the base model's greedy ones."""
    base = make_tiny_model("qwen2")
    heads = sequential_heads(base, num_heads=3, prefix_layer=True) if prefix_layer else None
    prompts = random_prompts(3, seed=23)
    limits = [9, 21, 14]
    engine = oracle_engine(base, default_tree(16, 3), num_heads=3, max_rows=2, max_length=96, heads=heads)
    engine.switch = switch = AlternatingSwitch()
    generations = [
        oracle_generation(engine, prompt, plain_greedy(base, prompt, limit + 5), limit, set())
        for prompt, limit in zip(prompts, limits)
    ]
    longest = 0
    for step, outputs in enumerate(engine.run(generations)):
        for generation, output in outputs:
            if switch.choices[step]:  # a plain step: the root alone, however right the oracle's guesses are
                assert output.accepted == 1
            longest = max(longest, output.accepted)
            if prefix_layer:
                text = torch.tensor([generation.prompt_ids.tolist() + generation.tokens])
                with torch.no_grad():
                    hidden = base(input_ids=text, output_hidden_states=True).hidden_states[-1]
                if not generation.finished:
                    expected = heads.prefix_states(hidden)[0, -1]
                    assert torch.allclose(engine.decoder.last_hidden[generation.row], expected, atol=1e-4)
    assert longest >= 3 and switch.choices.count(True) >= 4
    for generation, prompt, limit in zip(generations, prompts, limits):
        assert generation.tokens == plain_greedy(base, prompt, limit)


@pytest.mark.parametrize("overlap", [False, True])
def test_an_adaptive_engine_times_its_steps_for_the_switch(overlap):
    """On its own (real timings), the engine measures the tree first, then plain steps, at the bucket and kind the
    batch runs, and generates the same tokens. Overlapped, a prompt joins while a step is in flight and prefills
    inside that step's time: such steps are left out; stepped one at a time, none is."""
    base = make_tiny_model("llama")
    model = MedusaModel.from_pretrained(base, heads=sequential_heads(base), tree="16")
    prompts = random_prompts(4, seed=5)
    configs = [GenerationConfig(max_new_tokens=n, chat_template=False) for n in (40, 12, 30, 20)]
    expected = [r.token_ids for r in model.generate_batch(prompts, configs, max_batch=2)]
    options = EngineOptions(adaptive=True, overlap=overlap)
    results = model.generate_batch(prompts, configs, options=options, max_batch=2)
    assert [r.token_ids for r in results] == expected
    engine = model.engine(options)
    switch = engine.switch
    state = switch.states[(2, StepKind())]
    assert state.tree.samples >= switch.settings.warmup and state.plain.samples >= 1 and state.tree.seconds > 0
    measured = sum(s.tree.samples + s.plain.samples for s in switch.states.values())
    assert (measured < engine.times.steps) if overlap else (measured == engine.times.steps)
    assert engine.times.plain_steps == sum(s.plain_steps for s in switch.states.values()) >= 1


def test_an_engine_without_heads_or_not_adaptive_has_no_switch():
    base = make_tiny_model("llama")
    model = MedusaModel.from_pretrained(base, heads=sequential_heads(base), tree="16")
    assert model.engine(EngineOptions()).switch is None
    assert model.engine(EngineOptions(adaptive=True, use_heads=False)).switch is None
    assert model.engine(EngineOptions(adaptive=True, use_heads=False, lookup=4)).switch is not None


def test_an_adaptive_engine_captures_both_modes_of_every_step_up_front():
    model = MedusaModel.from_pretrained(make_tiny_model("llama"), tree="8")
    engine = model.engine(EngineOptions(adaptive=True), max_rows=2, max_length=64, keep=False)
    for _ in engine.run([model.prepare([5, 6, 7], GenerationConfig(max_new_tokens=2, chat_template=False))]):
        pass

    class Recorder:
        def __init__(self) -> None:
            self.keys = []

        def prepare(self, rows, span, kind, plain=False) -> None:
            self.keys.append((rows, span, kind, plain))

        def prepare_prefill(self, prompts, width, kind) -> None:
            pass

    engine.graphs = recorder = Recorder()
    assert engine.capture([StepKind()])
    span = engine.spans[0]
    assert recorder.keys[:4] == [(1, span, StepKind(), False), (1, span, StepKind(), True)] + [
        (2, span, StepKind(), False),
        (2, span, StepKind(), True),
    ]
    assert len(recorder.keys) == 2 * 2 * len(engine.spans)


def test_the_server_counts_its_plain_steps():
    metrics = Metrics()
    metrics.record_plain_step()
    metrics.record_plain_step()
    assert "medusa_plain_steps_total 2" in metrics.render(waiting=0, running=0).splitlines()
