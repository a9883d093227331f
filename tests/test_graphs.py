"""CUDA graphs of the decoding step (GPU only: skipped on the CPU, run on the lent GPU machine).

Every acceptance scheme must capture (a failed capture falls back to eager with a warning, silently slow),
and a replayed step must decode what the eager step decodes: greedy token for token, sampling the same
tokens from a seed. Batches capture one graph per (bucket, span, kind); rows join and leave without one.
Prefills of short prompts replay graphs per (group size, width, kind) once the cache exists.
"""

from __future__ import annotations

import logging

import pytest
import torch

from helpers.decoding import run_in_engine
from helpers.models import make_tiny_model
from medusa.decoding import PREFILL_WIDTHS
from medusa.engine import EngineOptions
from medusa.errors import MedusaError
from medusa.model import GenerationConfig, MedusaModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

PROMPT = [5, 17, 42, 9, 100, 7]


@pytest.fixture(scope="module")
def model() -> MedusaModel:
    return MedusaModel.from_pretrained(make_tiny_model("llama", seed=2), device="cuda", dtype="float32", tree="16")


def generate(model: MedusaModel, **settings) -> list[int]:
    return model.generate(PROMPT, max_new_tokens=48, chat_template=False, **settings).token_ids


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(temperature=0.8, acceptance="rejection", seed=1),
        dict(temperature=0.8, acceptance="typical", seed=1),
        dict(temperature=0.8, top_k=20, top_p=0.9, acceptance="rejection", seed=1),
        dict(lookup=6),
        dict(lookup=6, temperature=0.8, acceptance="rejection", seed=1),
        dict(lookup=6, use_heads=False),
    ],
    ids=["greedy", "rejection", "typical", "rejection-top-k-top-p", "lookup", "lookup-rejection", "lookup-alone"],
)
def test_every_scheme_captures_and_replays_reproducibly(model, settings, caplog):
    with caplog.at_level(logging.WARNING, logger="medusa"):
        first = generate(model, **settings)
        again = generate(model, **settings)
    assert "capture failed" not in caplog.text
    assert not any(engine.graphs_refused for engine in model._engines.values())
    assert first == again
    assert first == generate(model, cuda_graphs=False, **settings)  # seeded sampling too: the noise is the seed's


def test_greedy_replay_equals_eager_steps(model):
    assert generate(model) == generate(model, cuda_graphs=False)
    assert generate(model, lookup=6) == generate(model, lookup=6, cuda_graphs=False) == generate(model)


def test_sampling_under_graphs_depends_on_the_seed(model):
    answers = {tuple(generate(model, temperature=1.0, acceptance="rejection", seed=seed)) for seed in range(4)}
    assert len(answers) == 4


def test_each_attention_span_is_captured_and_decodes_as_eagerly(model):
    """At least 600 slots: the pool's 768-slot bucket plus 64, so spans of 256, 512, 768 and 832 slots, one graph
    each; a long answer crosses them."""
    settings = dict(max_new_tokens=300, chat_template=False, cache_length=600)
    graphed = model.generate(PROMPT, **settings)
    engine = model.engine(EngineOptions(cache_length=600), max_length=len(PROMPT) + 300)
    assert engine.spans == (256, 512, 768, 768 + model.tree.size)
    assert {span for _, span, *_ in engine.graphs.graphs} >= {256, 512}
    assert graphed.token_ids == model.generate(PROMPT, cuda_graphs=False, **settings).token_ids
    assert len(PROMPT) + graphed.stats.new_tokens > 256 or graphed.finish_reason == "stop"


def test_batches_replay_one_graph_per_bucket_as_rows_join_and_leave(model):
    prompts = [PROMPT, PROMPT[:3], [9, 8, 7, 6, 5, 4, 3, 2], [11], [12, 13]]
    configs = [GenerationConfig(max_new_tokens=n, chat_template=False) for n in (40, 7, 25, 33, 12)]
    configs[2] = GenerationConfig(max_new_tokens=25, chat_template=False, temperature=0.8, seed=3)
    graphed = model.generate_batch(prompts, configs)
    eager = model.generate_batch(prompts, configs, cuda_graphs=False)
    assert [r.token_ids for r in graphed] == [r.token_ids for r in eager]
    assert graphed[0].token_ids == generate(model)[:40]
    engine = model.engine(EngineOptions(), max_rows=8, max_length=64)
    report = engine.capture_report()
    assert report.graphs >= 2 and report.seconds > 0


