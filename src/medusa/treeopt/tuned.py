"""The tuned trees beside the heads: the best tree for each kind of device, chosen by ``medusa tree tune``.

``tuned_trees.json`` maps a device kind ("cpu", or the CUDA device's name such as "NVIDIA H100 80GB
HBM3") to a tree and the numbers it was chosen by. Loading heads picks the entry for the device they
run on; a tree given explicitly always wins. An entry's tree has no lookup branch (batched decoding
has none); when a tree with a lookup chain is faster still, the entry's ``lookup`` holds that one too,
and single-sequence decoding uses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medusa.errors import MedusaError
from medusa.files import write_json
from medusa.lookup import DEFAULT_MAX_NGRAM, check_lookup
from medusa.tree import Tree

TUNED_FILE = "tuned_trees.json"


def device_kind(device: torch.device | str) -> str:
    """"cpu", the CUDA device's name, or the device type for anything else."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def read_tuned_trees(directory: str | Path) -> dict[str, dict]:
    """Every device's entry in ``directory/tuned_trees.json`` ({} when there is no file)."""
    path = Path(directory) / TUNED_FILE
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


def write_tuned_tree(directory: str | Path, kind: str, entry: dict) -> Path:
    """Add or replace one device's entry, keeping the others; written atomically."""
    path = Path(directory) / TUNED_FILE
    devices = read_tuned_trees(directory)
    devices[kind] = entry
    write_json(path, {"devices": devices}, indent=1)
    return path


def tuned_tree(directory: str | Path, device: torch.device | str, num_heads: int, lookup: bool = False) -> Tree | None:
    """The tree tuned for this device kind beside the heads, or None when there is none; with ``lookup``,
    the faster tree with a lookup chain where the tuner found one."""
    kind = device_kind(device)
    entry = read_tuned_trees(directory).get(kind)
    if entry is None:
        return None
    origin = f"the tuned tree for {kind!r} in {Path(directory) / TUNED_FILE}"
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
