"""The most tokens per step any tree could get from a set of heads: a ceiling, from their tree profile.

A tree that held every head's top-k at every depth (k + k^2 + ... nodes: 11,110 for k = 10 and 4
heads) accepts at each position as deep as every head so far ranked the right token within its top k.
Replaying decoding's walk over the profile's positions with those depths gives the tokens per step
that no tree of these heads, of any size, can beat on the profiled text. Run on the CPU:

    python scripts/heads_ceiling.py src/medusa/assets/heads/smollm2-135m-instruct/tree_profile.json

Profiled on the base model's answers to Spec-Bench first turns (`medusa distill` of the questions, then
`medusa tree profile`), `--answers` and `--questions` break it down per category and weight the categories as
Spec-Bench's 480 questions weigh them; `--heads` with `--device-name` walks that device's tuned tree beside it,
and `--chained` that device's tree with its lookup chain, with the same chain beside every ceiling:

    python scripts/heads_ceiling.py PROFILE --answers ANSWERS.jsonl --questions question.jsonl --max-length 4096 \
        --heads src/medusa/assets/heads/smollm2-135m-instruct --device-name "NVIDIA H100 80GB HBM3"
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np

from medusa.treeopt.profile import HeadProfile, PositionRanks
from medusa.treeopt.walk import accepted_depths, walk_lengths, walk_steps

# Spec-Bench's 480 questions: 10 of each MT-bench category, 80 of each of the others.
MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}


def ceiling_depths(ranks: PositionRanks, k: int) -> np.ndarray:
    """``[positions]``: what a tree of every head's top ``k`` at every depth accepts at each position."""
    hit = (ranks.ranks >= 0) & (ranks.ranks < k)  # -1: missed here or at a shallower head
    return np.cumprod(hit, axis=1).sum(axis=1)


def with_chain(depths: np.ndarray, ranks: PositionRanks, nodes: int) -> np.ndarray:
    """``[positions]``: ``depths`` with a lookup chain of ``nodes`` beside the tree (a step accepts the longer)."""
    if ranks.lookup is None:
        raise SystemExit("this profile did not measure the lookup branch: run `medusa tree profile` again")
    return np.maximum(depths, np.minimum(ranks.lookup.astype(np.int64), nodes))


def segment_categories(
    answers_file: str, questions_file: str, num_heads: int, max_length: int, segments: Sequence[int], cut: int | None
) -> list[str]:
    """The Spec-Bench category of each of the profile's answers, found as `medusa tree profile` reads them (with
    the default model's tokenizer: the answers are that model's)."""
    from transformers import AutoTokenizer

    from medusa.bench.specbench import load_questions
    from medusa.loading import default_model_path
    from medusa.treeopt.data import read_profile_examples

    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    records = [json.loads(line) for line in open(answers_file, encoding="utf-8") if line.strip()]
    category_of = {question.turns[0]: question.category for question in load_questions(questions_file)}
    examples, _ = read_profile_examples([answers_file], tokenizer, len(records), max_length)
    categories, lengths = [], []
    for example in examples:
        mask = np.asarray(example.loss_mask, dtype=bool)
        if mask.size <= num_heads + 1:
            continue
        # the positions the profile measures: the next num_heads + 1 tokens all in the answer
        measured = int(np.lib.stride_tricks.sliding_window_view(mask[1:], num_heads + 1).all(axis=1).sum())
        if measured:
            line = int(example.where.rsplit(":", 1)[1])
            categories.append(category_of[records[line - 1]["conversations"][0]["value"]])
            lengths.append(min(measured, cut or measured))  # as the profile's walk data is cut
    if lengths != [int(n) for n in segments]:
        raise SystemExit("the answers do not line up with the profile: profile them with the same --max-length")
    return categories


