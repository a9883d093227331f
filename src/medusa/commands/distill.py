"""``medusa distill``: the base model answers a prompt pool itself; resumable JSONL for ``medusa train``."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from medusa.commands.threads import add_threads_argument
from medusa.training.config import DistillConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, help="prompt files, comma-separated: JSON or JSONL, any shape medusa train reads"
    )
    parser.add_argument(
        "--output", required=True, help="JSONL file to write (appended to; a rerun continues where it stopped)"
    )
    parser.add_argument(
        "--model", help="base model: a local model directory or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=512, help="most new tokens per answer (default 512)")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 (default): greedy, what greedy Medusa decoding accepts"
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="with --temperature above 0: nucleus mass kept (default 1: off)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="prompts answered, then appended to the output, at a time (default 128); up to 64 of them decode "
        "at once, each joining as another ends",
    )
    parser.add_argument("--limit", type=int, help="answer a stable random sample of N prompts across the files")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024, help="skip longer prompts (default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --limit's sample and for sampling (default 0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU)")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    from medusa.training.distill import distill, load_for_distill, plan

    config = DistillConfig(
        data=[path for path in args.data.split(",") if path],
        output=args.output,
        model=args.model,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        limit=args.limit,
        max_prompt_tokens=args.max_prompt_tokens,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
    )
    model, tokenizer, name = load_for_distill(config)
    work = plan(config, tokenizer)
    if work.repaired:
        print(f"{config.output}: cut off a half-written last line", file=sys.stderr)
    print(
        f"{name} on {model.device} ({model.dtype}): {work.total} prompts, {work.done} already answered, "
        f"{len(work.pending)} to go",
        file=sys.stderr,
    )
    tokens = seconds = 0.0
    with tqdm(total=len(work.pending), unit="rows", desc="distill", file=sys.stderr) as bar:
        for batch in distill(config, work, model, tokenizer):
            tokens += batch.new_tokens
            seconds += batch.seconds
            bar.update(batch.rows)
            bar.set_postfix_str(f"{tokens / max(seconds, 1e-9):,.0f} tokens/s")
    for line in work.skipped[:20]:
        print(f"skipped {line}", file=sys.stderr)
    more = " (first 20 shown)" if len(work.skipped) > 20 else ""
    print(
        f"wrote {len(work.pending)} rows to {config.output} ({work.done + len(work.pending)} in all); "
        f"{int(tokens)} new tokens at {tokens / max(seconds, 1e-9):,.0f} tokens/s; "
        f"skipped {len(work.skipped)} records{more}",
        file=sys.stderr,
    )
    return 0
