"""Medusa heads in other projects' layouts: the original project's checkpoints in and out, vLLM's out.

Users bring heads trained with the original Medusa code (FasterDecoding/Medusa) and leave for serving
engines, so the same heads must read and write three layouts. Head ``i`` is always ``L`` residual
blocks ``x + SiLU(W x + b)`` followed by a bias-free vocabulary projection; only the names differ:

- block j weight ``[H, H]``: ours ``blocks.{i}.{j}.linear.weight``, original ``{i}.{j}.linear.weight``,
  vLLM ``blocks.{i}.layers.{j}.weight`` (and ``.bias`` ``[H]`` alike);
- projection ``[V, H]``: ours ``projections.{i}.weight`` (absent when the heads share the base lm_head),
  original ``{i}.{L}.weight``, vLLM ``lm_heads.{i}.weight`` (or one ``lm_head.weight`` with ``original_lm_head``).

The original layout is a ``config.json`` with ``medusa_num_heads``, ``medusa_num_layers`` and
``base_model_name_or_path`` beside ``medusa_lm_head.safetensors`` or ``medusa_lm_head.pt`` (TensorRT-LLM
reads the same files). A ``.pt`` file is a pickle, and unpickling runs code, so it is read only with
``torch.load(weights_only=True)``: a file that pickles anything but tensors is refused. vLLM's draft
model (``vllm/model_executor/models/medusa.py`` up to vLLM 0.32.0) reads a config with
``model_type: medusa`` and the names above; its blocks carry a bias only when ``medusa_fc_bias`` is set.
Heads that share the base ``lm_head`` have no projection of their own, so export copies the base
weight in (once for vLLM, whose ``original_lm_head`` shares one projection across heads). The original
layout is exported as both files, since the original project's loader reads only ``medusa_lm_head.pt``.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from medusa.errors import MedusaError
from medusa.files import atomic_path, read_json, write_bytes, write_json, write_text
from medusa.heads import CONFIG_NAME, WEIGHTS_NAME, MedusaHeads, MedusaHeadsConfig
from medusa.tree import Tree

if TYPE_CHECKING:
    from transformers import PreTrainedModel

OFFICIAL_SAFETENSORS = "medusa_lm_head.safetensors"
OFFICIAL_PICKLE = "medusa_lm_head.pt"
VLLM_WEIGHTS = "model.safetensors"
TREE_FILE = "tree.json"
FORMATS = ("medusa", "vllm")


class ExportedModel(Protocol):
    """What exporting reads from a ``medusa.model.MedusaModel``.

    Spelled out here because loading (in ``medusa.model``) uses this module: importing the class back would
    tie the two modules in a cycle.
    """

    heads: MedusaHeads | None
    base_model: PreTrainedModel
    name: str
    heads_tree: Tree
    tree_choice: object | None  # medusa.tuned_trees.TreeChoice when loading chose the tree; its files are exported


# ----- which layout a directory holds -----------------------------------------------------------


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    raw = read_json(path, "heads config")
    if not isinstance(raw, dict):
        raise MedusaError(f"heads config {path} is not a JSON object")
    return raw


def foreign_layout(directory: str | Path) -> str | None:
    """``"medusa"`` for the original project's layout, ``"vllm"`` for vLLM's, None for ours (or nothing)."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        return None
    raw = _read_config(directory)
    if "medusa_num_heads" in raw or "medusa_num_layers" in raw:
        return "medusa"
    if raw.get("model_type") == "medusa" and "num_heads" in raw:
        return "vllm"
    if not (directory / WEIGHTS_NAME).is_file() and any(
        (directory / name).is_file() for name in (OFFICIAL_SAFETENSORS, OFFICIAL_PICKLE)
    ):
        return "medusa"
    return None


def load_heads_config(directory: str | Path) -> MedusaHeadsConfig:
    """The heads' config from any layout we read: ours, the original project's or vLLM's."""
    if not Path(directory).is_dir():
        raise MedusaError(f"heads directory {directory} does not exist")
    layout = foreign_layout(directory)
    if layout == "medusa":
        return official_heads_config(directory)
    if layout == "vllm":
        return vllm_heads_config(directory)
    return MedusaHeadsConfig.load(directory)


