"""Where a decoding step's GPU time goes: the kernels of one step, eager or compiled, by GPU time.

A diagnostic, not a benchmark: on a small model the step is bound by how many kernels it launches and
how long the small ones take, so the question is which parts (the base model's matrix products,
attention, the heads' top-k, the commit's copies) add up. Run on a CUDA machine:

    python scripts/step_profile.py --shape smollm2-135m --nodes 1,59 --batch 1,32 --compile off,on --out profile.json

Random weights (``medusa.bench.costcurve.random_model``) with heads like the shipped ones; the tree is
the cost curve's generic tree, plus ``--lookup`` nodes when set. Prints, per configuration, the graph
replay time and the top kernels by GPU time per step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from medusa.bench.costcurve import random_model, tree_of_size
from medusa.engine import EngineOptions
from medusa.heads import MedusaHeadsConfig
from medusa.model import GenerationConfig, MedusaModel
from medusa.tree import Tree


def kernel_table(step, repeats: int) -> tuple[float, list[dict]]:
    """GPU microseconds per step, and per kernel name (summed over calls, per step), largest first."""
    with torch.inference_mode():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                step()
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = event.self_cuda_time_total
        if device_us > 0:
            rows.append(
                {"kernel": event.key[:110], "us_per_step": device_us / repeats, "calls_per_step": event.count / repeats}
            )
    rows.sort(key=lambda row: -row["us_per_step"])
    return sum(row["us_per_step"] for row in rows), rows


def replay_ms(step, repeats: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            times.append((start, end))
        torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--nodes", default="1,59", help="tree sizes (root included, lookup nodes included)")
    parser.add_argument("--lookup", type=int, default=10, help="lookup nodes inside each size above 1")
    parser.add_argument("--compile", default="off,on")
    parser.add_argument("--batch", default="1", help="rows decoded together (batch buckets)")
    parser.add_argument("--layers", type=int, default=2, help="residual layers per head")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--cache-length", type=int, default=1083)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument(
        "--sdpa",
        default="default",
        help="scaled-dot-product attention backends to allow (math, efficient, cudnn, flash; default: torch's choice)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="rows sample at this temperature (seeded)")
    parser.add_argument("--out")
    args = parser.parse_args()

    device = torch.device("cuda")
    base = random_model(args.shape, device, torch.bfloat16)
    text = base.config
    heads = MedusaHeadsConfig(
        hidden_size=text.hidden_size,
        vocab_size=text.vocab_size,
        num_heads=4,
        num_layers=args.layers,
        share_lm_head=True,
    )
    model = MedusaModel.from_pretrained(base, heads=heads)
    prompt = torch.randint(0, text.vocab_size, (args.context,), device=device)
    results = []
    names = {
        "math": SDPBackend.MATH,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
    }
    backends = None if args.sdpa == "default" else [names[name] for name in args.sdpa.split(",")]
    attention = (lambda: sdpa_kernel(backends)) if backends else contextlib.nullcontext
    for batch, size in ((int(b), int(n)) for b in args.batch.split(",") for n in args.nodes.split(",")):
        lookup = args.lookup if size > 1 else 0
        tree = tree_of_size(size - lookup, 4) if size - lookup > 1 else Tree.from_paths([])
        for mode in args.compile.split(","):
            compile_step = {"off": False, "on": True}.get(mode, mode)
            options = EngineOptions(
                use_heads=size - lookup > 1, lookup=lookup, compile=compile_step, cache_length=args.cache_length
            )
            with attention():  # the backend is chosen when the step is traced and captured
                engine = model.engine(
                    options, tree if size - lookup > 1 else None, max_rows=batch, max_length=args.context + 1
                )
                config = GenerationConfig(max_new_tokens=1, temperature=args.temperature, seed=0)
                generations = [model.prepare(prompt, config) for _ in range(batch)]
                engine.add(generations)
                rows, span, kind = engine.step_shape()  # the bucket and attention span decoding uses here
                engine.run_step(rows, span, kind)  # captures the graph
            decoder, graphed = engine.decoder, engine.graphs
            # the compiled step when compiling (the graphs compiled it); eager if capture failed (logged)
            step = graphed.step_function if graphed else decoder.step

            def rewound(step=step, decoder=decoder, rows=rows, span=span, kind=kind):
                decoder.lengths[:rows].fill_(args.context)
                return step(rows, span, kind)

            with attention():
                total_us, rows_table = kernel_table(rewound, args.repeats)
            graph_ms = (
                replay_ms(
                    lambda decoder=decoder, graphed=graphed, rows=rows, span=span, kind=kind: (
                        decoder.lengths[:rows].fill_(args.context),
                        graphed(rows, span, kind),
                    ),
                    50,
                )
                if graphed
                else None
            )
            engine.finish(generations)
            model.release_engines()
            result = {
                "batch": batch,
                "nodes": size,
                "lookup": lookup,
                "compile": mode,
                "sdpa": args.sdpa,
                "temperature": args.temperature,
                "attention_span": span,
                "kernel_us_per_step": total_us,
                "kernels_per_step": sum(r["calls_per_step"] for r in rows_table),
                "graph_replay_ms": graph_ms,
                "top": rows_table[: args.top],
            }
            results.append(result)
            print(
                f"\n== batch {batch}, {size} nodes ({lookup} lookup), compile {mode}, sdpa {args.sdpa}, span {span}, "
                f"temperature {args.temperature}: "
                f"graph replay {graph_ms} ms; "
                f"kernel time {total_us:.0f} us in {result['kernels_per_step']:.0f} kernels per step"
            )
            for row in rows_table[: args.top]:
                print(f"{row['us_per_step']:8.1f} us {row['calls_per_step']:6.1f}x  {row['kernel']}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
