"""Batched greedy generation is lossless: every sequence's tokens are its own single-sequence greedy
answer, which is transformers' ``generate(do_sample=False)``.

Random heads rarely guess right, so rows would mostly accept the same (one) token per step and the
holes between rows would never appear. The batch oracle proposes each row's true continuation at
random ranks: rows accept different numbers of tokens per step, on paths other than the first, so
the per-row compaction, the holes, the re-layouts and the per-row positions are all exercised.
"""

from __future__ import annotations

import json
import random
import runpy
import sys
from pathlib import Path

import pytest
import torch

from helpers.decoding import CUSTOM_TREE, architecture_of, plain_greedy, random_prompts, reference
from helpers.models import ARCHITECTURES, EOS_ID, TINY_VOCAB, make_tiny_model
from helpers.text_model import make_tokenizer
from medusa.acceptance import GreedyAcceptance, RejectionAcceptance
from medusa.batching import BatchDecoder, BatchRunner, BatchSequence, greedy_batch
from medusa.errors import MedusaError
from medusa.heads import MedusaHeads, MedusaHeadsConfig
from medusa.model import GenerationConfig, MedusaModel, is_prompt_batch
from medusa.sampling import SamplingParams
from medusa.tree import Tree, default_tree

NEW_TOKENS = 16
# Mixed lengths, a one-token prompt among them; references are shared with test_decoding's cache.
BATCH = random_prompts(4, seed=31) + [[17]]


