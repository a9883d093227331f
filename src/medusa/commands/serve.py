"""``medusa serve``: the OpenAI-compatible HTTP server (see the README's "Serving" section and docs/batching.md)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import TYPE_CHECKING

from medusa.commands.common import SCHEMES, add_model_arguments, load_model
from medusa.errors import MedusaError

if TYPE_CHECKING:  # the model's modules (torch) load when the command runs, not for --help
    from medusa.engine import EngineOptions
    from medusa.model import MedusaModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    group.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    group.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: $MEDUSA_API_KEY, else none)"
    )
    group.add_argument("--served-model-name", help="the model id clients send (default: the model's name)")
    group.add_argument(
        "--max-tokens-cap", type=int, default=4096, help="most tokens one request may ask for (default 4096)"
    )
    group.add_argument(
        "--max-waiting",
        type=int,
        default=16,
        help="requests that may wait while one generates; more get 429 (default 16)",
    )
    group.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="requests decoded together, joining and leaving at step boundaries (continuous batching; "
        "default on a GPU: the largest batch size whose tuned tree still pays, else 32, and whose KV cache takes "
        "at most half the free GPU memory; 1 on the CPU: one at a time)",
    )
    group.add_argument(
        "--join-wait",
        type=float,
        default=None,
        help="seconds a request may wait to join a running batch together with others, so that one prefill "
        "serves them all (default: three prefills' time, as measured; 0: join at the next step)",
    )
    group.add_argument(
        "--cache-length",
        type=int,
        default=2048,
        help="slots of KV cache per running request: prompt plus max_tokens must fit (default 2048)",
    )
    group.add_argument(
        "--timeout", type=float, default=300.0, help="seconds a request may take, waiting included (default 300)"
    )
    group.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    group.add_argument(
        "--allow-special-tokens",
        action="store_true",
        help="let special-token text in messages (such as <|im_start|>) act as control tokens, "
        "for trusted clients only (default: it is read as plain text)",
    )
    limits = parser.add_argument_group("connections (clients that are slow or many)")
    limits.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send a request's headers; then 408 and closed (default 10)",
    )
    limits.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send a request's body; then 408 and closed (default 30)",
    )
    limits.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=5.0,
        help="seconds an idle keep-alive connection stays open (default 5)",
    )
    limits.add_argument(
        "--max-connections", type=int, default=256, help="open connections; more are closed at once (default 256)"
    )
    limits.add_argument(
        "--limit-concurrency",
        type=int,
        default=None,
        help="past this many open connections or requests in flight, a request gets 503 (default: "
        "off; idle and slow connections count too, so /health would answer 503 under a crowd of them)",
    )
    limits.add_argument(
        "--max-header-bytes", type=int, default=16384, help="a request's headers, all together (default 16384)"
    )
    limits.add_argument(
        "--shutdown-grace",
        type=float,
        default=5.0,
        help="seconds generations may go on after SIGTERM before they are ended with an error (default 5)",
    )
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--no-heads", action="store_true", help="decode plainly, one token per step (the baseline)")
    decoding.add_argument(
        "--acceptance",
        choices=SCHEMES,
        default="auto",
        help="auto (default): greedy at temperature 0, lossless rejection sampling above",
    )
    decoding.add_argument(
        "--adaptive",
        action="store_true",
        help="time the steps and, per batch size and step kind, decode plainly while the tree commits fewer tokens "
        "per second (the tokens are the same; twice the CUDA graphs to capture at start)",
    )
    decoding.add_argument("--no-cuda-graphs", action="store_true", help="step eagerly on GPUs")
    decoding.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        choices=(True, "max-autotune"),
        metavar="max-autotune",
        help="fuse the step with torch.compile before graph capture (slow start); "
        "'max-autotune' also tunes the matrix kernels",
    )
    decoding.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip capturing the CUDA graphs and a short generation before listening (faster start; the first "
        "requests of each batch size then pay for the captures)",
    )


def run(args: argparse.Namespace) -> int:
    from medusa.engine import EngineOptions
    from medusa.serve import Engine, EngineConfig, ServeSettings, create_app
    from medusa.serve.engine import default_max_batch
    from medusa.serve.server import ServerConfig, run_server

    api_key = args.api_key or os.environ.get("MEDUSA_API_KEY") or None
    settings = ServeSettings(
        model_name=args.served_model_name,
        api_key=api_key,
        max_tokens_cap=args.max_tokens_cap,
        acceptance=args.acceptance,
        body_timeout=args.body_timeout,
        special_tokens_in_content=args.allow_special_tokens,
    )
    options = EngineOptions(
        use_heads=not args.no_heads,
        cuda_graphs=not args.no_cuda_graphs,
        compile=args.compile,
        adaptive=args.adaptive,
    )
    if not 0 < args.port < 65536:
        raise MedusaError(f"--port must lie in 1..65535, got {args.port}")
    if args.join_wait is not None and not args.join_wait >= 0:  # before the model loads, not after
        raise MedusaError(f"--join-wait must be 0 or more seconds, got {args.join_wait:g}")
    server_config = ServerConfig(
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        header_timeout=args.header_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
        max_connections=args.max_connections,
        limit_concurrency=args.limit_concurrency,
        max_header_bytes=args.max_header_bytes,
        shutdown_grace=args.shutdown_grace,
    )
    model = load_model(args)
    if args.max_batch:
        max_batch = args.max_batch
    else:
        max_batch = default_max_batch(model, options, args.cache_length) if model.device.type == "cuda" else 1
    engine_config = EngineConfig(
        max_waiting=args.max_waiting,
        request_timeout=args.timeout,
        max_batch=max_batch,
        options=options,
        cache_length=args.cache_length,
        join_wait=args.join_wait,
    )
    engine = Engine(model, engine_config)
    if not args.no_warmup:  # builds the running batch's engine and captures its graphs
        report = engine.warm_up().capture_report()
        if report is not None and report.graphs:
            print(
                f"medusa serve: captured {report.graphs} CUDA graphs in {report.seconds:.1f} s "
                f"({report.memory_bytes / 2**20:.0f} MiB)",
                file=sys.stderr,
            )
    app = create_app(engine, settings)
    print(
        f"medusa serve: {model.name} ({describe_heads(model, options, max_batch)}, up to {max_batch} requests at "
        f"once) on http://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    if not _is_loopback(args.host) and api_key is None:
        print(
            f"medusa serve: warning: listening on {args.host} without --api-key: anyone who can reach it may use it",
            file=sys.stderr,
        )
    run_server(app, server_config)
    return 0


def describe_heads(model: MedusaModel, options: EngineOptions, max_batch: int) -> str:
    """What the start-up line says of the heads: their type and the tree at batch 1 and at ``max_batch``."""
    if not options.use_heads or model.heads is None:
        return "no heads"
    kind = "sequential" if model.heads.config.sequential else "Medusa"
    trees = {bucket: model.tree_for(options, bucket).size for bucket in (1, max_batch)}
    parts = [f"{kind} heads", *(f"{size}-node tree at batch {bucket}" for bucket, size in trees.items())]
    if options.adaptive:
        parts.append("plain steps where a tree does not pay (--adaptive)")
    return ", ".join(parts)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
