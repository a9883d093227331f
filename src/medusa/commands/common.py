"""Flags shared by the commands that load a model.

Nothing here imports torch, so ``medusa generate --help`` (and chat's, serve's) starts fast: the model's
modules load when the command runs, and the defaults below are spelled out from them (a test checks that
they agree).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from medusa.commands.threads import add_threads_argument

if TYPE_CHECKING:
    from medusa.model import MedusaModel

SCHEMES = ("auto", "greedy", "typical", "rejection")  # medusa.acceptance.SCHEMES
DEFAULT_TYPICAL_EPS = 0.09  # medusa.acceptance
DEFAULT_TYPICAL_DELTA = 0.3  # medusa.acceptance
DEFAULT_MAX_NGRAM = 3  # medusa.lookup
MAX_NGRAM = 8  # medusa.lookup
MAX_LOOKUP_NODES = 24  # medusa.lookup
HEAD_TYPES = ("medusa", "sequential")  # medusa.heads.HEAD_TYPES
DEFAULT_HEAD_TYPE = "sequential"  # medusa.heads.DEFAULT_HEAD_TYPE
HEAD_TYPE_HELP = (
    "medusa: each head reads the base model's last hidden state alone; sequential (Hydra): head k also reads the "
    "tokens on its candidate path, the base model's next token and the guesses of heads 0..k-1"
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="base model: a local model directory or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--heads",
        help="Medusa heads directory (default: the heads shipped for the default model, else untrained heads)",
    )
    parser.add_argument("--tree", help="tree: a default size (8, 16, 32, 64), a JSON file, or a JSON list of paths")
    parser.add_argument("--num-heads", type=int, default=4, help="heads to create when no --heads is given (default 4)")
    add_head_type_argument(
        parser,
        "heads to create when no --heads is given (default: the shipped heads when they are of this type, else "
        f"{DEFAULT_HEAD_TYPE}): ",
        default=None,
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU)")
    add_threads_argument(parser)


def add_head_type_argument(
    parser: argparse.ArgumentParser, purpose: str, default: str | None = DEFAULT_HEAD_TYPE
) -> None:
    parser.add_argument("--head-type", choices=HEAD_TYPES, default=default, help=purpose + HEAD_TYPE_HELP)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding")
    group.add_argument(
        "--top-p", type=float, default=1.0, help="keep the likeliest tokens holding this much mass (default 1: off)"
    )
    group.add_argument("--top-k", type=int, default=0, help="keep only the k likeliest tokens (default 0: off)")
    group.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling (default: random)")
    group.add_argument(
        "--acceptance",
        choices=SCHEMES,
        default="auto",
        help="how guesses are accepted: auto (default: greedy at temperature 0, rejection above), greedy, "
        "rejection (lossless sampling), typical (the paper's typical acceptance: faster, not lossless)",
    )
    group.add_argument("--typical-eps", type=float, default=DEFAULT_TYPICAL_EPS, help="typical: hard threshold")
    group.add_argument("--typical-delta", type=float, default=DEFAULT_TYPICAL_DELTA, help="typical: entropy factor")


def add_lookup_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("lookup branch")
    group.add_argument(
        "--lookup",
        type=int,
        default=None,
        metavar="N",
        help="add N tree nodes guessing by copying: what followed the last tokens where they occurred "
        f"earlier in the prompt or answer (0: off; at most {MAX_LOOKUP_NODES}; default: the chain "
        "`medusa tree tune` chose for this device, if any)",
    )
    group.add_argument(
        "--lookup-ngram",
        type=int,
        default=DEFAULT_MAX_NGRAM,
        help=f"longest run of last tokens searched for, 1 to {MAX_NGRAM} "
        f"(default {DEFAULT_MAX_NGRAM}; shorter ones are tried too)",
    )


def lookup_options(args: argparse.Namespace) -> dict:
    """The ``GenerationConfig`` fields the lookup flags set."""
    return {"lookup": args.lookup, "lookup_ngram": args.lookup_ngram}


def sampling_options(args: argparse.Namespace) -> dict:
    """The ``GenerationConfig`` fields the sampling flags set; says once on stderr which of them temperature 0
    ignores."""
    if args.temperature == 0:
        ignored = [
            flag
            for flag, given in (
                ("--seed", args.seed is not None),
                (f"--acceptance {args.acceptance}", args.acceptance in ("typical", "rejection")),
                ("--top-p", args.top_p != 1.0),
                ("--top-k", args.top_k != 0),
            )
            if given
        ]
        if ignored:
            print(
                f"note: {' and '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored at temperature 0: "
                "greedy decoding takes the likeliest token and accepts guesses greedily; give --temperature above 0 "
                "to sample",
                file=sys.stderr,
            )
    return {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "acceptance": args.acceptance,
        "typical_eps": args.typical_eps,
        "typical_delta": args.typical_delta,
    }


def heads_source(args: argparse.Namespace) -> str:
    """Where the flags' heads come from: a directory, the heads shipped for the default model (only when no --model
    is given), or fresh untrained ones ("untrained: ...")."""
    from medusa.model import default_heads

    if args.heads:
        return str(args.heads)
    shipped = default_heads(args.head_type) if args.model is None else None
    if shipped is not None:
        return f"shipped: {shipped}"
    head_type = args.head_type or DEFAULT_HEAD_TYPE
    return f"untrained: {args.num_heads} fresh {head_type} heads (each a copy of the base lm_head)"


def _untrained_heads_notice(args: argparse.Namespace, model: MedusaModel, source: str) -> str:
    """Why untrained heads slow decoding down, and what to pass instead; names the shipped heads when they fit this
    model (its own copy of the default model's file gets fresh heads, as any --model does)."""
    from medusa.interop import load_heads_config
    from medusa.model import default_heads

    notice = (
        f"heads: {source}. They accept few guesses, so decoding is slower than without heads: pass --heads DIR "
        "(made by `medusa train`) or --no-heads"
    )
    shipped = default_heads(args.head_type)
    if shipped is not None and model.heads is not None:
        config, fresh = load_heads_config(shipped), model.heads.config
        if (config.hidden_size, config.vocab_size) == (fresh.hidden_size, fresh.vocab_size):
            notice += f". If this is the default model, its trained heads are --heads {shipped}"
    return notice


def load_model(args: argparse.Namespace) -> MedusaModel:
    """The model the flags name; says on stderr when its heads are untrained (a --model without --heads), and when
    no tree was tuned for this device, which tree it decodes with and how to tune one."""
    from medusa.model import MedusaModel

    model = MedusaModel.from_pretrained(
        args.model,
        heads=args.heads,
        num_heads=args.num_heads,
        head_type=args.head_type,
        tree=args.tree,
        dtype=args.dtype,
        device=args.device,
    )
    source = heads_source(args)
    if source.startswith("untrained") and not getattr(args, "no_heads", False):
        print(_untrained_heads_notice(args, model, source), file=sys.stderr)
    choice = model.tree_choice
    if choice is not None and not choice.tuned:
        print(f"tree: {choice.origin}", file=sys.stderr)
    return model