def test_compiled_greedy_steps_decode_as_eager_steps(model, caplog):
    """torch.compile fuses the step's kernels before capture; what it decodes must not change."""
    with caplog.at_level(logging.WARNING, logger="medusa"):
        compiled = generate(model, compile=True, lookup=6)
    assert "capture failed" not in caplog.text
    assert compiled == generate(model, lookup=6, cuda_graphs=False)


@pytest.mark.parametrize("prefix_layer", [False, True], ids=["sequential", "sequential-prefix"])
@pytest.mark.parametrize("settings", [dict(), dict(lookup=6, temperature=0.8, acceptance="rejection", seed=1)])
def test_sequential_heads_grow_their_tree_inside_the_captured_step(settings, prefix_layer, caplog):
    """The depth-by-depth proposal of sequential heads (and Hydra++'s prefix layer, run over each accepted path)
    replays as a graph and decodes what the eager step does, at batch 1 and in a batch of rows joining together."""
    from medusa.heads import MedusaHeads, MedusaHeadsConfig

    base = make_tiny_model("llama", seed=3)
    config = MedusaHeadsConfig(
        hidden_size=base.config.hidden_size,
        vocab_size=base.config.vocab_size,
        head_type="sequential",
        prefix_layer=prefix_layer,
    )
    heads = MedusaHeads(config, base_lm_head=base.get_output_embeddings())
    model = MedusaModel.from_pretrained(base, heads=heads, device="cuda", dtype="float32", tree="16")
    with torch.no_grad():  # a fresh head's first layer ignores the path, a fresh prefix layer is the identity
        for parameter in model.heads.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    with caplog.at_level(logging.WARNING, logger="medusa"):
        graphed = generate(model, **settings)
        prompts = [PROMPT, PROMPT[:3], [9, 8, 7, 6, 5, 4, 3]]
        batch = [r.token_ids for r in model.generate_batch(prompts, max_new_tokens=24, chat_template=False, **settings)]
    assert "capture failed" not in caplog.text
    assert not any(engine.graphs_refused for engine in model._engines.values())
    assert graphed == generate(model, cuda_graphs=False, **settings)
    eager = model.generate_batch(prompts, max_new_tokens=24, chat_template=False, cuda_graphs=False, **settings)
    assert batch == [r.token_ids for r in eager]


def test_graphs_captured_up_front_serve_every_batch_without_another_capture(model):
    """What a server captures before it takes requests (every bucket, every span, greedy and sampled) is all a
    batch of mixed rows joining and leaving needs; its answers are the eager ones."""
    from medusa.acceptance import StepKind

    engine = model.engine(EngineOptions(), max_rows=4, max_length=128, keep=False)
    with pytest.raises(MedusaError, match="after the engine's first generation"):
        engine.capture([StepKind()])
    for _ in engine.run([model.prepare(PROMPT, GenerationConfig(max_new_tokens=2, chat_template=False))]):
        pass
    assert engine.capture([StepKind(), StepKind(sample=True)])
    report = engine.capture_report()
    widths = [width for width in PREFILL_WIDTHS if width <= engine.decoder.max_length]
    # Prefills: kinds x group sizes 1, 2, 4 x widths; steps: kinds x buckets 1, 2, 4 x spans.
    assert report.graphs == 2 * 3 * len(widths) + 2 * 3 * len(engine.spans)
    assert not engine.decoder.active.any()  # the rows the prefill captures loaded are free again
    prompts = [PROMPT, PROMPT[:3], [9, 8, 7, 6, 5, 4, 3, 2], [11]]
    configs = [GenerationConfig(max_new_tokens=n, chat_template=False) for n in (40, 7, 25, 33)]
    configs[2] = GenerationConfig(max_new_tokens=25, chat_template=False, temperature=0.8, seed=3)
    generations = [model.prepare(p, c) for p, c in zip(prompts, configs)]
    for _ in engine.run(generations):
        pass
    assert engine.capture_report().graphs == report.graphs
    eager = model.generate_batch(prompts, configs, cuda_graphs=False)
    assert [g.tokens for g in generations] == [r.token_ids for r in eager]