def load_heads(directory: str | Path, base_lm_head: torch.nn.Module | None = None) -> MedusaHeads:
    """Heads from any layout we read: ours, the original project's or vLLM's, told apart by their config."""
    if not Path(directory).is_dir():
        raise MedusaError(f"heads directory {directory} does not exist")
    layout = foreign_layout(directory)
    if layout == "medusa":
        return load_official_heads(directory, base_lm_head=base_lm_head)
    if layout == "vllm":
        return load_vllm_heads(directory, base_lm_head=base_lm_head)
    return MedusaHeads.from_pretrained(directory, base_lm_head=base_lm_head)


# ----- reading the original layout --------------------------------------------------------------


def read_pickled_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.pt`` state dict of plain tensors, read without running any code it may pickle."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found is None:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
            raise MedusaError(
                f"could not read {path}: torch.load(weights_only=True) rejected it"
                f"{f' ({detail.group(1).strip()})' if detail else ''}; it is not a checkpoint of plain tensors"
            ) from None
        raise MedusaError(
            f"refused {path}: it pickles `{found.group(1)}`, and unpickling that would run code. Only plain tensors "
            f"are read from .pt files (torch.load with weights_only=True); convert the checkpoint to "
            f"{OFFICIAL_SAFETENSORS} with a tool you trust"
        ) from None
    except (RuntimeError, KeyError, EOFError, ValueError, OSError) as error:
        raise MedusaError(f"could not read {path} as a PyTorch checkpoint: {error}") from None
    if not isinstance(state, dict) or not all(
        isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in state.items()
    ):
        raise MedusaError(f"{path} does not hold a state dict of named tensors (got {type(state).__name__})")
    return dict(state)


