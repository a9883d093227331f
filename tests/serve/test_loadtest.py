"""The load-test script against the real server on loopback."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from helpers.serve import running_server
from medusa.errors import MedusaError
from medusa.serve import loadtest


def test_load_run_measures_every_request(serve_model, tmp_path):
    with running_server(serve_model, max_waiting=4) as server:
        config = loadtest.LoadConfig(url=server.url, clients=3, requests=7, max_tokens=8, warmup=1, label="tiny")
        result = loadtest.run_load(config)
    assert (result.ok, result.rejected, result.failed) == (7, 0, 0), result.errors
    assert result.completion_tokens == 7 * 8  # the tiny model never stops early
    assert 0 < result.latency_p50 <= result.latency_p90 <= result.latency_p99
    assert 0 < result.ttft_p50 <= result.ttft_p99 <= result.latency_p99
    assert result.throughput_tokens_per_second == pytest.approx(56 / result.wall_seconds)
    assert result.mean_accepted_per_step >= 1.0
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(asdict(result)))
    assert loadtest.main(["--report", str(saved)]) == 0


def test_a_full_queue_is_counted_as_rejected(serve_model):
    with running_server(serve_model, max_waiting=0) as server:
        config = loadtest.LoadConfig(url=server.url, clients=4, requests=8, max_tokens=16, warmup=0)
        result = loadtest.run_load(config)
    assert result.ok + result.rejected == 8 and result.failed == 0
    assert result.ok >= 1 and result.rejected >= 1


def test_only_loopback_servers_are_measured():
    with pytest.raises(MedusaError, match="not a loopback address"):
        loadtest.LoadConfig(url="http://8.8.8.8:8000")
    with pytest.raises(MedusaError, match="must look like"):
        loadtest.LoadConfig(url="ftp://127.0.0.1/")


def test_prompts_from_spec_bench_lines(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "category": "qa", "turns": ["first?", "second?"]}\n\n{"prompt": "p"}\nplain\n')
    assert loadtest.load_prompts(path) == ("first?", "p", "plain")


def test_percentile():
    assert loadtest.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert loadtest.percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert loadtest.percentile([], 50) is None
