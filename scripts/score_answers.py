"""How a model judges answers that a benchmark run kept: is each token the one it would have chosen?

Greedy answers leave each other at the first token two models rank differently, so a count of identical
answers says little about how far a model has moved (Medusa-2's adapted backbone, say). This script
teacher-forces each kept answer through a reference model (the original) and reports, per answer token,
how often it is the reference's own greedy choice and its mean negative log-likelihood, overall and per
category. Scoring the reference's own greedy answers gives the yardstick.

    python scripts/score_answers.py medusa2/bench.json medusa --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --out docs/benchmarks/DIR/score_medusa2.json

The bench.json must come from ``medusa bench --keep-tokens``; prompts are rebuilt from the questions file
exactly as the benchmark built them: a second turn's prompt holds the first answer of the run's reference
method (``meta.reference``), as ``medusa.bench.runner`` feeds it back.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from medusa.bench.runner import encode_turn
from medusa.bench.specbench import default_questions_path, load_questions, turn_messages
from medusa.files import read_json
from medusa.model import MedusaModel


def score(model: MedusaModel, prompt: list[int], answer: list[int]) -> tuple[int, float]:
    """(answer tokens that are the model's argmax given what precedes them, summed NLL of the answer)."""
    ids = torch.tensor([prompt + answer], dtype=torch.long, device=model.device)
    with torch.inference_mode():
        logits = model.base_model(ids).logits[0, len(prompt) - 1 : -1].float()
    targets = ids[0, len(prompt) :]
    chosen = int((logits.argmax(dim=-1) == targets).sum())
    nll = float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
    return chosen, nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="bench.json written with --keep-tokens")
    parser.add_argument("method", help="the method whose answers to score, e.g. medusa")
    parser.add_argument("--model", help="the reference model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--questions", type=Path, default=None, help="Spec-Bench questions (default: ../shared/data)")
    parser.add_argument("--limit", type=int, help="score only the first N answers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    report = read_json(args.bench, "benchmark report")
    questions = {q.question_id: q for q in load_questions(args.questions or default_questions_path())}
    rows = {(r["id"], r["turn"]): r for r in report["questions"]}
    records = [r for r in report["questions"] if args.method in r["methods"]]
    if not records:
        raise SystemExit(f"{args.bench}: no answers of method {args.method!r}; it holds {', '.join(report['methods'])}")
    missing = [r["id"] for r in records if "token_ids" not in r["methods"][args.method]]
    if missing:
        raise SystemExit(
            f"{args.bench}: {len(missing)} of {len(records)} {args.method} answers have no kept tokens "
            "(ran without --keep-tokens?)"
        )
    model = MedusaModel.from_pretrained(args.model, heads=None, dtype=args.dtype, device=args.device)

    def fed_back(question_id: int, turn: int) -> str:
        """The answer the run put into later turns' prompts: its reference method's, else the row's first."""
        methods = rows[(question_id, turn)]["methods"]
        sample = methods.get(report["meta"].get("reference")) or next(iter(methods.values()))
        return model.tokenizer.decode(sample["token_ids"], skip_special_tokens=True)

    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for index, record in enumerate(records[: args.limit]):
        question = questions[record["id"]]
        earlier = [fed_back(record["id"], turn) for turn in range(1, record["turn"])]
        prompt = encode_turn(model, turn_messages(question, record["turn"] - 1, earlier))
        if len(prompt) != record["prompt_tokens"]:
            raise SystemExit(
                f"question {record['id']} turn {record['turn']}: the rebuilt prompt has {len(prompt)} "
                f"tokens, the run's had {record['prompt_tokens']}: another tokenizer or template?"
            )
        answer = record["methods"][args.method]["token_ids"]
        if not answer:
            continue
        chosen, nll = score(model, prompt, answer)
        for name in ("overall", record["category"]):
            totals[name]["answers"] += 1
            totals[name]["tokens"] += len(answer)
            totals[name]["argmax_tokens"] += chosen
            totals[name]["nll"] += nll
        if (index + 1) % 40 == 0:
            print(f"{index + 1}/{len(records)}", flush=True)
    result = {
        "bench": str(args.bench),
        "method": args.method,
        "reference_model": args.model or "SmolLM2-135M-Instruct",
        "dtype": args.dtype,
        "device": args.device,
        "scores": {
            name: {
                "answers": int(t["answers"]),
                "tokens": int(t["tokens"]),
                "argmax_share": t["argmax_tokens"] / t["tokens"],
                "mean_nll": t["nll"] / t["tokens"],
            }
            for name, t in totals.items()
        },
    }
    for name, s in result["scores"].items():
        print(
            f"{name:>16}: {s['answers']:4d} answers, {s['tokens']:6d} tokens, reference's argmax at "
            f"{s['argmax_share']:.3f}, mean NLL {s['mean_nll']:.3f}"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
