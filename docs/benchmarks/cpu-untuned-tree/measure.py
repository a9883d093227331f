import json, statistics, sys, time, torch
from medusa.model import MedusaModel
torch.set_num_threads(int(sys.argv[1]))
model = MedusaModel.from_pretrained(None, dtype="float32", device="cpu")
print("loaded with", model.tree_choice.origin if model.tree_choice else "given tree", flush=True)
prompts = ["Explain tree attention in one paragraph.", "Write a short story about a lighthouse keeper.",
           "List five tips for learning a new language."]
model.generate(prompts[0], max_new_tokens=8, tree="[]")  # warm-up
rows = {}
for label, tree in (("1 node (tuned for cpu)", "[]"), ("8-node default", 8), ("16-node default", 16), ("64-node default", 64)):
    tokens = seconds = accepted = steps = 0
    for prompt in prompts:
        result = model.generate(prompt, max_new_tokens=96, tree=tree)
        tokens += result.stats.new_tokens; seconds += result.stats.decode_seconds
        accepted += sum(result.stats.accepted_per_step); steps += result.stats.steps
    rows[label] = {"tokens_per_second": round(tokens / seconds, 2), "accepted_per_step": round(accepted / steps, 3), "new_tokens": tokens}
    print(label, rows[label], flush=True)
json.dump({"threads": int(sys.argv[1]), "torch": torch.__version__, "rows": rows}, open(f"threads{sys.argv[1]}.json", "w"), indent=1)
