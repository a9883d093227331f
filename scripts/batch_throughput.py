"""Total throughput (new tokens/s) of batched Medusa against batched autoregressive decoding.

Both run on the same engine (``MedusaModel.generate_batch``: one cache, one forward pass per step for
the whole batch, CUDA graphs on a GPU); autoregressive is the same engine with ``use_heads=False`` (a
one-node tree). Medusa runs the tree each batch bucket is given (tuned per batch size, else the model's
tree cut to a node budget). For every batch size the same prompts (first turns of Spec-Bench questions,
categories interleaved) are decoded with at most that many rows running at once: each prompt joins as an
earlier one finishes (continuous batching, as a server runs), so a batch never waits for its slowest row.
Every graph the pass replays is captured before it. Throughput is all new tokens over all wall time,
prefill included, and decode throughput leaves the prefills out.

    python scripts/batch_throughput.py --model DIR --heads DIR --questions question.jsonl \
        --max-new-tokens 256 --batch-sizes 1,4,16,32 --out docs/benchmarks/batch-throughput.json
    python scripts/batch_throughput.py --plot-only docs/benchmarks/batch-throughput.json   # redraw the plot
    python scripts/batch_throughput.py --tiny --out /tmp/tiny.json      # CPU smoke run, random tiny model

``--temperature T`` samples every prompt at T (lossless rejection sampling, seeded per prompt), ``--mixed`` only
every other one, as the server's load test does; ``--adaptive`` also runs Medusa with the engine's adaptive switch
(``EngineOptions.adaptive``: plain steps where the tree does not pay), with the share of its steps that ran plain.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from medusa.acceptance import StepKind
from medusa.bench.environment import environment, synchronize
from medusa.bench.specbench import categories_of, default_questions_path, load_questions, select_questions
from medusa.engine import EngineOptions, StepTimes
from medusa.files import read_json
from medusa.model import GenerationConfig, MedusaModel


def spec_bench_prompts(path: Path, count: int) -> list[str]:
    """The first turns of ``count`` questions, taking the categories in turn so every batch is mixed."""
    questions = load_questions(path)
    categories = categories_of(questions)
    chosen = select_questions(questions, limit=math.ceil(count / len(categories)))
    by_category = {c: [q for q in chosen if q.category == c] for c in categories}
    interleaved = [
        q
        for rank in range(max(map(len, by_category.values())))
        for c in categories
        if rank < len(by_category[c])
        for q in [by_category[c][rank]]
    ]
    return [q.turns[0] for q in interleaved[:count]]


def tiny_model() -> tuple[MedusaModel, list[list[int]]]:
    """A random 4-layer llama with random heads, and random token prompts: a CPU smoke test of the script."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=3,
        pad_token_id=0,
    )
    model = MedusaModel.from_pretrained(LlamaForCausalLM(config).eval(), tree="16")
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 512) for _ in range(rng.randint(4, 48))] for _ in range(64)]
    return model, prompts


def measure(
    model: MedusaModel, prompts: list, batch_size: int, configs: list[GenerationConfig], options: EngineOptions
) -> tuple[dict, list]:
    """Decode ``prompts`` (each with its config) with at most ``batch_size`` rows running at once; return the totals
    and the answers."""
    # Untimed: the longest prompts size the engine's cache, then every prefill and step graph is captured.
    longest = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)[:batch_size]
    model.generate_batch(
        [prompts[i] for i in longest], [configs[i] for i in longest], options=options, max_batch=batch_size
    )
    engine = model.engine(options)  # the engine generate_batch runs (kept): its host times over the timed pass
    sampled = any(config.temperature > 0 for config in configs)
    engine.capture([StepKind(), StepKind(sample=True)] if sampled else [StepKind()])
    synchronize(model.device)
    # A graph the capture left out (none expected) is captured inside the pass: taken out of the rates.
    captured_before = _capture_seconds(model, options)
    engine.times = StepTimes()
    started = time.perf_counter()
    results = model.generate_batch(prompts, configs, options=options, max_batch=batch_size)
    synchronize(model.device)
    seconds = time.perf_counter() - started
    capture = _capture_seconds(model, options) - captured_before
    answers = [r.token_ids for r in results]
    accepted = [a for r in results for a in r.stats.accepted_per_step]
    tokens = sum(map(len, answers))
    times = engine.times
    return {
        "batch_size": batch_size,
        "sequences": len(prompts),
        "new_tokens": tokens,
        "seconds": seconds,
        "prefill_seconds": times.prefill,
        "prefills": times.prefills,
        "tokens_per_second": tokens / (seconds - capture),  # prefill counted, one-time graph captures not
        "capture_seconds_in_pass": capture,
        "decode_tokens_per_second": tokens / (seconds - times.prefill - capture),
        "tree_size": model.tree_for(options, batch_size).size,
        "captured_graphs": _capture_report(model, options),
        "batch_steps": times.steps,
        "overlapped_steps": engine.overlaps,  # each step launched before the last one's bookkeeping
        "ragged_attention": engine.decoder.ragged_attention,  # attention read each row's own slots
        "mean_rows_per_step": sum(len(r.stats.accepted_per_step) for r in results) / max(times.steps, 1),
        # Host milliseconds per step by phase (DecodingEngine.times): wait is mostly the device's own time.
        "host_ms_per_step": {
            name: 1e3 * getattr(times, name) / max(times.steps, 1)
            for name in ("launch", "wait", "bookkeeping", "leave")
        },
        "mean_accepted_per_sequence_step": sum(accepted) / len(accepted),
        # With the adaptive switch: the share of the timed pass's steps that verified each row's next token alone.
        "plain_step_share": times.plain_steps / max(times.steps, 1) if options.adaptive else None,
    }, answers