def read_official_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The original layout's tensors; ``medusa_lm_head.safetensors`` wins over the pickled ``.pt``."""
    directory = Path(directory)
    safetensors_path, pickle_path = directory / OFFICIAL_SAFETENSORS, directory / OFFICIAL_PICKLE
    if safetensors_path.is_file():
        return _load_safetensors(safetensors_path)
    if pickle_path.is_file():
        return read_pickled_weights(pickle_path)
    raise MedusaError(
        f"{directory} has an original Medusa config but neither {OFFICIAL_SAFETENSORS} nor {OFFICIAL_PICKLE} "
        "(Medusa-2 checkpoints that fine-tune the whole model are not heads-only checkpoints and are not read)"
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise MedusaError(f"could not read {path} as safetensors: {error}") from None


def _official_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes without reading the tensors (safetensors header, or a memory-mapped .pt)."""
    path = directory / OFFICIAL_SAFETENSORS
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        except (SafetensorError, OSError) as error:
            raise MedusaError(f"could not read {path} as safetensors: {error}") from None
    return {name: tuple(tensor.shape) for name, tensor in read_official_weights(directory).items()}


def _count(names: set[str], pattern: str) -> int:
    """How many consecutive indices 0, 1, ... appear in names matching ``pattern`` (one ``(\\d+)`` group)."""
    indices = {int(found.group(1)) for name in names if (found := re.fullmatch(pattern, name))}
    count = 0
    while count in indices:
        count += 1
    return count


def official_heads_config(directory: str | Path) -> MedusaHeadsConfig:
    """Our config for an original-layout directory; sizes come from the projection's shape ``[V, H]``."""
    directory = Path(directory)
    raw = _read_config(directory)
    shapes = _official_shapes(directory)
    names = set(shapes)
    num_heads = raw.get("medusa_num_heads", _count(names, r"(\d+)\.0\..*"))
    num_layers = raw.get("medusa_num_layers", _count(names, r"0\.(\d+)\.linear\.weight"))
    for key, value in (("medusa_num_heads", num_heads), ("medusa_num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise MedusaError(f"{directory / CONFIG_NAME}: {key} must be an integer, got {value!r}")
    projection = f"0.{num_layers}.weight"
    if projection not in shapes or len(shapes[projection]) != 2:
        raise MedusaError(
            f"{directory} holds no vocabulary projection {projection!r} of shape [vocab, hidden] for head 0 "
            f"with medusa_num_layers={num_layers}; its tensors start {sorted(names)[:4]}"
        )
    vocab_size, hidden_size = shapes[projection]
    return MedusaHeadsConfig(
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        num_heads=num_heads,
        num_layers=num_layers,
        share_lm_head=False,
        base_model=raw.get("base_model_name_or_path"),
    )


def _take(state: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], source: Path) -> torch.Tensor:
    if name not in state:
        raise MedusaError(f"{source} lacks tensor {name!r} (expected shape {list(shape)})")
    tensor = state[name]
    if tuple(tensor.shape) != shape:
        raise MedusaError(f"{source}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}")
    return tensor


def load_official_heads(directory: str | Path, base_lm_head: torch.nn.Module | None = None) -> MedusaHeads:
    """Heads from the original layout. Heads beyond ``medusa_num_heads`` are ignored, as TensorRT-LLM and vLLM do."""
    directory = Path(directory)
    config = official_heads_config(directory)
    state = read_official_weights(directory)
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_layers
    ours = {}
    for i in range(config.num_heads):
        for j in range(layers):
            ours[f"blocks.{i}.{j}.linear.weight"] = _take(state, f"{i}.{j}.linear.weight", (hidden, hidden), directory)
            ours[f"blocks.{i}.{j}.linear.bias"] = _take(state, f"{i}.{j}.linear.bias", (hidden,), directory)
        ours[f"projections.{i}.weight"] = _take(state, f"{i}.{layers}.weight", (vocab, hidden), directory)
    heads = MedusaHeads(config)
    heads.load_state_dict(ours)
    heads.attach_lm_head(base_lm_head)
    return heads


# ----- reading vLLM's layout --------------------------------------------------------------------


def vllm_heads_config(directory: str | Path) -> MedusaHeadsConfig:
    directory = Path(directory)
    raw = _read_config(directory)
    missing = {"hidden_size", "vocab_size", "num_heads"} - raw.keys()
    if missing:
        raise MedusaError(f"vLLM Medusa config {directory / CONFIG_NAME} lacks {', '.join(sorted(missing))}")
    truncated = raw.get("truncated_vocab_size") or raw["vocab_size"]
    if truncated != raw["vocab_size"]:
        raise MedusaError(
            f"{directory}: heads with a truncated vocabulary ({truncated} of {raw['vocab_size']} tokens) "
            "are not supported"
        )
    return MedusaHeadsConfig(
        hidden_size=raw["hidden_size"],
        vocab_size=raw["vocab_size"],
        num_heads=raw["num_heads"],
        num_layers=raw.get("num_hidden_layers", 1),
        share_lm_head=False,
        base_model=raw.get("base_model_name_or_path"),
    )


def load_vllm_heads(directory: str | Path, base_lm_head: torch.nn.Module | None = None) -> MedusaHeads:
    """Heads from vLLM's layout: biases are read only when ``medusa_fc_bias`` is set (vLLM drops them otherwise)."""
    directory = Path(directory)
    config = vllm_heads_config(directory)
    raw = _read_config(directory)
    path = directory / VLLM_WEIGHTS
    if not path.is_file():
        raise MedusaError(f"no vLLM Medusa weights at {path}")
    state = {name.removeprefix("medusa_heads."): tensor for name, tensor in _load_safetensors(path).items()}
    hidden, vocab = config.hidden_size, config.vocab_size
    with_bias, shared = bool(raw.get("medusa_fc_bias", False)), bool(raw.get("original_lm_head", False))
    ours = {}
    for i in range(config.num_heads):
        for j in range(config.num_layers):
            ours[f"blocks.{i}.{j}.linear.weight"] = _take(
                state, f"blocks.{i}.layers.{j}.weight", (hidden, hidden), path
            )
            ours[f"blocks.{i}.{j}.linear.bias"] = (
                _take(state, f"blocks.{i}.layers.{j}.bias", (hidden,), path) if with_bias else torch.zeros(hidden)
            )
        if shared:  # vLLM also takes the first per-head name for the one shared projection
            name = "lm_head.weight" if "lm_head.weight" in state else "lm_heads.0.weight"
        else:
            name = f"lm_heads.{i}.weight"
        ours[f"projections.{i}.weight"] = _take(state, name, (vocab, hidden), path)
    heads = MedusaHeads(config)
    heads.load_state_dict(ours)
    heads.attach_lm_head(base_lm_head)
    return heads


# ----- writing -----------------------------------------------------------------------------------


def _projection_weights(model: ExportedModel) -> list[torch.Tensor]:
    """Each head's ``[V, H]`` projection; heads that share the base lm_head get its weight."""
    heads = model.heads
    if heads.projections is not None:
        return [projection.weight for projection in heads.projections]
    lm_head = model.base_model.get_output_embeddings()
    if lm_head is None or getattr(lm_head, "weight", None) is None:
        raise MedusaError("the heads share the base lm_head, but the base model has no output embeddings to copy")
    if getattr(lm_head, "bias", None) is not None:
        raise MedusaError("the base lm_head has a bias, which neither the original Medusa layout nor vLLM's can hold")
    return [lm_head.weight] * heads.config.num_heads


def _cpu(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    # A clone each: safetensors refuses tensors that share memory (heads sharing one lm_head weight).
    return tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype).clone().contiguous()


def official_state(model: ExportedModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The heads under the original project's names, projections materialised."""
    heads = _require_heads(model)
    layers = heads.config.num_layers
    state = {}
    for i, (block, projection) in enumerate(zip(heads.blocks, _projection_weights(model))):
        for j, residual in enumerate(block):
            state[f"{i}.{j}.linear.weight"] = _cpu(residual.linear.weight, dtype)
            state[f"{i}.{j}.linear.bias"] = _cpu(residual.linear.bias, dtype)
        state[f"{i}.{layers}.weight"] = _cpu(projection, dtype)
    return state


def official_config(model: ExportedModel) -> dict:
    """The original ``MedusaConfig`` fields, plus the sizes and bias flag vLLM needs to serve the same files."""
    heads = _require_heads(model)
    config = heads.config
    return {
        "medusa_num_heads": config.num_heads,
        "medusa_num_layers": config.num_layers,
        "base_model_name_or_path": config.base_model or model.name,
        # Not read by the original code; vLLM reads these when it loads this directory with method "medusa".
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "medusa_fc_bias": True,
    }


def vllm_state(model: ExportedModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The heads under vLLM's ``Medusa`` parameter names; shared heads write one ``lm_head.weight``."""
    heads = _require_heads(model)
    state = {}
    for i, block in enumerate(heads.blocks):
        for j, residual in enumerate(block):
            state[f"blocks.{i}.layers.{j}.weight"] = _cpu(residual.linear.weight, dtype)
            state[f"blocks.{i}.layers.{j}.bias"] = _cpu(residual.linear.bias, dtype)
    projections = _projection_weights(model)
    if heads.projections is None:
        state["lm_head.weight"] = _cpu(projections[0], dtype)
    else:
        for i, projection in enumerate(projections):
            state[f"lm_heads.{i}.weight"] = _cpu(projection, dtype)
    return state


def vllm_config(model: ExportedModel, dtype: torch.dtype | None = None) -> dict:
    """The fields vLLM's ``MedusaConfig`` and ``Medusa`` read.

    vLLM renames every config key holding both "num" and "heads" (or "layers") to ``num_heads``
    (``num_hidden_layers``), so no other such key may appear here.
    """
    heads = _require_heads(model)
    config = heads.config
    weight_dtype = dtype or _projection_weights(model)[0].dtype
    return {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "truncated_vocab_size": config.vocab_size,
        "num_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "medusa_fc_bias": True,
        "original_lm_head": heads.projections is None,
        "dtype": str(weight_dtype).removeprefix("torch."),
        "base_model_name_or_path": config.base_model or model.name,
    }


def _require_heads(model: ExportedModel) -> MedusaHeads:
    if model.heads is None:
        raise MedusaError("this model has no heads to export")
    return model.heads


def lossy_for_the_original(model: ExportedModel) -> str | None:
    """Why the original project's code cannot hold these heads exactly, or None when it can.

    It builds a head's blocks as ``[ResBlock(H)] * L``: one block object repeated, so loading a checkpoint
    with ``L > 1`` different blocks keeps only the last block's weights, in every position.
    """
    layers = _require_heads(model).config.num_layers
    if layers <= 1:
        return None
    return (
        f"the heads have {layers} layers each, and the original Medusa code shares one block across a head's "
        f"layers ([ResBlock] * medusa_num_layers): it would load only each head's last block. TensorRT-LLM and "
        "vLLM read every layer of the same files exactly"
    )


def export_heads(
    model: ExportedModel,
    directory: str | Path,
    format: str = "medusa",
    dtype: torch.dtype | None = None,
    allow_lossy: bool = False,
) -> Path:
    """Write ``model``'s heads in the original layout (``"medusa"``) or vLLM's (``"vllm"``); returns the directory.

    The original layout is written twice, as ``medusa_lm_head.safetensors`` and as ``medusa_lm_head.pt`` (a
    plain tensor state dict, ``torch.save``), because the original project's loader reads only the ``.pt``.
    Heads the original code cannot hold exactly (``lossy_for_the_original``) are refused unless
    ``allow_lossy``, and then exported with a warning. Weights are written before the config that describes
    them, each file atomically. The trees go along: neither project reads them, but loading the directory back
    here does. Heads loaded from a directory without a tree given keep their own ``tree.json`` and
    ``tuned_trees.json``, not the tree this machine chose from them (a CPU's 1-node tuned tree would leave a GPU
    without speculation); a model given a tree writes that tree without its lookup chain (``heads_tree``), since
    ``tree.json`` holds head paths only.
    """
    if format not in FORMATS:
        raise MedusaError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if _require_heads(model).config.prefix_layer:
        raise MedusaError(
            "heads with a prefix layer (Hydra++) cannot be exported: no serving engine reads one (the original "
            "Medusa, vLLM and TensorRT-LLM read Medusa heads only). They load here from their own directory "
            "(save_pretrained)"
        )
    if _require_heads(model).config.sequential:
        raise MedusaError(
            "sequential heads cannot be exported: no serving engine reads heads that take the candidate path's "
            "tokens (the original Medusa, vLLM and TensorRT-LLM read Medusa heads only; vLLM's MLPSpeculator "
            "is a different, recurrent architecture). They load here from their own directory (save_pretrained)"
        )
    directory = Path(directory)
    if format == "medusa":
        lossy = lossy_for_the_original(model)
        if lossy is not None and not allow_lossy:
            raise MedusaError(
                f"refusing to export in the original Medusa layout: {lossy}. Pass --allow-lossy (allow_lossy=True) "
                "to write it anyway, or use --format vllm for vLLM"
            )
        if lossy is not None:
            warnings.warn(f"exporting in the original Medusa layout: {lossy}", UserWarning, stacklevel=2)
        state, config = official_state(model, dtype), official_config(model)
        with atomic_path(directory / OFFICIAL_SAFETENSORS) as temporary:
            save_file(state, str(temporary), metadata={"format": "pt"})
        with atomic_path(directory / OFFICIAL_PICKLE) as temporary:
            torch.save(state, temporary)
    else:
        state, config = vllm_state(model, dtype), vllm_config(model, dtype)
        with atomic_path(directory / VLLM_WEIGHTS) as temporary:
            save_file(state, str(temporary), metadata={"format": "pt"})
    write_json(directory / CONFIG_NAME, config)
    _write_trees(model, directory)
    return directory


def _write_trees(model: ExportedModel, directory: Path) -> None:
    from medusa.paths import heads_file
    from medusa.tuned_trees import TUNED_FILE, read_tuned_trees

    for name in (TREE_FILE, TUNED_FILE):  # none left from an earlier export (--force) where the source has none
        (directory / name).unlink(missing_ok=True)
    choice = getattr(model, "tree_choice", None)
    if choice is None:
        write_text(directory / TREE_FILE, model.heads_tree.to_json() + "\n")
        return
    own = heads_file(choice.directory, TREE_FILE)
    if own.is_file():
        write_bytes(directory / TREE_FILE, own.read_bytes())
    tuned = read_tuned_trees(choice.directory)
    if tuned:
        write_json(
            directory / TUNED_FILE, {"devices": {kind: entry.to_json() for kind, entry in tuned.items()}}, indent=1
        )
