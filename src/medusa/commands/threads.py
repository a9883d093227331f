"""``--threads``, shared by every command that runs a model: torch's CPU threads.

On a busy machine torch's default (one thread per core) can run several times slower than one thread
(3.3x on a shared 2-core machine, issue 25), so every command that runs a model lets the user choose.
"""

from __future__ import annotations

import argparse

from medusa.errors import MedusaError


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: torch's choice, one per core; on a busy machine fewer, "
        "even 1, can be much faster)",
    )


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's threads when the command has ``--threads`` and it was given (torch is imported only then)."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise MedusaError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
