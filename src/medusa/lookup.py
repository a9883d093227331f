"""Guesses copied from earlier text, for the tree's lookup branch.

Answers often repeat their context: a summary quotes its article, an answer names what the question
named, code reuses its identifiers, and a small model loops. Prompt-lookup decoding (Saxena, 2023)
exploits that by finding the last few tokens earlier in the text and proposing what followed them
there. Here those guesses are one more branch of the Medusa tree, verified in the same forward pass as
the heads' guesses, so the answer stays exactly what verification accepts.

The search runs on the device over the decoder's fixed token buffer, with fixed shapes and no host
sync, so it is captured in the step's CUDA graph like everything else.
"""

from __future__ import annotations

import torch

from medusa.errors import MedusaError

DEFAULT_MAX_NGRAM = 3
MAX_NGRAM = 8  # each size searched costs a few kernels per step
MAX_LOOKUP_NODES = 24  # the chain's depth; a CUDA-graph capture's warm-up steps must fit in the spare cache slots


def check_lookup(nodes: int, max_ngram: int) -> None:
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 0 <= nodes <= MAX_LOOKUP_NODES:
        raise MedusaError(
            f"lookup nodes must be an integer from 0 (no lookup branch) to {MAX_LOOKUP_NODES}, got {nodes!r}"
        )
    if isinstance(max_ngram, bool) or not isinstance(max_ngram, int) or not 1 <= max_ngram <= MAX_NGRAM:
        raise MedusaError(f"lookup n-gram size must be an integer from 1 to {MAX_NGRAM}, got {max_ngram!r}")


def ngram_continuation(history: torch.Tensor, last: torch.Tensor, max_ngram: int, count: int) -> torch.Tensor:
    """``count`` guesses per row ``[rows, count]`` for the tokens after ``history[row, last[row]]``, from an
    earlier occurrence of its suffix.

    ``history [rows, slots]`` holds each row's text so far in ``history[row, : last[row] + 1]`` (``last [rows]``
    long; what lies beyond is ignored). The longest suffix of up to ``max_ngram`` tokens that occurred before
    wins, and among its occurrences the most recent. The guesses are the tokens that followed it; where
    those run past the end of the text, the text is taken to repeat with the period between the two
    occurrences, which is what a loop does. With no occurrence at all the guesses are arbitrary tokens
    of the text (verification rejects them).
    """
    rows, slots = history.shape
    positions = torch.arange(slots, device=history.device)
    last = last[:, None]  # [rows, 1]
    best = torch.full((rows, 1), -1, dtype=torch.long, device=history.device)
    for n in range(1, min(max_ngram, slots - 1) + 1):
        suffix = history.gather(1, (last - n + 1 + positions[:n]).clamp_min(0))  # [rows, n]
        windows = history.unfold(1, n, 1)  # [rows, slots - n + 1, n]: the n-gram starting at each slot
        starts = positions[: windows.shape[1]][None, :]
        # The occurrence must end before the suffix does, so at least one known token follows it.
        usable = (starts + n <= last) & (last + 1 >= n)
        found = (windows == suffix[:, None, :]).all(dim=2) & usable
        # Longer n-grams outrank shorter ones, later starts earlier ones: one max picks the winner.
        best = torch.maximum(best, torch.where(found, n * slots + starts, -1).max(dim=1, keepdim=True).values)
    size = (best // slots).clamp_min(1)
    follow = torch.where(best >= 0, best % slots + size, last)  # first copied slot, at most ``last``
    period = last + 1 - follow
    return history.gather(1, follow + positions[:count][None, :] % period.clamp_min(1))
