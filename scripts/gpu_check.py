"""GPU check of the fast path: lossless under CUDA graphs on tiny models, and step cost on a 7B shape.

Run on a CUDA machine: ``python scripts/gpu_check.py --out results.json``. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medusa.bench.costcurve import SHAPES as COST_CURVE_SHAPES
from medusa.heads import MedusaHeadsConfig
from medusa.model import MedusaModel

SHAPES = COST_CURVE_SHAPES  # published dimensions, random weights


def measure_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return 2 * source.numel() * 20 / (start.elapsed_time(end) / 1e3)


def lossless_tiny() -> dict:
    results = {}
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=3,
    )
    base = LlamaForCausalLM(config).cuda().eval()
    model = MedusaModel.from_pretrained(base, heads=MedusaHeadsConfig(hidden_size=64, vocab_size=256))
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    mismatches = 0
    for trial in range(8):
        ids = torch.randint(4, 256, (5 + 3 * trial,), device="cuda")
        ref = base.generate(ids[None], do_sample=False, max_new_tokens=100, attention_mask=torch.ones_like(ids[None]))
        ref = ref[0, ids.numel() :].tolist()
        for graphs in (True, False):
            for tree in ("8", "64"):
                out = model.generate(ids, max_new_tokens=100, tree=tree, cuda_graphs=graphs)
                mismatches += out.token_ids != ref
        if trial < 2:
            out = model.generate(ids, max_new_tokens=100, tree="64", compile=True)
            mismatches += out.token_ids != ref
    results["tiny_llama_fp32_mismatches"] = mismatches
    engine = model.engine()
    results["tiny_graphs_captured"] = engine.capture_report().graphs if engine.capture_report() else 0
    results["tiny_graph_refused"] = engine.graphs_refused
    return results


def step_costs(shape: str, tree_sizes: list[int], new_tokens: int) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], eos_token_id=None)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        base = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    heads = MedusaHeadsConfig(hidden_size=config.hidden_size, vocab_size=config.vocab_size, share_lm_head=True)
    model = MedusaModel.from_pretrained(base, heads=heads)
    bandwidth = measure_bandwidth()
    prompt = torch.randint(0, config.vocab_size, (128,), device="cuda")
    rows = {
        "shape": shape,
        "weight_bytes": weight_bytes,
        "bandwidth_bytes_per_s": bandwidth,
        "floor_ms": 1e3 * weight_bytes / bandwidth,
        "steps": {},
    }
    runs = [("ar-graph", 1, True, False), ("ar-eager", 1, False, False)]
    runs += [(f"tree{n}-graph", n, True, False) for n in tree_sizes]
    runs += [("ar-compiled", 1, True, True), ("tree64-compiled", 64, True, True)]
    for label, size, graphs, compiled in runs:
        # request and engine settings by name (GenerationConfig and EngineOptions)
        settings = dict(max_new_tokens=new_tokens, use_heads=size > 1, cuda_graphs=graphs, compile=compiled)
        tree = str(size) if size > 1 else None
        model.generate(prompt, tree=tree, **settings)  # warm-up and capture
        torch.cuda.synchronize()
        result = model.generate(prompt, tree=tree, **settings)
        ms = 1e3 * result.stats.decode_seconds / result.stats.steps
        rows["steps"][label] = {
            "ms_per_step": ms,
            "steps": result.stats.steps,
            "mean_accepted": result.stats.mean_accepted,
        }
        print(f"{shape} {label:14s} {ms:8.3f} ms/step  accepted {result.stats.mean_accepted:.2f}", flush=True)
    t0 = time.perf_counter()
    base.generate(
        prompt[None],
        do_sample=False,
        max_new_tokens=32,
        min_new_tokens=32,
        attention_mask=torch.ones_like(prompt[None]),
    )
    torch.cuda.synchronize()
    rows["hf_generate_eager_ms_per_token"] = 1e3 * (time.perf_counter() - t0) / 32
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-tiny", action="store_true")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["lossless"] = {} if args.skip_tiny else lossless_tiny()
    print(json.dumps(report["lossless"]), flush=True)
    report["cost"] = step_costs(args.shape, [16, 64], args.new_tokens)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