def _capture_seconds(model: MedusaModel, options: EngineOptions) -> float:
    report = model.engine(options).capture_report()
    return report.seconds if report is not None else 0.0


def _capture_report(model: MedusaModel, options: EngineOptions) -> dict | None:
    """The graphs the engine captured for these options so far (None on the CPU): how many, the seconds and memory."""
    report = model.engine(options).capture_report()  # the engine generate_batch ran: kept, and idle now
    if report is None:
        return None
    return {"graphs": report.graphs, "seconds": round(report.seconds, 2), "memory_bytes": report.memory_bytes}


def plot(report: dict, path: Path) -> None:
    """Tokens/s of both methods against batch size, and Medusa's speedup, beside the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report["rows"], key=lambda row: row["batch_size"])  # runs may take the sizes in any order
    sizes = [row["batch_size"] for row in rows]
    figure, (throughput, speedup) = plt.subplots(1, 2, figsize=(10, 4))
    for method in ("autoregressive", "medusa"):
        throughput.plot(sizes, [row[method]["tokens_per_second"] for row in rows], marker="o", label=method)
    throughput.set(xscale="log", xlabel="batch size", ylabel="total new tokens/s", title="throughput")
    throughput.set_xticks(sizes, [str(size) for size in sizes])
    throughput.legend()
    speedup.plot(sizes, [row["speedup"] for row in rows], marker="o", color="tab:green")
    speedup.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    speedup.set(xscale="log", xlabel="batch size", ylabel="medusa / autoregressive", title="speedup")
    speedup.set_xticks(sizes, [str(size) for size in sizes])
    meta = report["meta"]
    figure.suptitle(
        f"{meta['model']} on {meta['device']}, {meta['dtype'].removeprefix('torch.')}, "
        f"trees per batch size, {meta['max_new_tokens']} new tokens"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="base model directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--heads", help="heads directory (default: the shipped heads)")
    parser.add_argument("--questions", type=Path, help="Spec-Bench question.jsonl (default: shared/data/...)")
    parser.add_argument("--tree", help="tree: a default size or a JSON file (default: the heads' own)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", default="1,4,16,32")
    parser.add_argument("--prompts", type=int, help="prompts per batch size (default: the largest batch size)")
    parser.add_argument("--dtype", default="bfloat16", help="on CUDA (the CPU runs float32)")
    parser.add_argument("--tiny", action="store_true", help="a random tiny model on the CPU: checks the script")
    parser.add_argument("--out", type=Path, help="the JSON report; the plot goes beside it (.png)")
    parser.add_argument(
        "--overlap",
        choices=("auto", "on", "off"),
        default="auto",
        help="launch steps ahead of the bookkeeping (auto: on CUDA)",
    )
    parser.add_argument(
        "--ragged",
        choices=("auto", "on", "off"),
        default="off",
        help="attention reads each row's own slots, not the longest row's span (auto: where FlashAttention runs)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (default greedy)")
    parser.add_argument("--mixed", action="store_true", help="only every other prompt samples at --temperature")
    parser.add_argument("--adaptive", action="store_true", help="also Medusa with the engine's adaptive switch")
    parser.add_argument("--plot-only", type=Path, metavar="JSON", help="redraw the plot of an existing report")
    args = parser.parse_args()
    if args.plot_only:
        plot(read_json(args.plot_only, "batch throughput results"), args.plot_only.with_suffix(".png"))
        print(f"wrote {args.plot_only.with_suffix('.png')}")
        return
    if args.out is None:
        parser.error("--out is required (or --plot-only JSON)")
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    count = args.prompts or max(sizes)

    if args.tiny:
        model, prompts = tiny_model()
        prompts = prompts[:count]
        name = "tiny random llama (4 layers, hidden 128)"
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = args.dtype if device == "cuda" else "float32"
        model = MedusaModel.from_pretrained(args.model, heads=args.heads, tree=args.tree, dtype=dtype, device=device)
        prompts = [
            model.encode_prompt(text) for text in spec_bench_prompts(args.questions or default_questions_path(), count)
        ]
        name = model.name

    sampled = [args.temperature > 0 and (not args.mixed or index % 2 == 1) for index in range(len(prompts))]
    configs = [
        GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=index)
        if sample
        else GenerationConfig(max_new_tokens=args.max_new_tokens)
        for index, sample in enumerate(sampled)
    ]
    choice = {"auto": None, "on": True, "off": False}
    settings = dict(overlap=choice[args.overlap], ragged_attention=choice[args.ragged])
    medusa, plain = EngineOptions(**settings), EngineOptions(use_heads=False, **settings)
    adaptive = EngineOptions(adaptive=True, **settings)
    rows = []
    for size in sizes:
        medusa_row, medusa_answers = measure(model, prompts, size, configs, medusa)
        plain_row, plain_answers = measure(model, prompts, size, configs, plain)
        row = {
            "batch_size": size,
            "medusa": medusa_row,
            "autoregressive": plain_row,
            "speedup": medusa_row["tokens_per_second"] / plain_row["tokens_per_second"],
            "identical_answers": sum(a == b for a, b in zip(medusa_answers, plain_answers)),
        }
        line = ""
        if args.adaptive:
            adaptive_row, adaptive_answers = measure(model, prompts, size, configs, adaptive)
            row["adaptive"] = adaptive_row
            row["adaptive_speedup"] = adaptive_row["tokens_per_second"] / plain_row["tokens_per_second"]
            row["adaptive_identical_answers"] = sum(a == b for a, b in zip(adaptive_answers, plain_answers))
            line = (
                f", adaptive {adaptive_row['tokens_per_second']:9.1f} tok/s ({row['adaptive_speedup']:.2f}x, "
                f"{adaptive_row['plain_step_share']:.0%} plain steps, {row['adaptive_identical_answers']} identical)"
            )
        rows.append(row)
        print(
            f"batch {size:3d}: medusa {medusa_row['tokens_per_second']:9.1f} tok/s, "
            f"autoregressive {plain_row['tokens_per_second']:9.1f} tok/s, speedup {row['speedup']:.2f}x, "
            f"{row['identical_answers']}/{len(prompts)} answers identical{line}",
            flush=True,
        )
        # Written after every batch size: a run cut by a time limit keeps the sizes it finished.
        stops_paying = next((r["batch_size"] for r in rows if r["speedup"] < 1), None)
        report = {
            "meta": {
                **environment(model.device),
                "model": name,
                "heads": args.heads,
                "dtype": str(model.base_model.dtype),
                "tree_size": model.tree.size,
                "trees_by_batch": {str(size): model.tree_for(medusa, size).size for size in sizes},
                "max_new_tokens": args.max_new_tokens,
                "prompts": len(prompts),
                "sampled_prompts": sum(sampled),
                "temperature": args.temperature,
                "cuda_graphs": model.device.type == "cuda",
                "batching": "continuous: at most batch_size rows at once, each prompt joining as an earlier one ends",
                "note": "tokens_per_second counts prefill, decode_tokens_per_second leaves it out; identical_answers "
                "compares batched Medusa with batched autoregressive answers (sampled ones seeded per prompt)",
            },
            "rows": rows,
            "medusa_stops_paying_at_batch_size": stops_paying,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and its plot; Medusa stops paying at batch size: {stops_paying}")


if __name__ == "__main__":
    main()
