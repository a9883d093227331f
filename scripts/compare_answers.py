"""How close two benchmark runs' answers are: Medusa-2's adapted backbone against the original model, say.

Both bench.json files must come from ``medusa bench --keep-tokens`` on the same questions. Prints the
share of identical answers and the mean number of tokens the answers share before they first differ,
overall and per category, and writes them as JSON.

    python scripts/compare_answers.py original/bench.json autoregressive medusa2/bench.json autoregressive \
        --out docs/benchmarks/DIR/answer_agreement.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medusa.bench.report import answer_agreement
from medusa.files import read_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="bench.json of the reference run (its answers are the yardstick)")
    parser.add_argument("reference_method", help="the method in it, e.g. autoregressive")
    parser.add_argument("other", help="bench.json of the run compared")
    parser.add_argument("other_method", help="the method in it")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    reference = read_json(args.reference, "benchmark report")
    other = read_json(args.other, "benchmark report")
    result = answer_agreement(other["questions"], args.other_method, reference["questions"], args.reference_method)
    result["reference"] = {
        "file": args.reference,
        "method": args.reference_method,
        "command": reference["meta"]["command"],
    }
    result["compared"] = {"file": args.other, "method": args.other_method, "command": other["meta"]["command"]}
    for name, s in [("overall", result["overall"]), *result["per_category"].items()]:
        print(
            f"{name:>16}: {s['identical']:4d} of {s['prompts']:4d} identical, mean common prefix "
            f"{s['mean_common_prefix_tokens']:.1f} of {s['mean_reference_tokens']:.1f} reference tokens"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
