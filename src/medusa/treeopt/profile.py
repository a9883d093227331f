"""Head profile: how often each head's rank-r guess is the token that greedy verification accepts.

Teacher forcing over conversations the base model wrote itself: the hidden state at position t feeds
the heads, and head k's guess (it aims at position t + k + 2) counts as right when it equals the base
model's argmax at position t + k + 1, the very check greedy verification makes. On self-distilled greedy
data that argmax is the data's next token; on other data it is still what decoding would accept.

Besides the paper's table (``accuracy[k][r]``), the profile keeps how often each path of ranks is right
as a whole (``path_counts``): heads are not independent, so the product of their accuracies misjudges
deep paths, while the joint counts give the mean accepted length over *all* positions.

Decoding does not start a step at every position, though: after accepting 1 + a tokens at t it starts
the next step at t + 1 + a, so it strides over easy stretches and takes a step per token through hard
ones, and its tokens per step is lower than that mean. So the profile also keeps, per answer, which
path of ranks was right at each position (``position_ranks``, up to ``WALK_POSITIONS`` positions);
``medusa.treeopt.walk`` replays the decoding walk over them for any tree.

Sequential heads (``head_type="sequential"``) read the tokens on their candidate path, and the profile feeds
head k the true ones: at t, the base model's greedy tokens after positions t .. t + k (``greedy[t : t + k + 1]``),
what greedy verification accepts there. A tree node is accepted only if every ancestor was, that is, was right,
so on every path that matters the heads' inputs are those tokens; the ranks measured so are the conditional
chances the estimates multiply and walk, and nothing else needs to change for conditioned heads.

The tree's lookup branch (``medusa.lookup``) guesses from the text alone, so its guesses at a position
are known from the conversation too: the profile also keeps how many of them verification would accept
there (``PositionRanks.lookup``), and the walk can take the longer of the two branches, as decoding does.
"""

from __future__ import annotations

import base64
import hashlib
import math
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedModel

from medusa.decoding import model_device
from medusa.errors import MedusaError
from medusa.files import read_json, write_json
from medusa.heads import HEAD_TYPES, WEIGHTS_NAME, MedusaHeads
from medusa.lookup import DEFAULT_MAX_NGRAM, MAX_LOOKUP_NODES, check_lookup, ngram_continuation

if TYPE_CHECKING:
    from medusa.training.data import Example

PROFILE_FILE = "tree_profile.json"
REFERENCE = "base_argmax"
# Joint counts kept in the file, most frequent first. A greedy tree of N nodes uses only the N - 1 most
# frequent paths, so keeping 4096 loses nothing for trees up to 4097 nodes.
KEPT_PATHS = 4096
# Positions whose rank paths are kept for the walk estimate (whole answers first; the last one kept may be
# cut). With 4 heads of top-10 a position takes 4 bytes before compression, well under 1 MB in the file.
WALK_POSITIONS = 1 << 17


