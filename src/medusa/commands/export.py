"""``medusa export``: write heads in the original Medusa layout (TensorRT-LLM, vLLM) or vLLM's own layout."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from medusa.errors import MedusaError
from medusa.interop import FORMATS, export_heads
from medusa.loading import resolve_dtype
from medusa.model import MedusaModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heads", required=True, help="heads directory: ours, or the original project's layout")
    parser.add_argument(
        "--model",
        help="base model, a local directory or .gguf file (default: SmolLM2-135M-Instruct); heads that share "
        "its lm_head get a copy of its weight",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="medusa",
        help="medusa: the original project's config.json + medusa_lm_head.safetensors and .pt (the original code, "
        "TensorRT-LLM, vLLM); "
        "vllm: vLLM's Medusa draft model (config.json + model.safetensors). Default: medusa",
    )
    parser.add_argument("--output", required=True, help="directory to write (created; must be empty unless --force)")
    parser.add_argument(
        "--dtype", default="float32", help="float32 (default), bfloat16 or float16 for the written tensors"
    )
    parser.add_argument("--force", action="store_true", help="write into a directory that already holds files")
    parser.add_argument(
        "--allow-lossy",
        action="store_true",
        help="--format medusa: export heads of more than one layer, which the original code cannot hold exactly "
        "(it shares one block across a head's layers); TensorRT-LLM and vLLM still read them exactly",
    )


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise MedusaError(f"--output {output} is a file; give a directory")
    if output.is_dir() and any(output.iterdir()) and not args.force:
        raise MedusaError(f"--output {output} already holds files; pass --force to write into it")
    # The base model loads on the CPU in the export dtype, so shared projections are copied in it too.
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    model = MedusaModel.from_pretrained(args.model, heads=args.heads, dtype=dtype, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_heads(model, output, format=args.format, dtype=dtype, allow_lossy=args.allow_lossy)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    heads = model.heads.config
    print(
        f"wrote {heads.num_heads} heads ({heads.num_layers} residual block(s) each, hidden {heads.hidden_size}, "
        f"vocabulary {heads.vocab_size}, {str(dtype).removeprefix('torch.')}) in the {args.format} layout to {output}"
    )
    return 0
