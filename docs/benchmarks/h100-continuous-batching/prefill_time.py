import time, torch, statistics, json, os
from medusa.bench.costcurve import random_model
from medusa.model import MedusaModel, GenerationConfig
from medusa.engine import EngineOptions
base = random_model("smollm2-135m", torch.device("cuda"), torch.bfloat16)
model = MedusaModel.from_pretrained(base, tree="16")
engine = model.engine(EngineOptions(use_heads=False), max_rows=8, max_length=1024, keep=False)
g = model.prepare(list(range(5, 40)), GenerationConfig(max_new_tokens=2, chat_template=False))
for _ in engine.run([g]): pass
out = {}
for captured in (False, True):
    engine.prefill_graphs_refused = not captured
    for count in (1, 8):
        times = []
        for trial in range(6):
            gens = [model.prepare([(7 * i + trial + j) % 400 + 5 for i in range(73)], GenerationConfig(max_new_tokens=1, chat_template=False)) for j in range(count)]
            torch.cuda.synchronize(); t = time.perf_counter()
            engine.add(gens)
            torch.cuda.synchronize(); times.append(time.perf_counter() - t)
            engine.finish(gens)
        out[f"{'captured' if captured else 'eager'} x{count}"] = {"first_ms": round(1e3 * times[0], 2), "median_ms_after": round(1e3 * statistics.median(times[1:]), 2)}
        print(json.dumps(out), flush=True)
json.dump(out, open(os.environ["OUT"] + "/prefill_time.json", "w"), indent=1)
