"""Sampled acceptance on the CPU with the steps overlapped or not, in float32 or bf16 (session 22).

    python overlap_and_dtype_check.py TREE.json float32|bfloat16 QUESTIONS.jsonl

Four Spec-Bench first turns (every 20th of the first 80), 64 new tokens, temperature 0.7, rejection sampling, the
shipped heads with TREE and a 24-node lookup chain, seeds 0-3.
"""

import json
import sys
import time

from medusa.decoding import DecodingStats
from medusa.model import MedusaModel

tree, dtype, questions = sys.argv[1:4]
model = MedusaModel.from_pretrained(None, tree=tree, dtype=dtype, device="cpu")
records = [json.loads(line) for line in open(questions)][:80:20]
previous = None
for overlap in (False, True):
    steps = committed = 0
    answers = []
    start = time.time()
    for seed, record in enumerate(records):
        ids = model.encode_prompt(record["turns"][0])
        stats = DecodingStats()
        chunks = model.stream(
            ids,
            stats=stats,
            max_new_tokens=64,
            temperature=0.7,
            seed=seed,
            acceptance="rejection",
            lookup=24,
            overlap=overlap,
        )
        answers.append([token for chunk in chunks for token in chunk.token_ids])
        steps += stats.steps
        committed += sum(stats.accepted_per_step)
    print(
        f"overlap={overlap}: {committed / steps:.2f} tokens/step, {sum(map(len, answers))} tokens, "
        f"{time.time() - start:.0f} s",
        flush=True,
    )
    if previous is not None:
        print("same tokens as without overlap:", answers == previous)
    previous = answers
