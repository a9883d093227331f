"""Accepted tokens per step of heads' tuned trees on Spec-Bench answers, measured without a GPU.

Greedy decoding accepts, at each step, the deepest tree node whose path matches the greedy continuation. So,
given the greedy answers and where each head's guesses ranked at every position (`medusa tree profile` on those
answers), replaying that walk gives the accepted tokens per step that decoding with the tree measures (on the
104 questions here: 1.75 against 1.73 measured on the H100 alone, 2.48 against 2.50 with the lookup chain).

    medusa distill --data spec104_prompts.jsonl --output spec104.jsonl --max-new-tokens 128 --max-prompt-tokens 4096
    medusa tree profile --heads HEADS --data spec104.jsonl --limit 104 --max-length 4096 --output profile-NAME.json
    python walk_tuned_trees.py --device "NVIDIA H100 80GB HBM3" NAME=HEADS=profile-NAME.json ... > cpu_walk.json

``spec104_prompts.jsonl`` holds the first turns of the questions that the GPU benchmark ran (the ids in its
``bench.json``), as ``{"id", "prompt"}`` records.

With ``--batches``, each batch bucket's tuned tree is walked too; a fourth field, ``NAME=HEADS=PROFILE=CURVE``
(a ``medusa bench --cost-curve --batch-sizes`` file), prices each bucket's step, giving an estimate of tokens/s
per row (``../h100-sequential-heads-480/``). That is an estimate: the walk's accepted tokens over the curve's
median step, without prefill or the engine's bookkeeping.
"""

from __future__ import annotations

import argparse
import json

from medusa.treeopt.build import expected_length
from medusa.treeopt.profile import HeadProfile
from medusa.treeopt.tune import CostCurve
from medusa.tuned_trees import read_tuned_trees


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", required=True, help="the tuned_trees.json entry to replay (a device's name)")
    parser.add_argument("--new-tokens", type=int, default=128, help="walk the first N tokens of each answer")
    parser.add_argument("--batches", action="store_true", help="also walk each batch bucket's tuned tree")
    parser.add_argument("heads", nargs="+", metavar="NAME=HEADS_DIR=PROFILE[=COST_CURVE]")
    args = parser.parse_args()
    report = {"device": args.device, "new_tokens": args.new_tokens, "heads": {}}
    for spec in args.heads:
        name, directory, profile_file, *curve_file = spec.split("=")
        profile = HeadProfile.load(profile_file).for_new_tokens(args.new_tokens)
        entry = read_tuned_trees(directory)[args.device]
        origin = f"{directory} ({args.device})"
        alone = entry.tree(profile.num_heads, origin)
        chained = entry.tree(profile.num_heads, origin, chained=True)
        report["heads"][name] = heads_report = {
            "positions": profile.samples,
            "alone": {"nodes": alone.size, "tokens_per_step": round(expected_length(profile, alone, "walk"), 4)},
            "with_lookup": {
                "nodes": chained.size,
                "lookup": chained.lookup,
                "tokens_per_step": round(expected_length(profile, chained, "walk"), 4),
            },
        }
        if not args.batches:
            continue
        heads_report["batches"] = buckets = {}
        for batch, tree in sorted(entry.batch_trees(profile.num_heads, origin).items()):
            accepted = expected_length(profile, tree, "walk")
            buckets[batch] = {"nodes": tree.size, "lookup": tree.lookup, "tokens_per_step": round(accepted, 4)}
            if curve_file:
                seconds = CostCurve.load(curve_file[0], batch=batch).points.get(tree.size)
                if seconds is not None:
                    buckets[batch]["step_ms"] = round(seconds * 1e3, 3)
                    buckets[batch]["row_tokens_per_second"] = round(accepted / seconds, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
