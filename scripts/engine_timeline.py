"""Where a batched pass's wall time goes on the host, on a random-weight model of a given shape (no GGUF needed).

Three questions the throughput runs left open (docs/benchmarks/h100-batch-engine-v2/):

- prefill: how long a prompt of a length not seen before takes, against one of a length seen before, with
  torch's default attention backends and with cuDNN's left out (cuDNN builds a plan per new shape);
- steps: per step, the seconds spent launching, waiting for the device (the one sync), on per-row
  bookkeeping and on rows leaving (``DecodingEngine.times``), for batches without and with heads;
- capture: the seconds and memory one CUDA graph costs, for capturing every graph at a server's start.

    python scripts/engine_timeline.py --out timeline.json          # on a GPU
    python scripts/engine_timeline.py --shape tiny --out /tmp/t.json   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from medusa.bench.costcurve import random_model, tree_of_size
from medusa.bench.environment import environment, synchronize
from medusa.engine import EngineOptions, StepTimes
from medusa.heads import MedusaHeadsConfig
from medusa.model import GenerationConfig, MedusaModel

NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def prefill_ms(model: MedusaModel, options: EngineOptions, lengths: list[int], backends) -> list[float]:
    """Milliseconds to prefill one prompt of each length into an idle engine (synchronised)."""
    engine = model.engine(options, max_rows=1, max_length=max(lengths) + 8)
    vocab = model.base_model.config.get_text_config().vocab_size
    times = []
    for length in lengths:
        generation = model.prepare(torch.randint(0, vocab, (length,)), GenerationConfig(max_new_tokens=1))
        synchronize(model.device)
        started = time.perf_counter()
        with sdpa_kernel(backends) if backends else _nothing():
            engine.add([generation])
        synchronize(model.device)
        times.append(1e3 * (time.perf_counter() - started))
        engine.finish([generation])
    return times


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def step_breakdown(model: MedusaModel, options: EngineOptions, batch: int, rng: random.Random) -> dict:
    """One batch of random prompts (50-300 tokens) each with its own limit (64-128 new tokens): per-step host
    seconds by phase, after an untimed batch that captures the graphs."""
    vocab = model.base_model.config.get_text_config().vocab_size
    engine = model.engine(options, max_rows=batch, max_length=512)

    def generations():
        return [
            model.prepare(
                torch.tensor([rng.randrange(vocab) for _ in range(rng.randint(50, 300))]),
                GenerationConfig(max_new_tokens=rng.randint(64, 128)),
            )
            for _ in range(batch)
        ]

    for _ in engine.run(generations()):  # untimed: graphs, allocator
        pass
    synchronize(model.device)
    batch_generations = generations()
    engine.add(batch_generations)
    engine.times = StepTimes()
    started = time.perf_counter()
    while engine.active:
        engine.step()
    synchronize(model.device)
    seconds = time.perf_counter() - started
    times = engine.times
    per_step = {name: 1e3 * getattr(times, name) / times.steps for name in ("launch", "wait", "bookkeeping", "leave")}
    tokens = sum(g.stats.new_tokens for g in batch_generations)
    return {
        "batch": batch,
        "use_heads": options.use_heads,
        "steps": times.steps,
        "ms_per_step": 1e3 * seconds / times.steps,
        "ms_per_step_by_phase": per_step,
        "new_tokens": tokens,
        "tokens_per_second": tokens / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m", help="a medusa.bench.costcurve shape, or 'tiny'")
    parser.add_argument("--batches", default="1,4,8,32")
    parser.add_argument("--nodes", type=int, default=64, help="the tree's nodes with heads (root included)")
    parser.add_argument("--prefill-lengths", type=int, default=12, help="new prompt lengths per backend")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.shape == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024,
        )  # fmt: skip
        base = LlamaForCausalLM(config).to(device, dtype).eval()
    else:
        base = random_model(args.shape, device, dtype)
    text = base.config.get_text_config()
    heads = MedusaHeadsConfig(
        hidden_size=text.hidden_size, vocab_size=text.vocab_size, num_heads=4, num_layers=2, share_lm_head=True
    )
    model = MedusaModel.from_pretrained(base, heads=heads, tree=tree_of_size(args.nodes, 4))
    rng = random.Random(0)
    report: dict = {"meta": {**environment(device), "shape": args.shape, "nodes": args.nodes}}

    # Prefill: fresh lengths for each backend set first (nothing cached for them), then the same lengths again.
    lengths = rng.sample(range(40, 400), 2 * args.prefill_lengths)
    prefill = {}
    plain = EngineOptions(use_heads=False)
    prefill_ms(model, plain, [17], None)  # the first call's one-time costs (kernels loading) fall on neither
    for index, (name, backends) in enumerate((("default", None), ("no_cudnn", NO_CUDNN))):
        chosen = lengths[index * args.prefill_lengths : (index + 1) * args.prefill_lengths]
        first = prefill_ms(model, plain, chosen, backends)
        again = prefill_ms(model, plain, chosen, backends)
        prefill[name] = {"new_length_ms": statistics.median(first), "seen_length_ms": statistics.median(again)}
        print(f"prefill {name}: new length {statistics.median(first):.1f} ms, seen {statistics.median(again):.1f} ms")
    report["prefill"] = prefill

    steps = []
    for use_heads in (False, True):
        options = EngineOptions(use_heads=use_heads)
        for batch in (int(b) for b in args.batches.split(",")):
            row = step_breakdown(model, options, batch, rng)
            steps.append(row)
            parts = ", ".join(f"{k} {v:.2f}" for k, v in row["ms_per_step_by_phase"].items())
            print(
                f"{'heads' if use_heads else 'no heads'} batch {batch}: {row['ms_per_step']:.2f} ms/step ({parts}), "
                f"{row['tokens_per_second']:.0f} tok/s",
                flush=True,
            )
        capture = model.engine(options).capture_report()
        if capture is not None and capture.graphs:
            report.setdefault("capture", {})["heads" if use_heads else "no_heads"] = {
                "graphs": capture.graphs,
                "seconds_per_graph": capture.seconds / capture.graphs,
                "memory_mib": capture.memory_bytes / 2**20,
            }
            print(f"capture: {capture.graphs} graphs, {capture.seconds / capture.graphs:.3f} s each, "
                  f"{capture.memory_bytes / 2**20:.0f} MiB")  # fmt: skip
    report["steps"] = steps
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