@dataclass
class PositionRanks:
    """Per measured position, the rank of the accepted token in each head's top-k, in text order.

    ``ranks[i, k]`` is head k's rank at position i, or -1 where head k missed it *or any shallower head
    missed* (only the path down to the first miss can be accepted, and cutting there compresses well).
    ``segments`` are the lengths of the runs of consecutive positions, one per measured answer, in order;
    a run starts at the prompt's last token, where decoding starts its first step.
    ``lookup[i]``, when measured, is how many of a lookup chain's guesses (searching suffixes of up to
    ``lookup_ngram`` tokens) a step started at position i accepts, up to ``MAX_LOOKUP_NODES``; a chain of
    N nodes accepts ``min(lookup[i], N)`` of them.
    """

    ranks: np.ndarray  # [positions, heads], int16
    segments: np.ndarray  # [runs], int64, adding up to positions
    lookup: np.ndarray | None = None  # [positions], uint8; None where the profile did not measure it
    lookup_ngram: int = DEFAULT_MAX_NGRAM

    @property
    def positions(self) -> int:
        return int(self.ranks.shape[0])

    def first(self, tokens: int) -> PositionRanks:
        """The first ``tokens`` positions of each answer: what decoding ``tokens`` new tokens walks over.

        Answers change as they go on (a small model drifts into repeating itself, which the lookup branch
        copies), so an estimate for 256-token generations should not read positions 257 onwards.
        """
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise MedusaError(f"tokens per answer must be a positive integer, got {tokens!r}")
        starts = np.cumsum(self.segments) - self.segments
        kept = np.minimum(self.segments, tokens)
        index = (
            np.concatenate([np.arange(a, a + n) for a, n in zip(starts, kept)])
            if len(kept)
            else np.zeros(0, dtype=np.int64)
        )
        lookup = None if self.lookup is None else self.lookup[index]
        return PositionRanks(self.ranks[index], kept.astype(np.int64), lookup, self.lookup_ngram)

    def to_dict(self, topk: int) -> dict:
        dtype = np.uint8 if topk < 255 else np.uint16
        miss = np.iinfo(dtype).max
        stored = np.where(self.ranks < 0, miss, self.ranks).astype(dtype)
        extra = {}
        if self.lookup is not None:
            extra = {"lookup_ngram": self.lookup_ngram, "lookup": _pack(self.lookup.astype(np.uint8))}
        return {
            "encoding": f"base64 of zlib of {np.dtype(dtype).name} [positions, heads] row-major, {miss} = missed",
            "dtype": np.dtype(dtype).name,
            "positions": self.positions,
            "segments": [int(n) for n in self.segments],
            "ranks": _pack(stored),
            **extra,
        }

    @classmethod
    def from_dict(
        cls, raw: object, num_heads: int, topk: int, samples: int, fail: Callable[[str], MedusaError]
    ) -> PositionRanks:
        if not isinstance(raw, dict):
            raise fail("position_ranks must be an object with dtype, positions, segments and ranks")
        dtype_name, positions, segments = raw.get("dtype"), raw.get("positions"), raw.get("segments")
        if dtype_name not in ("uint8", "uint16"):
            raise fail(f"position_ranks dtype must be uint8 or uint16, got {dtype_name!r}")
        if isinstance(positions, bool) or not isinstance(positions, int) or not 0 <= positions <= samples:
            raise fail(f"position_ranks positions must be an integer in 0..{samples}, got {positions!r}")
        if not isinstance(segments, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in segments
        ):
            raise fail("position_ranks segments must be a list of positive run lengths")
        if sum(segments) != positions:
            raise fail(f"position_ranks segments add up to {sum(segments)}, not to its {positions} positions")
        dtype = np.dtype(dtype_name)
        data = _unpack(raw.get("ranks"), "ranks", fail)
        if len(data) != positions * num_heads * dtype.itemsize:
            raise fail(
                f"position_ranks ranks hold {len(data)} bytes, not {positions} positions x {num_heads} heads "
                f"of {dtype.name}"
            )
        stored = np.frombuffer(data, dtype=dtype).reshape(positions, num_heads)
        miss = np.iinfo(dtype).max
        if ((stored >= topk) & (stored != miss)).any():
            raise fail(f"position_ranks holds ranks beyond the profile's top-{topk}")
        ranks = np.where(stored == miss, -1, stored.astype(np.int16)).astype(np.int16)
        lookup, lookup_ngram = None, DEFAULT_MAX_NGRAM
        if raw.get("lookup") is not None:
            lookup_ngram = raw.get("lookup_ngram")
            if isinstance(lookup_ngram, bool) or not isinstance(lookup_ngram, int) or lookup_ngram < 1:
                raise fail(f"position_ranks lookup_ngram must be a positive integer, got {lookup_ngram!r}")
            lookup = np.frombuffer(_unpack(raw["lookup"], "lookup", fail), dtype=np.uint8).copy()
            if lookup.size != positions:
                raise fail(
                    f"position_ranks lookup holds {lookup.size} depths, not one per each of its {positions} positions"
                )
            if lookup.size and lookup.max() > MAX_LOOKUP_NODES:
                raise fail(f"position_ranks lookup holds depths beyond the longest lookup chain, {MAX_LOOKUP_NODES}")
        return cls(ranks, np.asarray(segments, dtype=np.int64), lookup, lookup_ngram)


def _pack(array: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.ascontiguousarray(array).tobytes(), 9)).decode("ascii")


def _unpack(text: object, name: str, fail: Callable[[str], MedusaError]) -> bytes:
    try:
        return zlib.decompress(base64.b64decode(str(text or ""), validate=True))
    except (ValueError, zlib.error) as error:
        raise fail(f"position_ranks {name} cannot be decoded: {error}") from None


