"""Quality of sampled answers per acceptance scheme on Spec-Bench (issue 4's quality check).

For the first turn of some Spec-Bench questions, sample an answer at one temperature three ways:
plain sampling (no heads, the reference), lossless rejection sampling with the heads, and typical
acceptance with the heads. Report, per scheme, the base model's perplexity of what it wrote (at
temperature 1, given the prompt), the mean tokens per step and tokens/s. Rejection sampling should
match plain sampling up to noise; typical acceptance trades some of that for speed.

    python scripts/sampling_quality.py --heads DIR --temperature 0.7 --per-category 10 \
        --out docs/benchmarks/sampling-quality-smollm2.md
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import torch

from medusa.decoding import DecodingStats
from medusa.model import MedusaModel

SPEC_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"
SCHEMES = {
    "plain": ("plain sampling", dict(use_heads=False)),
    "rejection": ("rejection (lossless)", dict(acceptance="rejection")),
    "typical": ("typical", dict(acceptance="typical")),
}


def questions(path: Path, per_category: int) -> list[dict]:
    chosen: dict[str, list[dict]] = defaultdict(list)
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if len(chosen[record["category"]]) < per_category:
            chosen[record["category"]].append(record)
    return [record for records in chosen.values() for record in records]


def negative_log_likelihood(model: MedusaModel, prompt_ids: torch.Tensor, answer: list[int]) -> float:
    """Sum over the answer's tokens of -log p_base(token | prompt, earlier tokens), at temperature 1."""
    if not answer:
        return 0.0
    ids = torch.cat([prompt_ids, torch.tensor(answer, device=prompt_ids.device)])
    with torch.inference_mode():
        logits = model.base_model(ids[None]).logits[0, prompt_ids.numel() - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[prompt_ids.numel() :], reduction="sum"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="base model directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--heads", help="heads directory (default: the shipped heads)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--per-category", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--questions", type=Path, default=SPEC_BENCH)
    parser.add_argument("--tree", help="the tree to decode with, as --tree takes it (default: the heads' own choice)")
    parser.add_argument("--lookup", type=int, help="nodes of a lookup chain in the tree (default: as tuned)")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated, of {', '.join(SCHEMES)}")
    parser.add_argument("--out", type=Path, help="write the table (Markdown) here as well")
    args = parser.parse_args()
    schemes = [name.strip() for name in args.schemes.split(",") if name.strip()]
    unknown = [name for name in schemes if name not in SCHEMES]
    if unknown or not schemes:
        parser.error(f"--schemes: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SCHEMES)}")

    model = MedusaModel.from_pretrained(
        args.model, heads=args.heads, tree=args.tree, dtype=args.dtype, device=args.device
    )
    records = questions(args.questions, args.per_category)
    totals = {SCHEMES[name][0]: defaultdict(float) for name in schemes}
    for index, record in enumerate(records):
        prompt_ids = model.encode_prompt(record["turns"][0])
        for label, options in (SCHEMES[key] for key in schemes):
            settings = dict(  # request and engine settings by name (GenerationConfig and EngineOptions)
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed + index,
                **options,
            )
            if args.lookup is not None and options.get("use_heads", True):  # plain sampling stays plain
                settings["lookup"] = args.lookup
            stats = DecodingStats()
            answer = [t for chunk in model.stream(prompt_ids, stats=stats, **settings) for t in chunk.token_ids]
            total = totals[label]
            total["nll"] += negative_log_likelihood(model, prompt_ids, answer)
            total["tokens"] += len(answer)
            total["steps"] += stats.steps
            total["committed"] += sum(stats.accepted_per_step)
            total["seconds"] += stats.decode_seconds
        print(f"{index + 1}/{len(records)} {record['category']}", flush=True)

    lines = [
        f"Spec-Bench, first turns, {args.per_category} per category ({len(records)} questions), temperature "
        f"{args.temperature}, top-p {args.top_p}, up to {args.max_new_tokens} new tokens, seeds {args.seed}+i; "
        f"device {model.device}, tree of {model.tree.size} nodes.",
        "",
        "| scheme | perplexity (base model, T=1) | tokens per step | tokens/s | tokens |",
        "|---|---|---|---|---|",
    ]
    for name, total in totals.items():
        perplexity = math.exp(total["nll"] / max(total["tokens"], 1))
        per_step = total["committed"] / max(total["steps"], 1)
        speed = total["tokens"] / total["seconds"] if total["seconds"] else 0.0
        lines.append(f"| {name} | {perplexity:.2f} | {per_step:.2f} | {speed:.1f} | {int(total['tokens'])} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