def category_table(ranks: PositionRanks, categories: list[str], columns: dict[str, np.ndarray]) -> None:
    """Print tokens per step of each column's depths per category, overall and weighted to the 480's mix."""
    starts = np.cumsum(ranks.segments) - ranks.segments
    sums: dict[str, dict[str, list[float]]] = {}
    answers: dict[str, int] = {}
    for start, length, category in zip(starts, ranks.segments, categories):
        answers[category] = answers.get(category, 0) + 1
        for name, depths in columns.items():
            tokens, steps = walk_steps(depths[start : start + length], [int(length)])
            cell = sums.setdefault(category, {}).setdefault(name, [0.0, 0.0])
            cell[0] += float(tokens[0])
            cell[1] += float(steps[0])
    print("| category | answers | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    overall = {name: [0.0, 0.0] for name in columns}
    weighted = {name: [0.0, 0.0] for name in columns}
    for category in sorted(sums):
        weight = (10 if category in MT_BENCH else 80) / answers[category]
        for name, (tokens, steps) in sums[category].items():
            overall[name][0] += tokens
            overall[name][1] += steps
            weighted[name][0] += weight * tokens
            weighted[name][1] += weight * steps
        cells = " | ".join(f"{tokens / steps:.2f}" for tokens, steps in sums[category].values())
        print(f"| {category} | {answers[category]} | {cells} |")
    for label, totals in [("all, as profiled", overall), ("weighted as Spec-Bench's 480", weighted)]:
        cells = " | ".join(f"{tokens / steps:.2f}" for tokens, steps in totals.values())
        print(f"| {label} | {sum(answers.values()) if totals is overall else ''} | {cells} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="a tree_profile.json written by `medusa tree profile`")
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, help="walk the first N tokens of each answer (0: all)"
    )
    parser.add_argument("--top", default="1,2,3,5,10", help="top-k per depth to try (at most the profile's top-k)")
    parser.add_argument("--answers", help="the distilled answers the profile measured (Spec-Bench first turns)")
    parser.add_argument("--questions", help="Spec-Bench's question.jsonl, for the answers' categories")
    parser.add_argument("--max-length", type=int, default=1024, help="the profile's --max-length (default 1024)")
    parser.add_argument("--heads", help="heads directory whose tuned tree is walked beside the ceilings")
    parser.add_argument("--device-name", help="which device's tuned tree (as tuned_trees.json names it)")
    parser.add_argument(
        "--chained",
        action="store_true",
        help="that device's tree with its lookup chain, and the chain beside each ceiling",
    )
    args = parser.parse_args()
    if (args.answers is None) != (args.questions is None):
        raise SystemExit("--answers and --questions go together")
    if (args.heads is None) != (args.device_name is None):
        raise SystemExit("--heads and --device-name go together")
    if args.chained and args.heads is None:
        raise SystemExit("--chained needs --heads and --device-name: the chain is that device's tree's")
    profile = HeadProfile.load(args.profile).for_new_tokens(args.max_new_tokens or None)
    ranks = profile.position_ranks
    tops = [int(part) for part in args.top.split(",")]
    if max(tops) > profile.topk:
        raise SystemExit(f"the profile keeps ranks up to {profile.topk}, not {max(tops)}")
    tree = None
    if args.heads is not None:
        from medusa.tuned_trees import read_tuned_trees

        entry = read_tuned_trees(args.heads)[args.device_name]
        tree = entry.tree(profile.num_heads, args.heads, chained=args.chained)
    chain = tree.lookup if args.chained else 0

    def ceiling(k: int) -> np.ndarray:
        return with_chain(ceiling_depths(ranks, k), ranks, chain) if chain else ceiling_depths(ranks, k)

    beside = f", a {chain}-node lookup chain beside each" if chain else ""
    print(f"{ranks.positions} positions in {len(ranks.segments)} answers; ranks kept up to top-{profile.topk}{beside}")
    print(" top-k per depth   nodes below the root   tokens/step (walk)")
    for k in tops:
        nodes = sum(k**depth for depth in range(1, ranks.ranks.shape[1] + 1))
        print(f"{k:>16} {nodes:>22,} {walk_lengths(ceiling(k), ranks.segments)[0]:>20.3f}")
    columns: dict[str, np.ndarray] = {}
    if tree is not None:
        depths = accepted_depths(ranks.ranks, tree.paths, profile.topk)
        depths = with_chain(depths, ranks, chain) if chain else depths
        name = f"tuned tree ({tree.size} nodes{f', {chain} of them a chain' if chain else ''})"
        columns[name] = depths
        print(f"{args.device_name}'s {name}: {walk_lengths(depths, ranks.segments)[0]:.3f}")
    if args.answers is not None:
        for k in tops:
            nodes = sum(k**depth for depth in range(1, ranks.ranks.shape[1] + 1))
            columns[f"top-{k} ({nodes:,} nodes{f' + {chain}' if chain else ''})"] = ceiling(k)
        categories = segment_categories(
            args.answers,
            args.questions,
            profile.num_heads,
            args.max_length,
            ranks.segments,
            args.max_new_tokens or None,
        )
        category_table(ranks, categories, columns)


if __name__ == "__main__":
    main()