def references(architecture: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    return [list(reference(architecture, tuple(prompt), max_new_tokens)) for prompt in prompts]


# ----- through MedusaModel ------------------------------------------------------------------------


@pytest.mark.parametrize("tree", ["8", "64", CUSTOM_TREE], ids=["8", "64", "custom"])
def test_batch_equals_each_sequence_alone(tiny_model, tree):
    architecture = architecture_of(tiny_model)
    model = MedusaModel.from_pretrained(tiny_model, tree=tree)
    expected = references(architecture, BATCH, NEW_TOKENS)
    assert len({len(p) for p in BATCH}) > 2
    results = model.generate(BATCH, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in results] == expected
    for result in results:
        assert result.finish_reason == ("stop" if EOS_ID in result.token_ids else "length")
        assert result.stats.new_tokens == len(result.token_ids)
        assert sum(result.stats.accepted_per_step) >= len(result.token_ids)
    if tree == "64":  # and the single-sequence path agrees, with the same number of steps
        for prompt, result in zip(BATCH, results):
            alone = model.generate(prompt, max_new_tokens=NEW_TOKENS)
            assert alone.token_ids == result.token_ids and alone.stats.steps == result.stats.steps


def test_plain_decoding_in_a_batch(tiny_model):
    architecture = architecture_of(tiny_model)
    model = MedusaModel.from_pretrained(tiny_model, tree="16")
    results = model.generate_batch(BATCH, GenerationConfig(max_new_tokens=NEW_TOKENS, use_heads=False))
    assert [r.token_ids for r in results] == references(architecture, BATCH, NEW_TOKENS)
    assert all(r.stats.steps == len(r.token_ids) for r in results)


def test_each_sequence_stops_at_its_own_eos():
    """The EOS token is one that appears at different places in the rows' answers, or not at all."""
    base = make_tiny_model("llama")
    model = MedusaModel.from_pretrained(base, tree="64")
    unbounded = references("llama", BATCH, NEW_TOKENS)
    stop_token = unbounded[0][5]
    base.generation_config.eos_token_id = stop_token
    results = model.generate(BATCH, max_new_tokens=NEW_TOKENS)
    for prompt, answer, result in zip(BATCH, unbounded, results):
        assert result.token_ids == plain_greedy(base, prompt, NEW_TOKENS)
        if stop_token in answer:
            assert result.token_ids == answer[: answer.index(stop_token) + 1] and result.finish_reason == "stop"
        else:
            assert result.token_ids == answer and result.finish_reason == "length"
    assert sum(r.finish_reason == "stop" for r in results) >= 1


@pytest.mark.parametrize("architecture", ["mistral", "qwen2"])
def test_batch_with_a_short_sliding_window(architecture):
    config_class, model_class, _ = ARCHITECTURES[architecture]
    base = make_tiny_model(architecture)
    window = {"sliding_window": 6}
    if architecture == "qwen2":  # one sliding and one full layer: the masks go in as a dict
        window.update(use_sliding_window=True, max_window_layers=1)
    settings = {k: v for k, v in base.config.to_dict().items() if k != "layer_types"}
    torch.manual_seed(0)
    windowed = model_class(config_class(**{**settings, **window})).eval()
    prompts = [random_prompts(1, seed=2)[0] + [10] * 10, BATCH[1], [12, 13]]  # the first as in test_decoding
    expected = [plain_greedy(windowed, p, NEW_TOKENS) for p in prompts]
    assert expected[0] != plain_greedy(base, prompts[0], NEW_TOKENS)  # the window matters
    model = MedusaModel.from_pretrained(windowed, tree="64")
    assert [r.token_ids for r in model.generate(prompts, max_new_tokens=NEW_TOKENS)] == expected
    oracle = oracle_batch(windowed, default_tree(64), prompts, [NEW_TOKENS] * 3, eos=set())
    assert [s.tokens for s in oracle.sequences_done] == expected


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
    with pytest.raises(MedusaError, match="batched generation is greedy only"):
        model.generate(["a", "b"], max_new_tokens=4, temperature=0.7)
    with pytest.raises(MedusaError, match="takes a list of prompts"):
        model.generate_batch("hello", max_new_tokens=4)
    with pytest.raises(MedusaError, match="greedy decoding only"):
        BatchDecoder(model.base_model, model.heads, model.tree, RejectionAcceptance(SamplingParams(temperature=1.0)))
    with pytest.raises(MedusaError, match="the prompt is empty"):  # an empty list is one empty prompt
        model.generate([], max_new_tokens=4)


def test_what_counts_as_a_batch():
    assert is_prompt_batch(["a", "b"]) and is_prompt_batch([[1, 2], [3]]) and is_prompt_batch([torch.tensor([1])])
    assert is_prompt_batch([[{"role": "user", "content": "hi"}]])  # one message list in a batch
    assert not is_prompt_batch([1, 2, 3]) and not is_prompt_batch("abc") and not is_prompt_batch([])
    assert not is_prompt_batch([{"role": "user", "content": "hi"}])  # a message list is one prompt


# ----- the batch oracle: rows accept different, long paths ----------------------------------------


class OracleBatchDecoder(BatchDecoder):
    """Every row's proposals hold its true greedy continuation at the ranks of a random deep path."""

    def __init__(self, *args, truths: dict[tuple[int, ...], list[int]], seed: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.truths = truths  # prompt -> prompt + greedy continuation
        self.row_truths: list[list[int]] = []
        self.rng = random.Random(seed)
        self.deep_paths = [path for path in self.tree.paths if len(path) >= 2]
        self.relayouts = 0
        self.accepted_rows: list[list[int]] = []

    def admit(self, prompts, reserve):
        super().admit(prompts, reserve)
        self.row_truths += [self.truths[tuple(p.tolist())] for p in prompts]

    def remove(self, rows):
        gone = set(rows)
        self.row_truths = [t for row, t in enumerate(self.row_truths) if row not in gone]
        super().remove(rows)

    def _relayout(self, keep, capacity):
        self.relayouts += 1
        super()._relayout(keep, capacity)

    def propose(self) -> torch.Tensor:
        num_heads, topk = self.heads.config.num_heads, self.tree.topk
        rows = []
        for length, root, truth in zip(self.length.tolist(), self.root_token.tolist(), self.row_truths):
            assert root == truth[length], f"a row diverged at position {length}"
            target = self.rng.choice(self.deep_paths)
            reach = self.rng.choice([0, 1, 2, 4, 4, 4])  # how many heads get it right: rows differ
            top = torch.empty(num_heads, topk, dtype=torch.long)
            for head in range(num_heads):
                position = length + 1 + head
                true = truth[position] if position < len(truth) else -1
                for rank in range(topk):
                    top[head, rank] = (true + self.rng.randrange(1, TINY_VOCAB)) % TINY_VOCAB
                if true >= 0 and head < reach:
                    top[head, target[head] if head < len(target) else self.rng.randrange(topk)] = true
            rows.append(torch.cat([torch.tensor([root]), top.flatten()]))
        return torch.stack(rows)[:, self.tree.candidate_index]

    def step(self) -> torch.Tensor:
        out = super().step()
        self.accepted_rows.append(out[:, 0].tolist())
        return out


class OracleRun(BatchRunner):
    def __init__(self, decoder: BatchDecoder) -> None:
        super().__init__(decoder)
        self.sequences_done: list[BatchSequence] = []


def oracle_batch(
    base,
    tree: Tree,
    prompts: list[list[int]],
    max_new_tokens: list[int],
    eos: set[int],
    seed: int = 0,
    join_after: int | None = None,
    num_heads: int = 4,
) -> OracleRun:
    """Decode ``prompts`` with the oracle; with ``join_after`` the second half joins after that many steps.

    The rows stop at the tiny models' EOS as well as at ``eos``, as the references (and truths) do.
    """
    eos = set(eos) | {EOS_ID}
    truths = {
        tuple(p): p + plain_greedy(base, p, n + num_heads + 2) for p, n in zip(prompts, max_new_tokens)
    }
    heads = MedusaHeads(
        MedusaHeadsConfig(hidden_size=base.config.hidden_size, vocab_size=TINY_VOCAB, num_heads=num_heads),
        base_lm_head=base.get_output_embeddings(),
    )
    decoder = OracleBatchDecoder(base, heads, tree, GreedyAcceptance(), truths=truths, seed=seed)
    runner = OracleRun(decoder)
    sequences = [BatchSequence(torch.tensor(p), n, frozenset(eos)) for p, n in zip(prompts, max_new_tokens)]
    runner.sequences_done = sequences
    first = sequences if join_after is None else sequences[: len(sequences) // 2]
    runner.add(first)
    steps = 0
    while runner.active:
        runner.step()
        steps += 1
        if steps == join_after:
            runner.add(sequences[len(first) :])
    return runner


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_oracle_batch_long_paths_mixed_limits_and_eos(architecture):
    base = make_tiny_model(architecture)
    prompts = random_prompts(4, seed=41) + [[9]]
    limits = [20, 7, 13, 20, 11]  # several end mid-path
    unbounded = [plain_greedy(base, p, 20) for p in prompts]
    stop_token = next(t for t in unbounded[3][9:] if t != EOS_ID)  # row 3 (maybe others) stops at it
    run = oracle_batch(base, default_tree(64), prompts, limits, eos={stop_token}, seed=1)
    decoder = run.decoder
    for answer, limit, sequence in zip(unbounded, limits, run.sequences_done):
        expected = answer[:limit]
        stops = [i for i, t in enumerate(expected) if t in (stop_token, EOS_ID)]
        if stops:
            expected = expected[: stops[0] + 1]
        assert sequence.tokens == expected
        assert sequence.stats.finish_reason == ("stop" if stops else "length")
    assert run.sequences_done[3].stats.finish_reason == "stop"
    accepted = [count for row in decoder.accepted_rows for count in row]
    assert sum(accepted) / len(accepted) > 2 and max(accepted) >= 4
    assert sum(len(set(row)) > 1 for row in decoder.accepted_rows) >= 3  # rows advanced unequally: holes
    assert decoder.relayouts >= 2  # sequences left the batch at their own steps
    assert decoder.batch_size == 0 and decoder.cache is None


def test_oracle_batch_rows_join_a_running_batch():
    base = make_tiny_model("phi3")
    prompts = random_prompts(6, seed=43)
    limits = [18, 12, 16, 9, 18, 14]
    run = oracle_batch(base, default_tree(32), prompts, limits, eos=set(), join_after=3)
    for prompt, limit, sequence in zip(prompts, limits, run.sequences_done):
        assert sequence.tokens == plain_greedy(base, prompt, limit)
    assert len(run.decoder.accepted_rows[2]) == 3 and len(run.decoder.accepted_rows[3]) > 3  # they joined


def test_oracle_batch_grows_and_compacts_the_cache():
    """A tiny reserve: the slots run out again and again and the rows are compacted (and the cache grown)."""
    base = make_tiny_model("gemma")
    prompts = random_prompts(3, seed=45)
    truths = {tuple(p): p + plain_greedy(base, p, 40) for p in prompts}
    heads = MedusaHeads(MedusaHeadsConfig(hidden_size=base.config.hidden_size, vocab_size=TINY_VOCAB),
                        base_lm_head=base.get_output_embeddings())
    decoder = OracleBatchDecoder(base, heads, default_tree(16), GreedyAcceptance(), truths=truths, seed=3)
    runner = BatchRunner(decoder)
    sequences = [BatchSequence(torch.tensor(p), 30) for p in prompts]
    runner.add(sequences)
    with torch.inference_mode():  # leave no spare slots at all
        decoder._relayout([0, 1, 2], max(decoder.lengths) + decoder.tree.size)
    capacities = {decoder.capacity}
    while runner.active:
        with torch.inference_mode():
            decoder.make_room(reserve=2)
        capacities.add(decoder.capacity)
        runner.step()
    for prompt, sequence in zip(prompts, sequences):
        assert sequence.tokens == truths[tuple(prompt)][len(prompt) : len(prompt) + 30]
    assert decoder.relayouts >= 4 and len(capacities) >= 3


def test_committed_slots_hold_the_plain_sequences_cache():
    """After steps with holes, each row's valid slots, in order, are the K/V of its plain sequence."""
    base = make_tiny_model("llama")
    prompts = random_prompts(3, seed=47)
    truths = {tuple(p): p + plain_greedy(base, p, 40) for p in prompts}
    heads = MedusaHeads(MedusaHeadsConfig(hidden_size=base.config.hidden_size, vocab_size=TINY_VOCAB),
                        base_lm_head=base.get_output_embeddings())
    decoder = OracleBatchDecoder(base, heads, default_tree(64), GreedyAcceptance(), truths=truths, seed=5)
    runner = BatchRunner(decoder)
    runner.add([BatchSequence(torch.tensor(p), 30) for p in prompts])
    for _ in range(6):
        runner.step()
    assert sum(len(set(row)) > 1 for row in decoder.accepted_rows) >= 2
    for row, prompt in enumerate(prompts):
        length = decoder.lengths[row]
        assert int(decoder.valid[row].sum()) == length == int(decoder.length[row])
        slots = decoder.valid[row].nonzero()[:, 0]
        assert decoder.slot_positions[row, slots].tolist() == list(range(length))
        with torch.no_grad():
            fresh = base(torch.tensor([truths[tuple(prompt)][:length]]), use_cache=True).past_key_values
        for layer, fresh_layer in zip(decoder.cache.layers, fresh.layers):
            torch.testing.assert_close(layer.keys[row, :, slots], fresh_layer.keys[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(layer.values[row, :, slots], fresh_layer.values[0], rtol=1e-4, atol=1e-5)


def test_greedy_batch_agrees_with_the_single_rule():
    tree = default_tree(32)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 8, (6, tree.size), generator=generator)
    logits = torch.randn(6, tree.size, 8, generator=generator)
    path, accepted, next_token = greedy_batch(tree, tokens, logits)
    for row in range(6):
        verdict = GreedyAcceptance().accept(tree, tokens[row], logits[row])
        assert int(accepted[row]) == int(verdict.accepted) and int(next_token[row]) == int(verdict.next_token)
        count = int(verdict.accepted) + 1
        assert tokens[row][path[row][:count]].tolist() == tokens[row][verdict.path[:count]].tolist()
    assert accepted.max() > 0  # with 8 tokens some guesses match


def test_throughput_script_runs_on_a_tiny_model(tmp_path, monkeypatch):
    out = tmp_path / "report.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "batch_throughput.py"
    argv = [str(script), "--tiny", "--max-new-tokens", "6", "--batch-sizes", "1,3", "--prompts", "3", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    report = json.loads(out.read_text())
    assert [row["batch_size"] for row in report["rows"]] == [1, 3]
    for row in report["rows"]:
        assert row["identical_answers"] == 3  # greedy either way: the same answers
        assert row["medusa"]["new_tokens"] == row["autoregressive"]["new_tokens"] > 0
        assert row["autoregressive"]["mean_accepted_per_sequence_step"] == 1
    assert report["meta"]["cuda_graphs"] is False
    assert out.with_suffix(".png").stat().st_size > 0