def test_captured_prefills_decode_as_eager_prefills(caplog):
    """Once the cache exists, joining groups of prompts replay captured prefills (in pieces of 8, 2 and 1, one filled
    with copies of a seeded sampled prompt, padded to fixed widths, up to 2048 tokens in packed views of the kept
    prefill cache); a prompt longer than the widest prefills eagerly. Greedy, seeded sampled and log-probability
    rows decode what they decode without graphs."""
    prompts = [PROMPT, PROMPT[:3], [9, 8, 7, 6, 5, 4, 3, 2], [11], list(range(3, 40)), [4] * 70, PROMPT[::-1]]
    prompts.append([(5 * i) % 200 + 3 for i in range(600)])  # captured at 1024
    prompts.append([(7 * i) % 200 + 3 for i in range(PREFILL_WIDTHS[-1] + 5)])  # eager: wider than any graph
    configs = [GenerationConfig(max_new_tokens=12, chat_template=False) for _ in prompts]
    configs[2] = GenerationConfig(max_new_tokens=12, chat_template=False, temperature=0.8, top_p=0.9, seed=3)
    configs[4] = GenerationConfig(max_new_tokens=12, chat_template=False, logprobs=3)
    base = make_tiny_model("llama", seed=2)
    base.config.max_position_embeddings = 4096  # room for a prompt wider than the widest captured prefill
    model = MedusaModel.from_pretrained(base, device="cuda", dtype="float32", tree="16")
    eager = model.generate_batch(prompts, configs, cuda_graphs=False)
    engine = model.engine(EngineOptions(), max_rows=8, max_length=2176, keep=False)
    for _ in engine.run([model.prepare(PROMPT, GenerationConfig(max_new_tokens=2, chat_template=False))]):
        pass  # the first prefill (eager) makes the cache
    assert engine.captures_prefills and not engine.graphs.prefills
    with caplog.at_level(logging.WARNING, logger="medusa"):
        for max_rows in (8, 2):  # one group of 8, then rows joining running ones
            generations = run_in_engine(engine, model, prompts, configs, max_rows)
            assert [g.tokens for g in generations] == [r.token_ids for r in eager]
            assert generations[4].token_logprobs == pytest.approx(eager[4].logprobs, abs=1e-4)
    assert "capture failed" not in caplog.text
    sizes = {size for size, _, _ in engine.graphs.prefills}
    assert sizes <= {1, 2, 4, 8} and 8 in sizes and 1 in sizes
    assert (1, 1024) in {(size, width) for size, width, _ in engine.graphs.prefills}


def test_overlapped_steps_with_rows_joining_through_captured_prefills_decode_as_without(model):
    """Steps launched ahead of the bookkeeping, with rows joining through captured prefills between a step's
    launch and the reading of its tokens (the first GPU run decoded garbage there: a prefill's scratch memory in the
    shared graph pool held a step's outputs). Greedy and seeded sampled rows decode as without the overlap."""
    from helpers.decoding import random_prompts

    prompts = random_prompts(9, seed=23)
    configs = [
        GenerationConfig(
            max_new_tokens=6 + 5 * (i % 4),
            chat_template=False,
            **({"temperature": 0.9, "seed": i} if i % 3 == 0 else {}),
        )
        for i in range(len(prompts))
    ]
    runs = {}
    for overlap in (False, True):
        options = EngineOptions(overlap=overlap)
        results = model.generate_batch(prompts, configs, options=options, max_batch=3)
        runs[overlap] = [r.token_ids for r in results]
        engine = model.engine(options)
        assert engine.overlaps is overlap and engine.captures_prefills
    assert runs[True] == runs[False]