@dataclass
class HeadProfile:
    num_heads: int
    topk: int
    accuracy: list[list[float]]  # [head][rank]: share of positions where that guess was accepted
    samples: int  # positions measured
    heads_fingerprint: str | None = None
    path_counts: dict[tuple[int, ...], int] = field(
        default_factory=dict
    )  # positions whose guesses match along the path
    reference: str = REFERENCE
    position_ranks: PositionRanks | None = None  # None in profiles made before the walk estimate
    head_type: str = "medusa"  # profiles made before sequential heads measured Medusa heads

    def for_new_tokens(self, tokens: int | None) -> HeadProfile:
        """This profile with its walk data cut to the first ``tokens`` positions of each answer (None: whole answers).

        Only the walk estimate reads it; the joint counts and accuracies stay those of whole answers.
        """
        if tokens is None or self.position_ranks is None:
            return self
        return replace(self, position_ranks=self.position_ranks.first(tokens))

    def check_heads(
        self,
        num_heads: int,
        fingerprint: str | None = None,
        origin: str = "the profile",
        head_type: str | None = None,
    ) -> None:
        """Refuse a profile measured on other heads: a different head count or head type, or other weights."""
        if head_type is not None and self.head_type != head_type:
            raise MedusaError(
                f"{origin} was measured on {self.head_type} heads, but these heads are {head_type}; "
                "run `medusa tree profile` for these heads"
            )
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
                raise MedusaError(
                    f"tree path {list(path)} is {len(path)} deep but the profile has {self.num_heads} heads"
                )
            if max(path) >= self.topk:
                raise MedusaError(
                    f"tree path {list(path)} uses rank {max(path)}, but the profile measured only top-{self.topk}"
                )

    def to_dict(self) -> dict:
        kept = sorted(self.path_counts.items(), key=lambda item: (-item[1], len(item[0]), item[0]))[:KEPT_PATHS]
        extra = {} if self.position_ranks is None else {"position_ranks": self.position_ranks.to_dict(self.topk)}
        return {
            "num_heads": self.num_heads,
            "topk": self.topk,
            "accuracy": [[round(a, 6) for a in row] for row in self.accuracy],
            "samples": self.samples,
            "heads_fingerprint": self.heads_fingerprint,
            "head_type": self.head_type,
            "reference": self.reference,
            "path_counts": [[list(path), count] for path, count in kept],
            **extra,
        }

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | Path) -> HeadProfile:
        path = Path(path)
        if not path.is_file():
            raise MedusaError(f"no tree profile at {path}; run `medusa tree profile` first")
        return cls.from_dict(read_json(path, "tree profile"), str(path))

    @classmethod
    def from_dict(cls, raw: object, origin: str = "tree profile") -> HeadProfile:
        def fail(why: str) -> MedusaError:
            return MedusaError(f"{origin}: {why}")

        if not isinstance(raw, dict):
            raise fail("expected a JSON object with num_heads, topk, accuracy and samples")
        for key in ("num_heads", "topk", "samples"):
            value = raw.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "samples" else 1):
                raise fail(
                    f"{key} must be a {'non-negative' if key == 'samples' else 'positive'} integer, got {value!r}"
                )
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
            if not (
                isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list) and isinstance(entry[1], int)
            ):
                raise fail(f"path_counts entries are [path, count], got {entry!r:.60}")
            path, count = tuple(entry[0]), entry[1]
            if not path or len(path) > num_heads or not all(isinstance(r, int) and 0 <= r < topk for r in path):
                raise fail(f"path {list(path)} in path_counts does not fit {num_heads} heads of top-{topk}")
            if not 0 <= count <= samples:
                raise fail(f"path {list(path)} has count {count}, outside 0..{samples}")
            counts[path] = count
        fingerprint = raw.get("heads_fingerprint")
        head_type = raw.get("head_type", "medusa")
        if head_type not in HEAD_TYPES:
            raise fail(f"head_type must be one of {', '.join(HEAD_TYPES)}, got {head_type!r}")
        position_ranks = None
        if raw.get("position_ranks") is not None:
            position_ranks = PositionRanks.from_dict(raw["position_ranks"], num_heads, topk, samples, fail)
        return cls(
            num_heads,
            topk,
            [[float(a) for a in row] for row in accuracy],
            samples,
            fingerprint if isinstance(fingerprint, str) else None,
            counts,
            str(raw.get("reference", REFERENCE)),
            position_ranks,
            head_type,
        )


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
    walk_positions: int = WALK_POSITIONS,
    lookup_ngram: int | None = DEFAULT_MAX_NGRAM,
) -> HeadProfile:
    """Measure the heads at every position t of ``sequences`` (each with ``input_ids`` and ``loss_mask``,
    True on assistant tokens) whose next ``num_heads + 1`` tokens are all assistant tokens.

    So a turn is measured from its prompt's last token (whose hidden state feeds the first decoding step)
    up to the last position whose deepest head still aims inside the turn. Sequential heads read the greedy
    tokens on their path (see the module's docstring). The rank paths of the first
    ``walk_positions`` positions are kept as ``position_ranks`` for the walk estimate, with what a lookup
    branch searching suffixes of up to ``lookup_ngram`` tokens accepts there (None: not measured).
    """
    if lookup_ngram is not None:
        check_lookup(MAX_LOOKUP_NODES, lookup_ngram)
    num_heads = heads.config.num_heads
    vocab = heads.config.vocab_size
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= vocab:
        raise MedusaError(f"topk must be between 1 and the vocabulary size {vocab}, got {topk!r}")
    device = model_device(base_model)
    hits = torch.zeros(num_heads, topk, dtype=torch.long, device=device)
    offsets = torch.arange(1, num_heads + 1, device=device)
    counts: Counter[tuple[int, ...]] = Counter()
    samples = 0
    kept_ranks: list[torch.Tensor] = []  # [positions, heads] per sequence, for the walk
    kept_lookup: list[torch.Tensor] = []  # [positions] per sequence: the lookup branch's accepted depth
    kept_segments: list[int] = []
    kept = 0
    for sequence in sequences:
        ids = torch.as_tensor(sequence.input_ids, dtype=torch.long, device=device)
        answer = torch.as_tensor(sequence.loss_mask, dtype=torch.bool, device=device)
        if ids.shape != answer.shape:
            raise MedusaError(f"input_ids and loss_mask differ in length ({ids.numel()} and {answer.numel()})")
        measured = torch.zeros(0, dtype=torch.long, device=device)
        kept_before = kept
        if ids.numel() > num_heads + 1:
            # t is measured when tokens t + 1 .. t + num_heads + 1 all belong to an answer
            measured = answer[1:].unfold(0, num_heads + 1, 1).all(dim=-1).nonzero().flatten()
        if measured.numel():
            output = base_model(input_ids=ids[None], output_hidden_states=True, use_cache=False)
            greedy = output.logits[0].argmax(-1)  # [len]: the base model's token after each position
            hidden = heads.prefix_states(output.hidden_states[-1])[0]  # [len, hidden]: what the heads read
            for start in range(0, measured.numel(), chunk):
                positions = measured[start : start + chunk]
                # head k aims at greedy[t + k + 1]; a sequential head reads the tokens before, greedy[t : t + k + 1]
                path = greedy[positions[:, None] + offsets[None, :] - 1] if heads.config.sequential else None
                guesses = heads(hidden[positions], path).topk(topk, dim=-1).indices  # [heads, chunk, topk]
                targets = greedy[positions[None, :] + offsets[:, None]]  # [heads, chunk]
                match = guesses == targets[..., None]
                hits += match.sum(dim=1)
                rank = torch.where(match.any(-1), match.float().argmax(-1), -1)  # [heads, chunk], -1: missed
                # only the path down to the first miss can be accepted: cut every rank after it
                alive = (rank >= 0).long().cumprod(dim=0).bool()
                rank = torch.where(alive, rank, -1).cpu()
                _count_paths(rank, counts)
                samples += positions.numel()
                if kept < walk_positions:
                    take = min(positions.numel(), walk_positions - kept)
                    kept_ranks.append(rank[:, :take].T.to(torch.int16))
                    kept += take
            # the runs of consecutive positions (one per answer) among those kept from this sequence
            if lookup_ngram is not None and kept > kept_before:
                kept_lookup.append(
                    lookup_depths(ids, greedy, answer, measured[: kept - kept_before], lookup_ngram).cpu()
                )
            kept_here = measured[: kept - kept_before].cpu()
            if kept_here.numel():
                breaks = (kept_here.diff() != 1).nonzero().flatten() + 1
                bounds = [0, *breaks.tolist(), kept_here.numel()]
                kept_segments += [b - a for a, b in zip(bounds, bounds[1:])]
        if progress is not None:
            progress(1)
    accuracy = (hits.double() / max(samples, 1)).cpu().tolist()
    position_ranks = None
    if walk_positions > 0:
        ranks = torch.cat(kept_ranks).numpy() if kept_ranks else np.zeros((0, num_heads), dtype=np.int16)
        lookup = None
        if lookup_ngram is not None:
            lookup = torch.cat(kept_lookup).numpy() if kept_lookup else np.zeros(0, dtype=np.uint8)
        position_ranks = PositionRanks(
            ranks, np.asarray(kept_segments, dtype=np.int64), lookup, lookup_ngram or DEFAULT_MAX_NGRAM
        )
    return HeadProfile(
        num_heads,
        topk,
        accuracy,
        samples,
        fingerprint,
        dict(counts),
        position_ranks=position_ranks,
        head_type=heads.config.head_type,
    )


