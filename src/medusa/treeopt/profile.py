"""Head profile: how often each head's rank-r guess is the token that greedy verification accepts.

Teacher forcing over conversations the base model wrote itself: the hidden state at position t feeds
the heads, and head k's guess (it aims at position t + k + 2) counts as right when it equals the base
model's argmax at position t + k + 1, the very check greedy verification makes. On self-distilled greedy
data that argmax is the data's next token; on other data it is still what decoding would accept.

Besides the paper's table (``accuracy[k][r]``), the profile keeps how often each path of ranks is right
as a whole (``path_counts``): heads are not independent, so the product of their accuracies misjudges
deep paths, while the joint counts give a tree's expected accepted length directly.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from medusa.decoding import model_device
from medusa.errors import MedusaError
from medusa.heads import WEIGHTS_NAME, MedusaHeads

if TYPE_CHECKING:
    from medusa.training.data import Example

PROFILE_FILE = "tree_profile.json"
REFERENCE = "base_argmax"
# Joint counts kept in the file, most frequent first. A greedy tree of N nodes uses only the N - 1 most
# frequent paths, so keeping 4096 loses nothing for trees up to 4097 nodes.
KEPT_PATHS = 4096


@dataclass
class HeadProfile:
    num_heads: int
    topk: int
    accuracy: list[list[float]]  # [head][rank]: share of positions where that guess was accepted
    samples: int  # positions measured
    heads_fingerprint: str | None = None
    path_counts: dict[tuple[int, ...], int] = field(default_factory=dict)  # positions whose guesses match along the path
    reference: str = REFERENCE

    def check_heads(self, num_heads: int, fingerprint: str | None = None, origin: str = "the profile") -> None:
        """Refuse a profile measured on other heads: a different head count, or other weights."""
        if self.num_heads != num_heads:
            raise MedusaError(
                f"{origin} was measured on {self.num_heads} heads, but these heads have {num_heads}; "
                "run `medusa tree profile` for these heads"
            )
        if fingerprint and self.heads_fingerprint and fingerprint != self.heads_fingerprint:
            raise MedusaError(
                f"{origin} was measured on other heads weights (fingerprint {self.heads_fingerprint}, these are "
                f"{fingerprint}); run `medusa tree profile` again for these heads"
            )

    def check_paths(self, paths: Iterable[Sequence[int]]) -> None:
        for path in paths:
            if len(path) > self.num_heads:
                raise MedusaError(f"tree path {list(path)} is {len(path)} deep but the profile has {self.num_heads} heads")
            if max(path) >= self.topk:
                raise MedusaError(f"tree path {list(path)} uses rank {max(path)}, but the profile measured only top-{self.topk}")

    def to_dict(self) -> dict:
        kept = sorted(self.path_counts.items(), key=lambda item: (-item[1], len(item[0]), item[0]))[:KEPT_PATHS]
        return {
            "num_heads": self.num_heads,
            "topk": self.topk,
            "accuracy": [[round(a, 6) for a in row] for row in self.accuracy],
            "samples": self.samples,
            "heads_fingerprint": self.heads_fingerprint,
            "reference": self.reference,
            "path_counts": [[list(path), count] for path, count in kept],
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(self.to_dict()) + "\n")
        temporary.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "HeadProfile":
        path = Path(path)
        if not path.is_file():
            raise MedusaError(f"no tree profile at {path}; run `medusa tree profile` first")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise MedusaError(f"tree profile {path} is not valid JSON: {error}") from None
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: object, origin: str = "tree profile") -> "HeadProfile":
        def fail(why: str) -> MedusaError:
            return MedusaError(f"{origin}: {why}")

        if not isinstance(raw, dict):
            raise fail("expected a JSON object with num_heads, topk, accuracy and samples")
        for key in ("num_heads", "topk", "samples"):
            value = raw.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "samples" else 1):
                raise fail(f"{key} must be a {'non-negative' if key == 'samples' else 'positive'} integer, got {value!r}")
        num_heads, topk, samples = raw["num_heads"], raw["topk"], raw["samples"]
        accuracy = raw.get("accuracy")
        if not isinstance(accuracy, list) or len(accuracy) != num_heads:
            raise fail(f"accuracy must hold one row per head ({num_heads} rows)")
        for k, row in enumerate(accuracy):
            if not isinstance(row, list) or len(row) != topk:
                raise fail(f"accuracy row {k} must hold top-{topk} values, got {row!r:.60}")
            if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1 for a in row):
                raise fail(f"accuracy row {k} must hold numbers between 0 and 1")
        for k, row in enumerate(accuracy):
            if sum(row) > 1 + 1e-6:
                raise fail(f"head {k}'s accuracies add up to more than 1, but the ranks of one head are exclusive")
        counts: dict[tuple[int, ...], int] = {}
        for entry in raw.get("path_counts", []):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list) and isinstance(entry[1], int)):
                raise fail(f"path_counts entries are [path, count], got {entry!r:.60}")
            path, count = tuple(entry[0]), entry[1]
            if not path or len(path) > num_heads or not all(isinstance(r, int) and 0 <= r < topk for r in path):
                raise fail(f"path {list(path)} in path_counts does not fit {num_heads} heads of top-{topk}")
            if not 0 <= count <= samples:
                raise fail(f"path {list(path)} has count {count}, outside 0..{samples}")
            counts[path] = count
        fingerprint = raw.get("heads_fingerprint")
        return cls(num_heads, topk, [[float(a) for a in row] for row in accuracy], samples,
                   fingerprint if isinstance(fingerprint, str) else None, counts, str(raw.get("reference", REFERENCE)))


def heads_fingerprint(directory: str | Path) -> str:
    """A hash of the heads' weights file: a profile or tuned tree names the heads it was measured on."""
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise MedusaError(f"no heads weights at {weights}")
    digest = hashlib.sha256()
    with weights.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


