"""Sampling parameters: the same processing as transformers' warpers, a sampler that follows its
distribution, and clear refusals of invalid settings (in the API and the CLI)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from medusa.commands import generate
from medusa.commands.common import sampling_options
from medusa.errors import MedusaError
from medusa.model import GenerationConfig
from medusa.sampling import SamplingParams, position_gumbel


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.3, 5, 1.0), (0.8, 0, 0.7), (0.7, 20, 0.9), (2.0, 1, 0.5)],
)
def test_processing_matches_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.zeros(6, 1, dtype=torch.long)
    expected = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(ids, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(ids, expected)
    processed = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p).process(logits)
    assert torch.equal(torch.isinf(processed), torch.isinf(expected))
    kept = ~torch.isinf(expected)
    assert torch.allclose(processed[kept], expected[kept], atol=1e-5)


def test_filters_keep_the_right_tokens():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0]).log_softmax(-1)
    probs = SamplingParams(temperature=1.0, top_k=2).probabilities(logits)
    assert (probs > 0).tolist() == [False, True, False, True]
    # Probabilities (0.032, 0.644, 0.087, 0.237): top-p 0.7 needs the two likeliest, top-p 0.5 only the first.
    assert (SamplingParams(temperature=1.0, top_p=0.7).probabilities(logits) > 0).tolist() == [False, True, False, True]
    assert (SamplingParams(temperature=1.0, top_p=0.5).probabilities(logits) > 0).tolist() == [
        False,
        True,
        False,
        False,
    ]
    assert torch.allclose(SamplingParams(temperature=1.0).probabilities(logits).sum(), torch.tensor(1.0))


def sample(probs: torch.Tensor, seeds: torch.Tensor, position: int = 7) -> torch.Tensor:
    """One token per row of ``probs [rows, vocab]`` as decoding draws it: the argmax of log p plus the Gumbel noise
    of each row's seed at ``position``."""
    noise = position_gumbel(seeds, torch.full((seeds.numel(), 1), position), probs.shape[-1])[:, 0]
    return (probs.log() + noise).argmax(dim=-1)


def test_sample_follows_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0])
    draws = sample(probs.expand(200_000, -1), torch.arange(200_000))
    frequencies = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert frequencies[4] == 0
    assert torch.allclose(frequencies, probs.double(), atol=0.005)


def test_sample_is_reproducible_from_the_seed():
    probs = torch.rand(8, 100, generator=torch.Generator().manual_seed(1))
    first = sample(probs, torch.full((8,), 3))
    assert torch.equal(first, sample(probs, torch.full((8,), 3)))
    assert not torch.equal(first, sample(probs, torch.full((8,), 4)))


def test_greedy_has_no_distribution():
    assert SamplingParams().greedy
    with pytest.raises(ValueError):
        SamplingParams().process(torch.zeros(3))


INVALID = {
    "negative temperature": (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    "infinite temperature": (dict(temperature=math.inf), "temperature must be a finite number >= 0"),
    "top_p 0": (dict(temperature=1.0, top_p=0.0), "top_p must lie in (0, 1]"),
    "top_p above 1": (dict(temperature=1.0, top_p=1.5), "top_p must lie in (0, 1]"),
    "negative top_k": (dict(temperature=1.0, top_k=-1), "top_k must be an integer >= 0"),
    "fractional top_k": (dict(temperature=1.0, top_k=2.5), "top_k must be an integer >= 0"),
    "eps 0": (dict(temperature=1.0, acceptance="typical", typical_eps=0.0), "eps must lie in (0, 1)"),
    "eps 1": (dict(temperature=1.0, acceptance="typical", typical_eps=1.0), "eps must lie in (0, 1)"),
    "negative delta": (
        dict(temperature=1.0, acceptance="typical", typical_delta=-0.1),
        "delta must be a finite number >= 0",
    ),
    "unknown scheme": (dict(acceptance="medusa2"), "unknown acceptance scheme 'medusa2'; choose one of auto, greedy"),
    "greedy with a temperature": (
        dict(temperature=0.7, acceptance="greedy"),
        "acceptance 'greedy' needs temperature 0",
    ),
    "negative seed": (dict(seed=-1), "seed must be an integer in [0, 2**63)"),
}


@pytest.mark.parametrize("settings, message", list(INVALID.values()), ids=list(INVALID))
def test_invalid_settings_are_refused(settings, message):
    with pytest.raises(MedusaError) as error:
        GenerationConfig(**settings)
    assert message in str(error.value)


def test_valid_settings_choose_their_scheme():
    assert GenerationConfig().acceptance_scheme().name == "greedy"
    assert GenerationConfig(temperature=0.7).acceptance_scheme().name == "rejection"
    assert (
        GenerationConfig(temperature=0.7, acceptance="typical", typical_eps=0.2, typical_delta=0.0)
        .acceptance_scheme()
        .name
        == "typical"
    )
    assert GenerationConfig(temperature=0.0, acceptance="typical").acceptance_scheme().name == "greedy"
    # Equal settings give equal, hashable schemes whatever the seed: decoders are pooled by them.
    assert (
        GenerationConfig(temperature=0.7, seed=1).acceptance_scheme()
        == GenerationConfig(temperature=0.7, seed=2).acceptance_scheme()
    )


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return parser.parse_args(["hello", *argv])


def test_cli_maps_sampling_flags():
    args = parse(
        "--temperature 0.8 --top-p 0.9 --top-k 40 --seed 7 --acceptance typical "
        "--typical-eps 0.05 --typical-delta 0.2".split()
    )
    config = GenerationConfig(**sampling_options(args))
    assert (config.temperature, config.top_p, config.top_k, config.seed) == (0.8, 0.9, 40, 7)
    assert (config.acceptance, config.typical_eps, config.typical_delta) == ("typical", 0.05, 0.2)
    defaults = GenerationConfig(**sampling_options(parse([])))
    assert defaults.acceptance_scheme().name == "greedy" and defaults.seed is None


def test_cli_refuses_bad_settings_before_loading_a_model(monkeypatch, capsys):
    from medusa import cli

    def no_model(args):
        raise AssertionError("the model must not be loaded for invalid settings")

    monkeypatch.setattr(generate, "load_model", no_model)
    monkeypatch.setattr(cli, "COMMANDS", {"generate": cli.COMMANDS["generate"]})
    assert cli.main(["generate", "hi", "--temperature", "-1"]) == 2
    assert "temperature must be a finite number >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses an unknown scheme by itself
        cli.main(["generate", "hi", "--acceptance", "speculative"])
