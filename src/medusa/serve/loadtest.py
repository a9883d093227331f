"""Load test for a running ``medusa serve``: throughput and latency percentiles under concurrent clients.

    python -m medusa.serve.loadtest --url http://127.0.0.1:8000 --clients 8 --requests 128 --output run.json
    python -m medusa.serve.loadtest --report medusa.json baseline.json   # a markdown table of saved runs

A fixed number of client threads send a fixed number of streamed chat requests (prompts from a
Spec-Bench-style JSONL file, or a few built in) and time each one: time to first token, the whole
request, and tokens per second per request. Throughput is all completion tokens over the wall time.
The server's own /metrics give the mean accepted tokens per decoding step over the run. Only
loopback addresses are accepted: this measures a server on this machine, it is not a traffic generator.
Standard library only, so it runs wherever the server does.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from medusa.errors import MedusaError
from medusa.files import read_json, write_json

BUILTIN_PROMPTS = (
    "Explain how a hash map works and when it is a poor choice.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of inflation? Answer in a few paragraphs.",
    "Write a Python function that checks whether a string is a palindrome, with tests.",
    "Summarise the plot of Romeo and Juliet for a ten-year-old.",
    "Give me a three-day itinerary for Rome with food suggestions.",
    "Compare TCP and UDP, with an example use of each.",
    "A train leaves at 3 pm at 80 km/h; another at 4 pm at 100 km/h. When does the second catch up?",
)


@dataclass
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    clients: int = 8
    requests: int = 64
    max_tokens: int = 256
    temperature: float = 0.0
    # Every odd-numbered request samples at this temperature, with its number as seed: greedy and sampled requests
    # in one load (None: every request at ``temperature``).
    mixed_temperature: float | None = None
    warmup: int = 2  # requests sent one at a time before timing starts (graph capture, allocator)
    timeout: float = 600.0  # per request
    api_key: str | None = None
    prompts: tuple[str, ...] = BUILTIN_PROMPTS
    label: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.clients <= 256:
            raise MedusaError(f"clients must lie in 1..256, got {self.clients}")
        if not 1 <= self.requests <= 100_000:
            raise MedusaError(f"requests must lie in 1..100000, got {self.requests}")
        if not self.prompts:
            raise MedusaError("no prompts to send")
        check_loopback(self.url)


@dataclass
class Sample:
    status: int
    seconds: float
    first_token_seconds: float | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class LoadResult:
    label: str
    model: str
    clients: int
    requests: int
    max_tokens: int
    ok: int
    rejected: int  # 429: the server's queue was full
    failed: int
    wall_seconds: float
    completion_tokens: int
    throughput_tokens_per_second: float
    requests_per_second: float
    latency_p50: float | None
    latency_p90: float | None
    latency_p99: float | None
    ttft_p50: float | None
    ttft_p99: float | None
    per_request_tokens_per_second_p50: float | None
    mean_accepted_per_step: float | None  # from the server's /metrics over the timed run
    errors: list[str] = field(default_factory=list)


def check_loopback(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise MedusaError(f"the URL must look like http://127.0.0.1:8000, got {url!r}")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 80)}
    except socket.gaierror as error:
        raise MedusaError(f"cannot resolve {parts.hostname!r}: {error}") from None
    if not all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses):
        raise MedusaError(f"{parts.hostname} is not a loopback address: the load test only targets this machine")


def load_prompts(path: str | Path) -> tuple[str, ...]:
    """First turns of a Spec-Bench JSONL file, ``{"prompt": ...}`` lines, or plain text lines."""
    prompts = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            row = json.loads(line)
            text = row["turns"][0] if "turns" in row else row.get("prompt") or row.get("question")
            if not isinstance(text, str):
                raise MedusaError(f"{path}: a row has no 'turns', 'prompt' or 'question' text")
            prompts.append(text)
        else:
            prompts.append(line)
    if not prompts:
        raise MedusaError(f"{path} holds no prompts")
    return tuple(prompts)


class _Client:
    def __init__(self, config: LoadConfig) -> None:
        parts = urlsplit(config.url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.base = parts.path.rstrip("/")
        self.config = config
        self.headers = {"Content-Type": "application/json"}
        if config.api_key:
            self.headers["Authorization"] = f"Bearer {config.api_key}"

    def get(self, path: str) -> str:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            try:
                connection.request("GET", self.base + path, headers=self.headers)
                response = connection.getresponse()
                body = response.read().decode()
            except OSError as error:
                raise MedusaError(f"cannot reach the server at {self.config.url}: {error}") from None
            if response.status != 200:
                raise MedusaError(f"GET {path} answered {response.status}: {body[:200]}")
            return body
        finally:
            connection.close()

    def chat(self, model: str, prompt: str, index: int = 0) -> Sample:
        request = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.config.mixed_temperature is not None and index % 2:
            request.update(temperature=self.config.mixed_temperature, seed=index)
        body = json.dumps(request)
        started = time.perf_counter()
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.config.timeout)
        try:
            connection.request("POST", self.base + "/v1/chat/completions", body=body, headers=self.headers)
            response = connection.getresponse()
            if response.status != 200:
                text = response.read().decode(errors="replace")
                return Sample(response.status, time.perf_counter() - started, error=text[:300])
            sample = Sample(200, 0.0)
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    sample.status, sample.error = 500, event["error"].get("message")
                    break
                if event.get("usage"):
                    sample.completion_tokens = event["usage"]["completion_tokens"]
                choices = event.get("choices") or []
                if sample.first_token_seconds is None and choices and choices[0].get("delta", {}).get("content"):
                    sample.first_token_seconds = time.perf_counter() - started
            sample.seconds = time.perf_counter() - started
            return sample
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as error:
            return Sample(0, time.perf_counter() - started, error=f"{type(error).__name__}: {error}")
        finally:
            connection.close()


def run_load(config: LoadConfig) -> LoadResult:
    """Warm up, then run ``config.requests`` requests over ``config.clients`` threads and summarise them."""
    client = _Client(config)
    models = json.loads(client.get("/v1/models"))["data"]
    model = models[0]["id"]
    for index in range(config.warmup):
        sample = client.chat(model, config.prompts[index % len(config.prompts)])
        if sample.status != 200:
            raise MedusaError(f"a warm-up request failed ({sample.status}): {sample.error}")
    before = _metric_totals(client.get("/metrics"))
    samples: list[Sample | None] = [None] * config.requests
    counter = iter(range(config.requests))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            samples[index] = client.chat(model, config.prompts[index % len(config.prompts)], index)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(config.clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    after = _metric_totals(client.get("/metrics"))
    return summarise(config, model, [s for s in samples if s is not None], wall, before, after)


def summarise(
    config: LoadConfig, model: str, samples: list[Sample], wall: float, before: dict, after: dict
) -> LoadResult:
    ok = [s for s in samples if s.status == 200]
    latencies = sorted(s.seconds for s in ok)
    ttfts = sorted(s.first_token_seconds for s in ok if s.first_token_seconds is not None)
    rates = sorted(s.completion_tokens / s.seconds for s in ok if s.seconds > 0)
    tokens = sum(s.completion_tokens for s in ok)
    steps = after.get("medusa_decoding_steps_total", 0) - before.get("medusa_decoding_steps_total", 0)
    accepted = after.get("medusa_accepted_tokens_total", 0) - before.get("medusa_accepted_tokens_total", 0)
    return LoadResult(
        label=config.label,
        model=model,
        clients=config.clients,
        requests=len(samples),
        max_tokens=config.max_tokens,
        ok=len(ok),
        rejected=sum(s.status == 429 for s in samples),
        failed=sum(s.status not in (200, 429) for s in samples),
        wall_seconds=wall,
        completion_tokens=tokens,
        throughput_tokens_per_second=tokens / wall if wall > 0 else 0.0,
        requests_per_second=len(ok) / wall if wall > 0 else 0.0,
        latency_p50=percentile(latencies, 50),
        latency_p90=percentile(latencies, 90),
        latency_p99=percentile(latencies, 99),
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        per_request_tokens_per_second_p50=percentile(rates, 50),
        mean_accepted_per_step=accepted / steps if steps > 0 else None,
        errors=sorted({f"{s.status}: {s.error}" for s in samples if s.status != 200})[:10],
    )


def percentile(ordered: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks of an ascending list."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _metric_totals(text: str) -> dict[str, float]:
    totals = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            totals[name] = float(value)
    return totals


def markdown_table(results: list[dict]) -> str:
    def number(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| run | clients | requests ok / 429 / failed | tokens/s (all clients) | per-request tokens/s p50 | "
        "latency p50 (s) | latency p99 (s) | TTFT p50 (s) | TTFT p99 (s) | accepted tokens per step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['label'] or r['model']} | {r['clients']} | {r['ok']} / {r['rejected']} / {r['failed']} | "
            f"{number(r['throughput_tokens_per_second'], 1)} | {number(r['per_request_tokens_per_second_p50'], 1)} | "
            f"{number(r['latency_p50'])} | {number(r['latency_p99'])} | {number(r['ttft_p50'], 3)} | "
            f"{number(r['ttft_p99'], 3)} | {number(r['mean_accepted_per_step'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medusa.serve.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--requests", type=int, default=64, help="requests in all (default 64)")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens per request (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--mixed-temperature",
        type=float,
        metavar="T",
        help="odd-numbered requests sample at T (seeded), the others at --temperature",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests first (default 2)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    parser.add_argument("--prompts", help="Spec-Bench JSONL (first turns), {'prompt'} JSONL or text lines")
    parser.add_argument("--api-key")
    parser.add_argument("--label", default="", help="name of this run in reports")
    parser.add_argument("--output", help="write the result as JSON here")
    parser.add_argument("--report", nargs="+", metavar="JSON", help="print a markdown table of saved runs and exit")
    args = parser.parse_args(argv)
    try:
        if args.report:
            print(markdown_table([read_json(path, "load test report") for path in args.report]))
            return 0
        config = LoadConfig(
            url=args.url,
            clients=args.clients,
            requests=args.requests,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            mixed_temperature=args.mixed_temperature,
            warmup=args.warmup,
            timeout=args.timeout,
            api_key=args.api_key,
            prompts=load_prompts(args.prompts) if args.prompts else BUILTIN_PROMPTS,
            label=args.label,
        )
        result = run_load(config)
    except MedusaError as error:
        print(f"loadtest: error: {error}", file=sys.stderr)
        return 2
    if args.output:
        write_json(args.output, asdict(result))
    print(markdown_table([asdict(result)]))
    for error in result.errors:
        print(f"  {error}", file=sys.stderr)
    return 0 if result.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