@torch.inference_mode()
def profile_heads(
    base_model: PreTrainedModel,
    heads: MedusaHeads,
    sequences: Iterable[Example],
    topk: int = 10,
    fingerprint: str | None = None,
    chunk: int = 256,
    progress: Callable[[int], None] | None = None,
) -> HeadProfile:
    """Measure the heads at every position t of ``sequences`` (each with ``input_ids`` and ``loss_mask``,
    True on assistant tokens) whose next ``num_heads + 1`` tokens are all assistant tokens.

    So a turn is measured from its prompt's last token (whose hidden state feeds the first decoding step)
    up to the last position whose deepest head still aims inside the turn.
    """
    num_heads = heads.config.num_heads
    vocab = heads.config.vocab_size
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= vocab:
        raise MedusaError(f"topk must be between 1 and the vocabulary size {vocab}, got {topk!r}")
    device = model_device(base_model)
    hits = torch.zeros(num_heads, topk, dtype=torch.long, device=device)
    offsets = torch.arange(1, num_heads + 1, device=device)
    counts: Counter[tuple[int, ...]] = Counter()
    samples = 0
    for sequence in sequences:
        ids = torch.as_tensor(sequence.input_ids, dtype=torch.long, device=device)
        answer = torch.as_tensor(sequence.loss_mask, dtype=torch.bool, device=device)
        if ids.shape != answer.shape:
            raise MedusaError(f"input_ids and loss_mask differ in length ({ids.numel()} and {answer.numel()})")
        measured = torch.zeros(0, dtype=torch.long, device=device)
        if ids.numel() > num_heads + 1:
            # t is measured when tokens t + 1 .. t + num_heads + 1 all belong to an answer
            measured = answer[1:].unfold(0, num_heads + 1, 1).all(dim=-1).nonzero().flatten()
        if measured.numel():
            output = base_model(input_ids=ids[None], output_hidden_states=True, use_cache=False)
            greedy = output.logits[0].argmax(-1)  # [len]: the base model's token after each position
            hidden = output.hidden_states[-1][0]  # [len, hidden]
            for start in range(0, measured.numel(), chunk):
                positions = measured[start : start + chunk]
                guesses = heads(hidden[positions]).topk(topk, dim=-1).indices  # [heads, chunk, topk]
                targets = greedy[positions[None, :] + offsets[:, None]]  # [heads, chunk]
                match = guesses == targets[..., None]
                hits += match.sum(dim=1)
                rank = torch.where(match.any(-1), match.float().argmax(-1), -1)  # [heads, chunk], -1: missed
                _count_paths(rank.cpu(), counts)
                samples += positions.numel()
        if progress is not None:
            progress(1)
    accuracy = (hits.double() / max(samples, 1)).cpu().tolist()
    return HeadProfile(num_heads, topk, accuracy, samples, fingerprint, dict(counts))


def _count_paths(rank: torch.Tensor, counts: Counter[tuple[int, ...]]) -> None:
    """Count, for every depth, the rank paths that are right all the way down: ``rank`` is ``[heads, positions]``."""
    alive = (rank >= 0).long().cumprod(dim=0).bool()  # right at this depth and every shallower one
    for depth in range(rank.shape[0]):
        columns = alive[depth]
        if not columns.any():
            break
        paths, numbers = torch.unique(rank[: depth + 1, columns].T, dim=0, return_counts=True)
        for path, number in zip(paths.tolist(), numbers.tolist()):
            counts[tuple(path)] += number


def joint_chance(profile: HeadProfile, path: Sequence[int]) -> float:
    return profile.path_counts.get(tuple(path), 0) / profile.samples if profile.samples else 0.0


def paper_chance(profile: HeadProfile, path: Sequence[int]) -> float:
    return math.prod(profile.accuracy[depth][rank] for depth, rank in enumerate(path))
