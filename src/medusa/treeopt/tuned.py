"""The tuned trees beside the heads: the best tree for each kind of device, chosen by ``medusa tree tune``.

``tuned_trees.json`` maps a device kind ("cpu", or the CUDA device's name such as "NVIDIA H100 80GB
HBM3") to a tree and the numbers it was chosen by. Loading heads picks the entry for the device they
run on; a tree given explicitly always wins. An entry's tree has no lookup branch (batched decoding
has none); when a tree with a lookup chain is faster still, the entry's ``lookup`` holds that one too,
and single-sequence decoding uses it.

For heads shipped inside the package, ``medusa tree tune`` writes to the user's copy
(``medusa.paths.user_heads_directory``); its entries win over the shipped file's, device by device.
Heads with no entry for the device get a tree chosen for its kind (``choose_tree``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from medusa.errors import MedusaError
from medusa.lookup import DEFAULT_MAX_NGRAM, check_lookup
from medusa.paths import heads_file, is_shipped, user_heads_directory
from medusa.tree import Tree, default_tree, load_tree

TUNED_FILE = "tuned_trees.json"
TREE_FILE = "tree.json"
# Without a tuned tree, a CPU decodes with this small default tree: every node costs it time (a 64-node
# tree ran 5x slower than the tuned one on SmolLM2-135M), while a GPU verifies 64 nodes in about one step's time.
CPU_DEFAULT_TREE_SIZE = 8


def device_kind(device: torch.device | str) -> str:
    """"cpu", the CUDA device's name, or the device type for anything else."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def read_tuned_trees(directory: str | Path) -> dict[str, dict]:
    """Every device's entry in ``directory/tuned_trees.json`` ({} when there is no file); for shipped heads,
    the user's entries over the shipped ones."""
    devices = _read_tuned_file(Path(directory) / TUNED_FILE)
    if is_shipped(directory):
        devices |= _read_tuned_file(user_heads_directory(directory) / TUNED_FILE)
    return devices


def _read_tuned_file(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MedusaError(f"tuned trees {path} are not valid JSON: {error}") from None
    devices = raw.get("devices") if isinstance(raw, dict) else None
    if not isinstance(devices, dict) or not all(isinstance(entry, dict) for entry in devices.values()):
        raise MedusaError(f"tuned trees {path} must be {{\"devices\": {{device kind: {{\"topk\", \"paths\", ...}}}}}}")
    return devices


def tuned_file(directory: str | Path, kind: str) -> Path:
    """The file that holds ``kind``'s entry: the user's copy when it has one (shipped heads), else the heads' own."""
    user = user_heads_directory(directory) / TUNED_FILE
    return user if kind in _read_tuned_file(user) else Path(directory) / TUNED_FILE


def write_tuned_tree(directory: str | Path, kind: str, entry: dict) -> Path:
    """Add or replace one device's entry, keeping the others; written atomically, to the user's copy for shipped heads."""
    path = user_heads_directory(directory) / TUNED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    devices = _read_tuned_file(path)
    devices[kind] = entry
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({"devices": devices}, indent=1) + "\n")
    temporary.replace(path)
    return path


def tuned_tree(directory: str | Path, device: torch.device | str, num_heads: int, lookup: bool = False) -> Tree | None:
    """The tree tuned for this device kind beside the heads, or None when there is none; with ``lookup``,
    the faster tree with a lookup chain where the tuner found one."""
    kind = device_kind(device)
    entry = read_tuned_trees(directory).get(kind)
    if entry is None:
        return None
    origin = f"the tuned tree for {kind!r} in {tuned_file(directory, kind)}"
    if entry.get("num_heads", num_heads) != num_heads:
        raise MedusaError(f"{origin} was tuned for {entry['num_heads']} heads, but these heads have {num_heads}")
    chained, chain = entry.get("lookup"), 0
    if lookup and chained is not None:
        if not isinstance(chained, dict):
            raise MedusaError(f"{origin} has a 'lookup' entry that is not an object")
        entry, origin, chain = chained, f"{origin} (its lookup tree)", chained.get("lookup")
    if "paths" not in entry:
        raise MedusaError(f"{origin} has no 'paths' list")
    try:
        check_lookup(chain, DEFAULT_MAX_NGRAM)
        return Tree.from_paths(entry["paths"], topk=entry.get("topk"), num_heads=num_heads, lookup=chain)
    except MedusaError as error:
        raise MedusaError(f"{origin}: {error}") from None


@dataclass(frozen=True)
class TreeChoice:
    """The trees loaded heads decode with, and a sentence saying where they came from (commands print it)."""

    tree: Tree  # single sequences: may carry a lookup chain
    plain_tree: Tree  # batches and lookup=0: no chain
    origin: str
    tuned: bool  # False: a fallback worth tuning
    directory: Path  # the heads directory whose files it was chosen from (export copies them, not this device's pick)


def choose_tree(directory: str | Path, device: torch.device | str, num_heads: int) -> TreeChoice:
    """The tree for heads in ``directory`` on ``device``: the one tuned for this device kind; else, on a CPU, the
    small default tree; else the heads' own ``tree.json``; else the 64-node default tree."""
    directory = Path(directory)
    tree = tuned_tree(directory, device, num_heads, lookup=True)
    if tree is not None:
        plain = tuned_tree(directory, device, num_heads)
        kind = device_kind(device)
        return TreeChoice(tree, plain, f"the tree tuned for {kind!r} in {tuned_file(directory, kind)} ({tree.size} node{'' if tree.size == 1 else 's'})",
                          tuned=True, directory=directory)
    hint = (f"no tree is tuned for {device_kind(device)!r} beside these heads; "
            f"`medusa tree profile` then `medusa tree tune --heads {directory}` tunes one")
    own = heads_file(directory, TREE_FILE)
    own_tree = load_tree(own, num_heads) if own.is_file() else None
    on_cpu = torch.device(device).type == "cpu"
    if own_tree is not None and (not on_cpu or own_tree.size <= CPU_DEFAULT_TREE_SIZE):
        return TreeChoice(own_tree, own_tree, f"the heads' own tree {own} ({own_tree.size} nodes; {hint})", tuned=False, directory=directory)
    if on_cpu:
        tree = default_tree(CPU_DEFAULT_TREE_SIZE, num_heads)
        return TreeChoice(tree, tree, f"the {tree.size}-node default tree for the CPU ({hint})", tuned=False, directory=directory)
    tree = load_tree(None, num_heads)
    return TreeChoice(tree, tree, f"the {tree.size}-node default tree ({hint})", tuned=False, directory=directory)