def lookup_depths(
    ids: torch.Tensor,
    greedy: torch.Tensor,
    answer: torch.Tensor,
    positions: torch.Tensor,
    max_ngram: int,
    chunk: int = 256,
) -> torch.Tensor:
    """``[positions]`` uint8: how many lookup guesses a step started at each position t accepts, up to
    ``MAX_LOOKUP_NODES``, by the decoder's own search (``ngram_continuation``).

    At t the decoder's text ends with the step's root, the base model's token after t (``greedy[t]``);
    the guess at depth i aims at position t + 1 + i and is accepted, the path above it being right,
    when it equals ``greedy[t + i]``. Guesses past the answer's end do not count.

    ``chunk`` positions are searched at once, each as one row of the decoder's token buffer: ``ids[: t + 1]``,
    then ``greedy[t]``; the search reads nothing past a row's text, so the rows share one width.
    """
    length = ids.numel()
    device = ids.device
    offsets = torch.arange(1, MAX_LOOKUP_NODES + 1, device=device)
    # The decoder's buffer is never shorter than its chain: room for the text, its root and a spare chain.
    slots = torch.arange(length + 1 + MAX_LOOKUP_NODES, device=device)
    text = torch.cat((ids, torch.zeros(1 + MAX_LOOKUP_NODES, dtype=ids.dtype, device=device)))
    depths = []
    for start in range(0, positions.numel(), chunk):
        t = positions[start : start + chunk].to(device)[:, None]  # [rows, 1]
        history = torch.where(slots <= t, text, torch.where(slots == t + 1, greedy[t], 0))  # [rows, slots]
        guesses = ngram_continuation(history, t[:, 0] + 1, max_ngram, MAX_LOOKUP_NODES)  # [rows, nodes]
        aims = t + 1 + offsets  # the positions the guesses are for
        inside = aims < length
        aims = aims.clamp_max(length - 1)
        right = inside & answer[aims] & (guesses == greedy[(t + offsets).clamp_max(length - 1)])
        depths.append(right.long().cumprod(1).sum(1))
    return torch.cat(depths).to(torch.uint8) if depths else torch.zeros(0, dtype=torch.uint8, device=device)


def _count_paths(rank: torch.Tensor, counts: Counter[tuple[int, ...]]) -> None:
    """Count, for every depth, the rank paths that are right all the way down: ``rank`` is ``[heads, positions]``,
    cut after the first miss (-1 from there on)."""
    for depth in range(rank.shape[0]):
        columns = rank[depth] >= 0
        if not columns.any():
            break
        paths, numbers = torch.unique(rank[: depth + 1, columns].T, dim=0, return_counts=True)
        for path, number in zip(paths.tolist(), numbers.tolist()):
            counts[tuple(path)] += number


def joint_chance(profile: HeadProfile, path: Sequence[int]) -> float:
    return profile.path_counts.get(tuple(path), 0) / profile.samples if profile.samples else 0.0


def paper_chance(profile: HeadProfile, path: Sequence[int]) -> float:
    return math.prod(profile.accuracy[depth][rank] for depth, rank in enumerate(path))
