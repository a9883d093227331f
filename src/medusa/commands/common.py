"""Flags shared by the commands that load a model."""

from __future__ import annotations

import argparse

from medusa.model import MedusaModel


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="base model: a local model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--heads", help="Medusa heads directory (default: the heads shipped for the default model, else untrained heads)")
    parser.add_argument("--tree", help="tree: a default size (8, 16, 32, 64), a JSON file, or a JSON list of paths")
    parser.add_argument("--num-heads", type=int, default=4, help="heads to create when no --heads is given (default 4)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU)")


def load_model(args: argparse.Namespace) -> MedusaModel:
    return MedusaModel.from_pretrained(
        args.model, heads=args.heads, num_heads=args.num_heads, tree=args.tree, dtype=args.dtype, device=args.device
    )
