"""The tuned trees beside the heads: the best tree for each kind of device, chosen by ``medusa tree tune``.

``tuned_trees.json`` maps a device kind ("cpu", or the CUDA device's name such as "NVIDIA H100 80GB
HBM3") to a tree and the numbers it was chosen by. Loading heads picks the entry for the device they
run on; a tree given explicitly always wins. An entry's tree has no lookup branch; when a tree with a
lookup chain is faster still, the entry's ``lookup`` object holds that one too, and single-sequence
decoding uses it. ``batches`` holds a tree per batch bucket, chosen from the step cost at that batch
size (the more rows, the fewer nodes pay); the engine runs each bucket with its own.

For heads shipped inside the package, ``medusa tree tune`` writes to the user's copy
(``medusa.paths.user_heads_directory``); its entries win over the shipped file's, device by device. Heads with
no entry for the device get a tree chosen for its kind (``choose_tree``): on a GPU, another GPU's entry.

The format lives here, in the core, because loading reads it; ``medusa.treeopt`` only produces it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from medusa.errors import MedusaError
from medusa.files import read_json, write_json
from medusa.lookup import DEFAULT_MAX_NGRAM, check_lookup
from medusa.paths import heads_file, is_shipped, user_heads_directory
from medusa.tree import Tree, default_tree, load_tree

TUNED_FILE = "tuned_trees.json"
TREE_FILE = "tree.json"
# Without a tuned tree, a CPU decodes with this small default tree: every node costs it time (a 64-node
# tree ran 5x slower than the tuned one on SmolLM2-135M), while a GPU verifies 64 nodes in about one step's time.
CPU_DEFAULT_TREE_SIZE = 8


def device_kind(device: torch.device | str) -> str:
    """ "cpu", the CUDA device's name, or the device type for anything else."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


@dataclass
class ChainedTree:
    """The tuned tree with a lookup chain (JSON: the entry's ``lookup`` object) and the numbers it was chosen by."""

    paths: list[list[int]]
    lookup: int  # nodes of the lookup chain besides the heads' paths
    topk: int | None = None
    nodes: int | None = None  # root, heads' paths and chain
    lookup_ngram: int | None = None
    expected_accept_length: float | None = None
    step_seconds: float | None = None
    expected_tokens_per_second: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "lookup": self.lookup,
            "lookup_ngram": self.lookup_ngram,
            "topk": self.topk,
            "paths": self.paths,
            "expected_accept_length": self.expected_accept_length,
            "step_seconds": self.step_seconds,
            "expected_tokens_per_second": self.expected_tokens_per_second,
        }

    @classmethod
    def from_json(cls, raw: Any, origin: str) -> ChainedTree:
        if not isinstance(raw, dict):
            raise MedusaError(f"{origin} has a 'lookup' entry that is not an object")
        origin = f"{origin} (its lookup tree)"
        if "paths" not in raw:
            raise MedusaError(f"{origin} has no 'paths' list")
        return cls(**{f.name: raw.get(f.name) for f in fields(cls)})


@dataclass
class BatchTree:
    """The tree a batch bucket runs (JSON: ``batches[str(bucket)]``): the heads' paths with a lookup chain, chosen
    from the cost curve measured at that batch size. ``paths`` empty and ``lookup`` 0: the root alone, plain
    decoding, where no tree pays at that size."""

    paths: list[list[int]]
    lookup: int = 0
    topk: int | None = None
    nodes: int | None = None
    expected_accept_length: float | None = None
    step_seconds: float | None = None
    expected_tokens_per_second: float | None = None  # per row

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, raw: Any, origin: str) -> BatchTree:
        if not isinstance(raw, dict) or "paths" not in raw:
            raise MedusaError(f"{origin} is not an object with a 'paths' list")
        return cls(**{f.name: raw.get(f.name) for f in fields(cls) if f.name in raw})


