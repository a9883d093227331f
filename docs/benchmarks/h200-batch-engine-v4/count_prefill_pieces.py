"""Count captured-prefill pieces for autoregressive decoding at batch 32 on the CPU: the join schedule is the
engine's own (which rows finish when depends on the tokens, float32 here against bf16 on the GPU).

The CPU has no graphs, so the engine is told it captures prefills; each piece then runs eagerly, as the GPU would
replay it. Run from the repository root with the package installed: python THIS_FILE GGUF QUESTIONS [NEW_TOKENS]
"""

import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, "scripts")
from batch_throughput import spec_bench_prompts  # noqa: E402

import medusa.engine as engine_module  # noqa: E402
from medusa.engine import EngineOptions  # noqa: E402
from medusa.model import GenerationConfig, MedusaModel  # noqa: E402

engine_module.DecodingEngine.captures_prefills = property(
    lambda self: all(layer.is_initialized for layer in self.decoder.cache.layers)
)
pieces = collections.Counter()
run_prefill = engine_module.DecodingEngine.run_prefill


def counting(self, prompts, width, kind, captured):
    pieces[(prompts, width, captured)] += 1
    return run_prefill(self, prompts, width, kind, captured)


engine_module.DecodingEngine.run_prefill = counting
calls = []
plan = engine_module.prefill_plan


def planning(lengths, max_length, captured):
    calls.append(len(lengths))
    return plan(lengths, max_length, captured)


engine_module.prefill_plan = planning
model = MedusaModel.from_pretrained(sys.argv[1], dtype="float32", device="cpu")
prompts = [model.encode_prompt(text) for text in spec_bench_prompts(Path(sys.argv[2]), 128)]
new_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 128
start = time.time()
options = EngineOptions(use_heads=False)
model.generate_batch(prompts, GenerationConfig(max_new_tokens=new_tokens), options=options, max_batch=32)
report = {
    "seconds": round(time.time() - start, 1),
    "prefill_calls": len(calls),
    "prompts_per_call": calls,
    "pieces": sum(pieces.values()),
    "eager_pieces": sum(count for key, count in pieces.items() if not key[2]),
    "by_size": collections.Counter(key[0] for key in pieces.elements()),
    "padded_tokens": sum(key[0] * key[1] * count for key, count in pieces.items()),
}
print(json.dumps(report))
