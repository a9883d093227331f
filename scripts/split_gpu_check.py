"""Two-GPU check: a base model split over devices with accelerate decodes losslessly with Medusa, and its step cost.

Run on a machine with two GPUs (``nvidia-h200-x2``): ``python scripts/split_gpu_check.py --out split.json``.
A 7B-shaped Llama with random weights is split layer-wise over the devices (embeddings and the first half
of the layers on the first, the rest, the final norm and the lm_head on the second), so the heads sit on
the second device. Greedy equality is checked in float32 (no TF32) against transformers' own greedy
``generate`` on the same split model; step times are measured in bfloat16, split and on one device.
``--shape tiny --devices cpu,cpu`` runs the same code on the CPU in seconds (no real split).
"""

from __future__ import annotations

import argparse
import json

import torch
from accelerate import dispatch_model
from transformers import LlamaConfig, LlamaForCausalLM

from medusa.bench.costcurve import SHAPES as COST_CURVE_SHAPES
from medusa.heads import MedusaHeadsConfig
from medusa.model import MedusaModel

# The cost curve's shapes; "tiny" with 4 layers, so that a split puts two on each GPU.
SHAPES = {
    **COST_CURVE_SHAPES,
    "tiny": {**COST_CURVE_SHAPES["tiny"], "num_hidden_layers": 4, "max_position_embeddings": 1024},
}


def split_map(layers: int, first: str, second: str) -> dict[str, str]:
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": second, "lm_head": second}
    for index in range(layers):
        device_map[f"model.layers.{index}"] = first if index < layers // 2 else second
    return device_map


def build(shape: str, dtype: torch.dtype, device: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], eos_token_id=None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        base = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(previous)
    return base


def with_heads(base: LlamaForCausalLM, seed: int = 1) -> MedusaModel:
    config = base.config
    heads = MedusaHeadsConfig(hidden_size=config.hidden_size, vocab_size=config.vocab_size, num_heads=4)
    model = MedusaModel.from_pretrained(base, heads=heads)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random blocks, projections near the lm_head: proposals that vary
        for name, parameter in model.heads.named_parameters():
            scale = 1e-3 if name.startswith("projections") else 0.02
            noise = torch.randn(parameter.shape, generator=generator).to(parameter.device, parameter.dtype)
            parameter.add_(scale * noise)
    return model


def first_difference(a: list[int], b: list[int]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def check_lossless(shape: str, devices: list[str], new_tokens: int, trials: int) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    base = build(shape, torch.float32, devices[0])
    layers = base.config.num_hidden_layers
    base = dispatch_model(base, split_map(layers, devices[0], devices[1]))
    model = with_heads(base)
    report = {
        "devices_of_parameters": sorted({str(p.device) for p in base.parameters()}),
        "heads_device": str(model.heads.device),
        "trials": [],
    }
    for trial in range(trials):
        prompt = torch.randint(
            4, base.config.vocab_size, (8 + 13 * trial,), generator=torch.Generator().manual_seed(trial)
        )
        ids = prompt[None].to(devices[0])
        with torch.no_grad():
            reference = base.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
            )
        reference = reference[0, prompt.numel() :].tolist()
        plain = model.generate(prompt.tolist(), max_new_tokens=new_tokens, use_heads=False, chat_template=False)
        row = {"prompt_tokens": prompt.numel(), "plain_vs_hf": first_difference(plain.token_ids, reference)}
        for tree in ("16", "64"):
            medusa = model.generate(prompt.tolist(), max_new_tokens=new_tokens, tree=tree, chat_template=False)
            row[f"tree{tree}_vs_plain"] = first_difference(medusa.token_ids, plain.token_ids)
            row[f"tree{tree}_mean_accepted"] = medusa.stats.mean_accepted
        report["trials"].append(row)
        print(json.dumps(row), flush=True)
    report["all_equal"] = all(
        v is None for row in report["trials"] for k, v in row.items() if k.endswith(("_hf", "_plain"))
    )
    return report


def step_times(shape: str, devices: list[str], new_tokens: int) -> dict:
    prompt = torch.randint(4, SHAPES[shape]["vocab_size"], (128,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = {}
    for placement in ("split", "one-device"):
        base = build(shape, torch.bfloat16, devices[0])
        if placement == "split":
            base = dispatch_model(base, split_map(base.config.num_hidden_layers, devices[0], devices[1]))
        model = with_heads(base)
        for label, tree, graphs in (
            ("ar", None, True),
            ("ar", None, False),
            ("tree16", "16", True),
            ("tree16", "16", False),
            ("tree64", "64", True),
            ("tree64", "64", False),
        ):
            if placement == "split" and graphs:
                continue  # graphs are off for split models
            settings = dict(
                max_new_tokens=new_tokens, use_heads=tree is not None, cuda_graphs=graphs, chat_template=False
            )
            model.generate(prompt, tree=tree, **settings)  # warm-up (and capture)
            result = model.generate(prompt, tree=tree, **settings)
            key = f"{placement}/{label}/{'graphs' if graphs else 'eager'}"
            rows[key] = {
                "ms_per_step": 1e3 * result.stats.decode_seconds / result.stats.steps,
                "steps": result.stats.steps,
                "mean_accepted": result.stats.mean_accepted,
                "tokens_per_second": result.stats.tokens_per_second,
            }
            print(key, json.dumps(rows[key]), flush=True)
        del model, base
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="split_gpu_check.json")
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--devices", default="cuda:0,cuda:1", help="two devices, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    devices = args.devices.split(",")
    report = {"torch": torch.__version__, "shape": args.shape, "devices": devices}
    if torch.cuda.is_available():
        report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    report["lossless_float32"] = check_lossless(args.shape, devices, args.new_tokens, args.trials)
    report["step_times_bfloat16"] = step_times(args.shape, devices, args.new_tokens)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps({"all_equal": report["lossless_float32"]["all_equal"]}))


if __name__ == "__main__":
    main()