@dataclass
class TunedTree:
    """One device's entry in ``tuned_trees.json``: the heads' tree chosen for it and what it was chosen by.

    Only ``paths`` is required (hand-written entries hold little more); the tuner fills every field.
    """

    paths: list[list[int]]
    topk: int | None = None
    nodes: int | None = None
    num_heads: int | None = None  # the heads it was tuned for; loading refuses other heads
    estimate: str | None = None
    expected_accept_length: float | None = None
    step_seconds: float | None = None
    expected_tokens_per_second: float | None = None
    heads_fingerprint: str | None = None
    profile_samples: int | None = None
    max_new_tokens: int | None = None
    max_nodes: int | None = None
    cost_curve: list[dict] | None = None  # [{"nodes", "seconds"}] the choice was made on
    chained: ChainedTree | None = None  # JSON key "lookup"
    batches: dict[int, BatchTree] | None = None  # per batch bucket (JSON key "batches", keyed by str(bucket))

    def to_json(self) -> dict[str, Any]:
        entry = {
            "nodes": self.nodes,
            "topk": self.topk,
            "paths": self.paths,
            "num_heads": self.num_heads,
            "estimate": self.estimate,
            "expected_accept_length": self.expected_accept_length,
            "step_seconds": self.step_seconds,
            "expected_tokens_per_second": self.expected_tokens_per_second,
            "heads_fingerprint": self.heads_fingerprint,
            "profile_samples": self.profile_samples,
            "max_new_tokens": self.max_new_tokens,
            "max_nodes": self.max_nodes,
            "cost_curve": self.cost_curve,
        }
        if self.chained is not None:
            entry["lookup"] = self.chained.to_json()
        if self.batches:
            entry["batches"] = {str(bucket): tree.to_json() for bucket, tree in sorted(self.batches.items())}
        return entry

    @classmethod
    def from_json(cls, raw: Any, origin: str) -> TunedTree:
        """An entry read from the file; ``origin`` names it in errors ("the tuned tree for 'cpu' in DIR/...")."""
        if not isinstance(raw, dict):
            raise MedusaError(f"{origin} is not an object")
        if "paths" not in raw:
            raise MedusaError(f"{origin} has no 'paths' list")
        chained = ChainedTree.from_json(raw["lookup"], origin) if raw.get("lookup") is not None else None
        batches = raw.get("batches")
        if batches is not None:
            if not isinstance(batches, dict) or not all(str(key).isdigit() for key in batches):
                raise MedusaError(f"{origin} has a 'batches' entry that is not an object keyed by batch size")
            batches = {int(key): BatchTree.from_json(value, f"{origin}, batch {key}") for key, value in batches.items()}
        plain = {f.name: raw.get(f.name) for f in fields(cls) if f.name not in ("chained", "batches")}
        return cls(**plain, chained=chained, batches=batches)

    def batch_trees(self, num_heads: int, origin: str) -> dict[int, Tree]:
        """Each tuned batch bucket's tree."""
        trees = {}
        for bucket, entry in (self.batches or {}).items():
            try:
                check_lookup(entry.lookup, DEFAULT_MAX_NGRAM)
                trees[bucket] = Tree.from_paths(entry.paths, topk=entry.topk, num_heads=num_heads, lookup=entry.lookup)
            except MedusaError as error:
                raise MedusaError(f"{origin}, batch {bucket}: {error}") from None
        return trees

    def tree(self, num_heads: int, origin: str, chained: bool = False) -> Tree:
        """The tree for heads of ``num_heads``; with ``chained``, the tree with a lookup chain where there is one."""
        if self.num_heads is not None and self.num_heads != num_heads:
            raise MedusaError(f"{origin} was tuned for {self.num_heads} heads, but these heads have {num_heads}")
        entry, chain = self, 0
        if chained and self.chained is not None:
            entry, origin, chain = self.chained, f"{origin} (its lookup tree)", self.chained.lookup
        try:
            check_lookup(chain, DEFAULT_MAX_NGRAM)
            return Tree.from_paths(entry.paths, topk=entry.topk, num_heads=num_heads, lookup=chain)
        except MedusaError as error:
            raise MedusaError(f"{origin}: {error}") from None


def _read_file(path: Path) -> dict[str, dict]:
    """Every device's raw entry in one file ({} when there is no file)."""
    if not path.is_file():
        return {}
    raw = read_json(path, "tuned trees")
    devices = raw.get("devices") if isinstance(raw, dict) else None
    if not isinstance(devices, dict) or not all(isinstance(entry, dict) for entry in devices.values()):
        raise MedusaError(f'tuned trees {path} must be {{"devices": {{device kind: {{"topk", "paths", ...}}}}}}')
    return devices


def _read_entries(directory: str | Path) -> dict[str, dict]:
    """Every device's raw entry beside the heads; for shipped heads, the user's entries over the shipped ones."""
    devices = _read_file(Path(directory) / TUNED_FILE)
    if is_shipped(directory):
        devices |= _read_file(user_heads_directory(directory) / TUNED_FILE)
    return devices


def tuned_file(directory: str | Path, kind: str) -> Path:
    """The file that holds ``kind``'s entry: the user's copy when it has one (shipped heads), else the heads' own."""
    user = user_heads_directory(directory) / TUNED_FILE
    return user if kind in _read_file(user) else Path(directory) / TUNED_FILE


def _origin(directory: str | Path, kind: str) -> str:
    return f"the tuned tree for {kind!r} in {tuned_file(directory, kind)}"


def read_tuned_trees(directory: str | Path) -> dict[str, TunedTree]:
    """Every device's entry in ``directory/tuned_trees.json`` ({} when there is no file)."""
    return {kind: TunedTree.from_json(raw, _origin(directory, kind)) for kind, raw in _read_entries(directory).items()}


def write_tuned_tree(directory: str | Path, kind: str, entry: TunedTree) -> Path:
    """Add or replace one device's entry, keeping the others as they are written; written atomically, to the
    user's copy for shipped heads (the package is read-only to every command)."""
    path = user_heads_directory(directory) / TUNED_FILE
    devices = _read_file(path)
    devices[kind] = entry.to_json()
    write_json(path, {"devices": devices}, indent=1)
    return path