@pytest.mark.parametrize("head_type", ["sequential", "medusa"])
@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.3, acceptance="rejection", seed=1),
        dict(temperature=0.8, acceptance="typical", seed=1),
        dict(lookup=6, temperature=0.3, acceptance="rejection", seed=1),
        dict(),
    ],
    ids=["rejection", "typical", "lookup-rejection", "greedy"],
)
def test_replayed_steps_accept_what_eager_steps_accept(head_type, settings):
    """Step by step, not only the same tokens: a lossless step that proposes badly (stale heads' inputs, say)
    still writes the right answer, only in more steps, so equal tokens cannot show it.

    The base's lm_head is scaled up so that it falls into a loop that fresh heads guess (on the CPU: 2.7-3.3 tokens
    per step greedy and typical, 1.1-1.2 rejection); the sequential heads' path layers are perturbed so the path
    matters."""
    from medusa.heads import MedusaHeads, MedusaHeadsConfig

    torch.manual_seed(0)
    base = make_tiny_model("llama", seed=3)
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(8)
    config = MedusaHeadsConfig(
        hidden_size=base.config.hidden_size, vocab_size=base.config.vocab_size, head_type=head_type
    )
    heads = MedusaHeads(config, base_lm_head=base.get_output_embeddings())
    model = MedusaModel.from_pretrained(base, heads=heads, device="cuda", dtype="float32", tree="16")
    with torch.no_grad():
        for name, parameter in model.heads.named_parameters():
            if name.startswith("path_inputs"):
                parameter.add_(0.03 * torch.randn_like(parameter))
    runs = {}
    for graphs in (True, False):
        runs[graphs] = []
        for _ in range(2):  # as sampling_quality.py does: plain decoding (another engine, its graphs) in between
            model.generate(PROMPT, max_new_tokens=32, chat_template=False, cuda_graphs=graphs, use_heads=False)
            result = model.generate(PROMPT, max_new_tokens=64, chat_template=False, cuda_graphs=graphs, **settings)
            runs[graphs].append((result.token_ids, result.stats.accepted_per_step))
    assert runs[True] == runs[False]
    assert max(runs[True][0][1]) > 1  # some guess was accepted, so the comparison says something


def test_plain_and_tree_steps_interleaved_replay_as_eager_steps(model):
    """The adaptive engine's two modes are two graphs per (bucket, span, kind): every other step replaying the
    one-token graph, greedy and seeded sampled rows joining and leaving decode as eager steps in either mode, and as
    an engine that always verifies its tree."""
    from helpers.decoding import AlternatingSwitch, random_prompts

    prompts = random_prompts(6, seed=29)
    configs = [
        GenerationConfig(
            max_new_tokens=8 + 4 * (i % 3), chat_template=False, **({"temperature": 0.8, "seed": i} if i % 2 else {})
        )
        for i in range(len(prompts))
    ]
    expected = [r.token_ids for r in model.generate_batch(prompts, configs, max_batch=4, lookup=6)]
    for graphs in (True, False):
        options = EngineOptions(adaptive=True, lookup=6, cuda_graphs=graphs)
        engine = model.engine(options, max_rows=4, max_length=128)
        engine.switch = AlternatingSwitch()
        results = model.generate_batch(prompts, configs, options=options, max_batch=4)
        assert [r.token_ids for r in results] == expected
        assert engine.times.plain_steps > 0
        if graphs:
            assert {key[3] for key in engine.graphs.graphs} == {False, True}


def test_the_fused_sampling_noise_is_the_eager_noise_bit_for_bit():
    """On CUDA a sampled step draws its Gumbel noise inside one compiled kernel (``sampling.perturbed_argmax``); a
    seeded row's answer must not depend on it: the compiled noise equals the eager noise bit for bit, and so do the
    samples, for a batch bucket with a deep tree, a plain step and a single row."""
    from medusa.sampling import _perturbed_argmax, _token_keys, perturbed_argmax, position_gumbel

    device = torch.device("cuda")
    seeds = torch.tensor([0, 7, 2**62 + 5, 123456789] * 8, device=device)
    positions = 100 + torch.arange(17, device=device).expand(32, -1)
    compiled_noise = torch.compile(position_gumbel, dynamic=True, fullgraph=True)
    assert torch.equal(compiled_noise(seeds, positions, 49152), position_gumbel(seeds, positions, 49152))
    for rows, nodes, depth in ((32, 33, 16), (32, 1, 0), (1, 17, 4)):
        logits = torch.randn(rows, nodes, 49152, device=device, dtype=torch.bfloat16).float() / 0.7
        depths = torch.randint(0, depth + 1, (nodes,), device=device)
        sampled = torch.arange(rows, device=device) % 2 == 1
        arguments = (logits, sampled, seeds[:rows], positions[:rows, : depth + 1], depths)
        assert torch.equal(perturbed_argmax(*arguments), _perturbed_argmax(*arguments, _token_keys(49152, device)))
    assert perturbed_argmax.compiled is not None and not perturbed_argmax.refused
