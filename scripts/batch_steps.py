"""Batch steps of consecutive batches against continuous joining, on any device: the schedule's share of throughput.

A batch of rows that ends together waits for its slowest row; with continuous joining (``generate_batch(max_batch=)``,
as the server runs) a prompt takes a row as soon as one is free. How many batch steps each needs for the same
prompts and answers does not depend on the device (each row accepts what it accepts, whatever runs beside it), so
this runs on a CPU with the trees tuned for a GPU (``--trees-for``) and tells what a GPU run's step count will be.

    python scripts/batch_steps.py --questions question.jsonl --prompts 32 --max-new-tokens 64 --batch-sizes 4 \
        --trees-for "NVIDIA H100 80GB HBM3" --out docs/benchmarks/cpu-continuous-batching/steps.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import medusa.tuned_trees
from medusa.bench.environment import environment
from medusa.bench.specbench import default_questions_path
from medusa.engine import EngineOptions, StepTimes
from medusa.model import GenerationConfig, MedusaModel


def count_steps(model: MedusaModel, prompts: list, size: int, config: GenerationConfig, options: EngineOptions) -> dict:
    """Both schedules for one batch size: batch steps, tokens, accepted tokens per row step, and whether they agree."""
    started = time.perf_counter()
    consecutive_steps, consecutive = 0, []
    for first in range(0, len(prompts), size):
        results = model.generate_batch(prompts[first : first + size], config, options=options)
        consecutive_steps += max(r.stats.steps for r in results)  # a batch runs until its last row ends
        consecutive += [r.token_ids for r in results]
    middle = time.perf_counter()
    engine = model.engine(options)
    engine.times = StepTimes()
    results = model.generate_batch(prompts, config, options=options, max_batch=size)
    accepted = [a for r in results for a in r.stats.accepted_per_step]
    return {
        "consecutive": {"batch_steps": consecutive_steps, "new_tokens": sum(map(len, consecutive))},
        "continuous": {
            "batch_steps": engine.times.steps,
            "prefills": engine.times.prefills,
            "new_tokens": sum(len(r.token_ids) for r in results),
        },
        "mean_accepted_per_row_step": sum(accepted) / len(accepted),
        "identical_answers": sum(a == r.token_ids for a, r in zip(consecutive, results)),
        "seconds": {"consecutive": middle - started, "continuous": time.perf_counter() - middle},
    }


def main() -> None:
    from batch_throughput import spec_bench_prompts  # beside this script

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="base model directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--heads", help="heads directory (default: the shipped heads)")
    parser.add_argument("--questions", type=Path, help="Spec-Bench question.jsonl (default: shared/data/...)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="4")
    parser.add_argument("--trees-for", help="load the trees tuned for this device kind (default: this device's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.trees_for:
        medusa.tuned_trees.device_kind = lambda device: args.trees_for
    model = MedusaModel.from_pretrained(args.model, heads=args.heads, dtype="float32", device="cpu")
    questions = args.questions or default_questions_path()
    prompts = [model.encode_prompt(text) for text in spec_bench_prompts(questions, args.prompts)]
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    rows = []
    for size in [int(s) for s in args.batch_sizes.split(",")]:
        for use_heads in (True, False):
            row = {"batch_size": size, "method": "medusa" if use_heads else "autoregressive"}
            row["tree_size"] = model.tree_for(EngineOptions(use_heads=use_heads), size).size
            row.update(count_steps(model, prompts, size, config, EngineOptions(use_heads=use_heads)))
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "meta": {
            **environment(model.device),
            "trees_for": args.trees_for or "this device",
            "tree_origin": model.tree_choice.origin if model.tree_choice else None,
            "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "torch_threads": torch.get_num_threads(),
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