def _batch_trees_of(directory: str | Path, kind: str, num_heads: int) -> dict[int, Tree]:
    """The trees tuned per batch bucket in ``kind``'s entry beside the heads ({} when none were)."""
    raw = _read_entries(directory).get(kind)
    return (
        {}
        if raw is None
        else TunedTree.from_json(raw, _origin(directory, kind)).batch_trees(num_heads, _origin(directory, kind))
    )


def tuned_tree(directory: str | Path, device: torch.device | str, num_heads: int, chained: bool = False) -> Tree | None:
    """The tree tuned for this device kind beside the heads, or None when there is none; with ``chained``,
    the faster tree with a lookup chain where the tuner found one.

    Only this device's entry is read, so an entry for another device never stops loading here.
    """
    return _tree_of(directory, device_kind(device), num_heads, chained)


def _tree_of(directory: str | Path, kind: str, num_heads: int, chained: bool = False) -> Tree | None:
    raw = _read_entries(directory).get(kind)
    if raw is None:
        return None
    origin = _origin(directory, kind)
    return TunedTree.from_json(raw, origin).tree(num_heads, origin, chained)


def _is_gpu_kind(kind: str) -> bool:
    """A CUDA device's name ("NVIDIA H100 80GB HBM3"), not a device type ("cpu", "mps")."""
    try:
        torch.device(kind)
    except (RuntimeError, ValueError):
        return True
    return False


def borrowed_gpu_kind(directory: str | Path, device: torch.device | str) -> str | None:
    """For a GPU with no entry of its own, another GPU's (the first by name), else None.

    A tree tuned on another GPU, with its lookup chain and its smaller trees for large batches, is a closer guess
    for this one than the heads' untuned 64-node tree: GPUs verify tens of nodes in about one step's time, and
    they differ mostly in where extra nodes stop paying. The shipped heads are tuned on the GPUs this project was
    lent; an H200 decoded with the H100's trees, for example, until one is tuned for it.
    """
    if torch.device(device).type != "cuda":
        return None
    entries = _read_entries(directory)
    if device_kind(device) in entries:
        return None
    return next((kind for kind in sorted(entries) if _is_gpu_kind(kind)), None)


@dataclass(frozen=True)
class TreeChoice:
    """The trees loaded heads decode with, and a sentence saying where they came from (commands print it)."""

    tree: Tree  # single sequences: may carry a lookup chain
    heads_tree: Tree  # lookup=0: no chain
    batch_trees: dict[int, Tree]  # tuned per batch bucket ({} when none were)
    origin: str
    tuned: bool  # False: a fallback worth tuning
    directory: Path  # the heads directory whose files it was chosen from (export copies them, not this device's pick)


def _entry_choice(directory: Path, kind: str, num_heads: int, borrowed_hint: str | None = None) -> TreeChoice:
    """The trees of ``kind``'s entry; ``borrowed_hint``, when this device has no entry of its own and borrows
    another's, says how to tune one."""
    tree = _tree_of(directory, kind, num_heads, chained=True)
    size = f"{tree.size} node{'' if tree.size == 1 else 's'}"
    return TreeChoice(
        tree,
        _tree_of(directory, kind, num_heads),
        _batch_trees_of(directory, kind, num_heads),
        f"the tree tuned for {kind!r} in {tuned_file(directory, kind)} "
        f"({size}{'' if borrowed_hint is None else '; ' + borrowed_hint})",
        tuned=borrowed_hint is None,
        directory=directory,
    )


def choose_tree(directory: str | Path, device: torch.device | str, num_heads: int) -> TreeChoice:
    """The trees for heads in ``directory`` on ``device``: the ones tuned for this device kind; else, on a GPU,
    those tuned for another GPU (``borrowed_gpu_kind``); else, on a CPU, a small default tree (every node costs a
    CPU time); else the heads' own ``tree.json``; else the 64-node default."""
    directory = Path(directory)
    kind = device_kind(device)
    if kind in _read_entries(directory):
        return _entry_choice(directory, kind, num_heads)
    hint = (
        f"no tree is tuned for {kind!r} beside these heads; "
        f"`medusa tree profile` then `medusa tree tune --heads {directory}` tunes one"
    )
    other = borrowed_gpu_kind(directory, device)
    if other is not None:
        return _entry_choice(directory, other, num_heads, hint)
    own = heads_file(directory, TREE_FILE)
    own_tree = load_tree(own, num_heads) if own.is_file() else None
    on_cpu = torch.device(device).type == "cpu"
    if own_tree is not None and (not on_cpu or own_tree.size <= CPU_DEFAULT_TREE_SIZE):
        return TreeChoice(
            own_tree,
            own_tree,
            {},
            f"the heads' own tree {own} ({own_tree.size} nodes; {hint})",
            tuned=False,
            directory=directory,
        )
    if on_cpu:
        tree = default_tree(CPU_DEFAULT_TREE_SIZE, num_heads)
        return TreeChoice(
            tree, tree, {}, f"the {tree.size}-node default tree for the CPU ({hint})", tuned=False, directory=directory
        )
    tree = load_tree(None, num_heads)
    return TreeChoice(tree, tree, {}, f"the {tree.size}-node default tree ({hint})", tuned=False, directory=directory)
