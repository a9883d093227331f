"""``medusa serve``: the OpenAI-compatible HTTP server (see the README's "Serving" section and docs/batching.md)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from medusa.commands.common import SCHEMES, add_model_arguments, load_model
from medusa.errors import MedusaError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    group.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    group.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: $MEDUSA_API_KEY, else none)")
    group.add_argument("--served-model-name", help="the model id clients send (default: the model's name)")
    group.add_argument("--max-tokens-cap", type=int, default=4096, help="most tokens one request may ask for (default 4096)")
    group.add_argument("--max-waiting", type=int, default=16,
                       help="requests that may wait while one generates; more get 429 (default 16)")
    group.add_argument("--max-batch", type=int, default=1,
                       help="greedy requests decoded together, joining at step boundaries (default 1: one at a time)")
    group.add_argument("--timeout", type=float, default=300.0,
                       help="seconds a request may take, waiting included (default 300)")
    group.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--no-heads", action="store_true", help="decode plainly, one token per step (the baseline)")
    decoding.add_argument("--acceptance", choices=SCHEMES, default="auto",
                          help="auto (default): greedy at temperature 0, lossless rejection sampling above")
    decoding.add_argument("--no-cuda-graphs", action="store_true", help="step eagerly on GPUs")
    decoding.add_argument("--compile", nargs="?", const=True, default=False, choices=(True, "max-autotune"),
                          metavar="max-autotune",
                          help="fuse the step with torch.compile before graph capture (slow start); "
                          "'max-autotune' also tunes the matrix kernels")
    decoding.add_argument("--no-warmup", action="store_true",
                          help="skip the short generation run before listening (it captures the first graphs)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from medusa.model import GenerationConfig
    from medusa.serve import Engine, EngineConfig, ServeSettings, create_app

    api_key = args.api_key or os.environ.get("MEDUSA_API_KEY") or None
    settings = ServeSettings(
        model_name=args.served_model_name, api_key=api_key, max_tokens_cap=args.max_tokens_cap,
        use_heads=not args.no_heads, acceptance=args.acceptance, cuda_graphs=not args.no_cuda_graphs,
        compile=args.compile,
    )
    engine_config = EngineConfig(max_waiting=args.max_waiting, request_timeout=args.timeout, max_batch=args.max_batch)
    if not 0 < args.port < 65536:
        raise MedusaError(f"--port must lie in 1..65535, got {args.port}")
    model = load_model(args)
    if not args.no_warmup:
        model.generate("Hello", GenerationConfig(max_new_tokens=8, use_heads=settings.use_heads,
                                                 acceptance=settings.acceptance, cuda_graphs=settings.cuda_graphs,
                                                 compile=settings.compile))
    app = create_app(Engine(model, engine_config), settings)
    heads = "no heads"
    if settings.use_heads and model.heads:
        heads = f"Medusa heads, {model.plain_tree.size}-node tree"
        if model.tree.lookup and args.max_batch == 1:  # batches have no lookup branch
            heads += f" ({model.tree.size} nodes with its {model.tree.lookup}-node lookup chain)"
    print(f"medusa serve: {model.name} ({heads}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    if not _is_loopback(args.host) and api_key is None:
        print(f"medusa serve: warning: listening on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
