"""Training checkpoints: safetensors for tensors, JSON for the rest, written atomically. No pickle.

A checkpoint is a directory ``step-NNNNNNNN`` holding the trainable weights, the optimizer's tensors
(flattened to ``state.<param>.<name>`` keys; its scalars and param groups go to JSON), the RNG states
and ``state.json`` (step, data position, scheduler, config). It is written under a temporary name,
fsynced and renamed into place (``medusa.files``), then ``latest.json`` is replaced to point at it: a kill
at any moment leaves the previous checkpoint intact and no partial checkpoint behind a final name; the
temporaries a kill leaves are removed before the next save (and when a training run starts).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medusa.errors import MedusaError
from medusa.files import atomic_directory, remove_stale_temporaries, write_json

LATEST = "latest.json"
WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
STATE = "state.json"


@dataclass
class Checkpoint:
    step: int
    weights: dict[str, torch.Tensor]
    optimizer: dict  # an optimizer state_dict
    state: dict  # JSON: scheduler, data position, config, anything else
    rng: dict[str, torch.Tensor]


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` into safetensors-ready tensors and a JSON-ready structure."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for param_id, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    structure = {"scalars": scalars, "param_groups": state_dict["param_groups"]}
    return tensors, structure


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state: dict[int, dict] = {}
    for key, tensor in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = tensor
    for param_id, values in structure["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": structure["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a flattened-and-restored state; tuples that JSON turned into lists (betas) become tuples again."""
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        for key, value in group.items():
            if isinstance(value, tuple) and isinstance(saved_group.get(key), list):
                saved_group[key] = tuple(saved_group[key])
    optimizer.load_state_dict(saved)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: str | Path, checkpoint: Checkpoint, keep: int = 2) -> Path:
    """Write ``root/step-N`` atomically, point ``latest.json`` at it, keep the newest ``keep`` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root)
    name = f"step-{checkpoint.step:08d}"
    final = root / name
    # The same step written again (a resumed run's end) replaces the old directory only once the new one is whole.
    with atomic_directory(final) as temporary:
        weights = {key: value.detach().contiguous().cpu() for key, value in checkpoint.weights.items()}
        save_file(weights, str(temporary / WEIGHTS), metadata={"format": "pt"})
        optimizer_tensors, optimizer_structure = flatten_optimizer_state(checkpoint.optimizer)
        save_file(optimizer_tensors, str(temporary / OPTIMIZER), metadata={"format": "pt"})
        save_file({k: v.contiguous() for k, v in checkpoint.rng.items()}, str(temporary / RNG))
        state = {"step": checkpoint.step, "optimizer": optimizer_structure, **checkpoint.state}
        (temporary / STATE).write_text(json.dumps(state, indent=2) + "\n")  # the whole directory is fsynced
    write_json(root / LATEST, {"step": checkpoint.step, "directory": name})
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``latest.json`` names, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    try:
        directory = Path(root) / json.loads(pointer.read_text())["directory"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise MedusaError(f"checkpoint pointer {pointer} is unreadable ({error}); delete it to start over") from None
    if not (directory / STATE).is_file():
        raise MedusaError(f"checkpoint pointer {pointer} names {directory}, which is missing or incomplete")
    return directory


def read_state(directory: str | Path) -> dict:
    """A checkpoint's ``state.json`` alone (step, scheduler, the run's config): cheap, for checks before loading."""
    path = Path(directory) / STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise MedusaError(f"checkpoint {directory} is unreadable: {error}") from None
    if not isinstance(state, dict):
        raise MedusaError(f"checkpoint {path} does not hold a JSON object")
    return state


def load_checkpoint(directory: str | Path) -> Checkpoint:
    directory = Path(directory)
    state = read_state(directory)
    try:
        weights = load_file(str(directory / WEIGHTS))
        optimizer = unflatten_optimizer_state(load_file(str(directory / OPTIMIZER)), state.pop("optimizer"))
        rng = load_file(str(directory / RNG))
    except (OSError, json.JSONDecodeError, KeyError) as error:
        raise MedusaError(f"checkpoint {directory} is unreadable: {error}") from None
    return Checkpoint(step=state.pop("step"), weights=weights, optimizer=optimizer, state=state, rng=rng)
