"""The cost curve: how long one decoding step takes as the tree grows, next to the memory floor.

At batch 1 a step reads every weight once, so a step cannot be faster than weight bytes over memory
bandwidth; until the tree's tokens make the matrix products compute-bound, verifying more nodes should
cost almost nothing more. Where the curve leaves the floor says how big a tree is worth verifying,
which is what the tree-optimisation issue needs. A point is one full step of ``batch`` rows (propose
with the heads, verify every row's tree in one forward pass, accept, commit) at a fixed context length,
taken through the engine ``MedusaModel.generate`` uses, so that it runs as a CUDA graph where decoding
does; one node is the plain autoregressive step, without heads. Over batch sizes the curve says where
speculation stops paying: a larger batch fills the matrix units with rows instead of tree nodes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from medusa.bench.environment import synchronize
from medusa.decoding import ATTENTION_SPAN_STEP
from medusa.engine import BATCH_BUCKETS, EngineOptions, check_count
from medusa.errors import MedusaError
from medusa.files import atomic_path
from medusa.lookup import DEFAULT_MAX_NGRAM, check_lookup
from medusa.model import GenerationConfig, MedusaModel
from medusa.tree import GENERIC_HEAD_ACCURACY, Tree, build_tree_from_accuracies

# Published dimensions; weights are random, which is all a timing needs. "tiny" is for smoke tests.
SHAPES: dict[str, dict] = {
    "llama2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    ),
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    ),
}
DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class CostCurveConfig:
    sizes: tuple[int, ...] = DEFAULT_SIZES
    context: int = 512  # committed tokens in the cache when the step runs
    repeats: int = 50
    warmup: int = 5
    cuda_graphs: bool = True
    compile: bool | str = False
    lookup: int = 0  # nodes of each tree that are a lookup chain (its search runs in the step too)
    span_step: int | None = ATTENTION_SPAN_STEP  # EngineOptions.attention_span_step
    batch_sizes: tuple[int, ...] = (1,)  # rows decoded together; each a batch bucket

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(sorted(set(self.batch_sizes)))
        if not self.batch_sizes or any(b not in BATCH_BUCKETS for b in self.batch_sizes):
            raise MedusaError(
                f"batch sizes must be batch buckets ({', '.join(map(str, BATCH_BUCKETS))}), "
                f"got {list(self.batch_sizes)}"
            )
        self.sizes = tuple(sorted(set(self.sizes)))
        if not self.sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.sizes):
            raise MedusaError(f"tree sizes must be positive integers, got {list(self.sizes)}")
        check_lookup(self.lookup, DEFAULT_MAX_NGRAM)
        if self.sizes[0] <= self.lookup:
            raise MedusaError(
                f"with a {self.lookup}-node lookup chain every tree size must exceed {self.lookup} "
                f"(the root and the chain), got {self.sizes[0]}"
            )
        for name, least in (("context", 1), ("repeats", 1), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise MedusaError(f"{name} must be an integer of at least {least}, got {value!r}")
        check_count("span_step", self.span_step)


def random_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> PreTrainedModel:
    """A Llama of a named shape with random weights, created directly on ``device`` in ``dtype``."""
    if shape not in SHAPES:
        raise MedusaError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    config = LlamaConfig(**SHAPES[shape], eos_token_id=None, bos_token_id=None, pad_token_id=None)
    config._name_or_path = f"{shape} (random weights)"
    torch.manual_seed(seed)
    with torch.device(device):  # a 7B model is never materialised on the CPU first
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def measure_bandwidth(device: torch.device, megabytes: int | None = None, repeats: int = 10) -> float:
    """Bytes per second of a large copy on ``device``, counting the bytes read and the bytes written."""
    size = (megabytes or (1024 if device.type == "cuda" else 256)) << 20
    source = torch.ones(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(2):
        target.copy_(source)
    seconds = _time_calls(lambda: target.copy_(source), device, repeats)
    return 2 * size / statistics.median(seconds)


def _time_calls(
    call: Callable[[], object], device: torch.device, repeats: int, before: Callable[[], None] | None = None
) -> list[float]:
    """Seconds per call: CUDA events on a GPU (the device's own clock), a host clock on the CPU."""
    if device.type == "cuda":
        events = []
        for _ in range(repeats):
            if before is not None:
                before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    seconds = []
    for _ in range(repeats):
        if before is not None:
            before()
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds


def accuracy_prior(num_heads: int) -> list[list[float]]:
    """The generic per-head accuracy prior, one row per head (rows past the fifth repeat the last, decayed)."""
    rows = [list(row) for row in GENERIC_HEAD_ACCURACY[:num_heads]]
    while len(rows) < num_heads:
        rows.append([p * 0.8 for p in rows[-1]])
    return rows


def tree_of_size(size: int, num_heads: int) -> Tree:
    """The greedy tree of ``size`` nodes (root included) laid out from the generic prior."""
    paths = build_tree_from_accuracies(accuracy_prior(num_heads), size)
    if len(paths) != size - 1:
        raise MedusaError(f"{num_heads} heads of {len(GENERIC_HEAD_ACCURACY[0])} ranks cannot make a {size}-node tree")
    return Tree.from_paths(paths)


@dataclass
class StepTiming:
    seconds: list[float]  # one per timed step
    depth: int  # the tree's depth, lookup chain included
    attention_span: int  # the cache slots the steps attended over


def step_seconds(model: MedusaModel, size: int, config: CostCurveConfig, batch: int = 1) -> StepTiming:
    """Timed steps of ``batch`` rows with a ``size``-node tree (``config.lookup`` of its nodes a lookup chain),
    every row at ``config.context`` committed tokens and every step the same (rows are rewound to it)."""
    heads_size = size - config.lookup
    use_heads = heads_size > 1
    if use_heads and model.heads is None:
        raise MedusaError("a tree of more than one node needs heads, but the model has none")
    tree = tree_of_size(heads_size, model.heads.config.num_heads) if use_heads else Tree.from_paths([])
    tree = tree.with_lookup(config.lookup)
    vocab = model.base_model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(size)
    options = EngineOptions(
        use_heads=use_heads,
        cuda_graphs=config.cuda_graphs,
        compile=config.compile,
        lookup=config.lookup,
        attention_span_step=config.span_step,
    )
    engine = model.engine(options, tree if use_heads else None, max_rows=batch, max_length=config.context + 1)
    request = GenerationConfig(max_new_tokens=1)
    prompts = [torch.randint(0, vocab, (config.context,), generator=generator).to(model.device) for _ in range(batch)]
    generations = [model.prepare(prompt, request) for prompt in prompts]
    engine.add(generations)
    rows, span, kind = engine.step_shape()
    decoder = engine.decoder

    def step() -> tuple[torch.Tensor, ...]:
        return engine.run_step(rows, span, kind)

    def rewind() -> None:  # back to the same context, so every timed step does the same work
        decoder.lengths[:batch].fill_(config.context)

    try:
        with torch.inference_mode():
            _time_calls(step, model.device, config.warmup, before=rewind)
            seconds = _time_calls(step, model.device, config.repeats, before=rewind)
        synchronize(model.device)
    finally:
        engine.finish(generations)
        model.release_engines()
    return StepTiming(seconds, tree.max_depth, span)


def cost_curve(model: MedusaModel, config: CostCurveConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Step latency per tree size, the memory floor, and how the two compare (JSON-ready)."""
    context_limit = model.context_length
    if context_limit is not None and config.context + max(config.sizes) > context_limit:
        raise MedusaError(
            f"context {config.context} plus a {max(config.sizes)}-node tree exceeds the model's "
            f"{context_limit} positions"
        )
    weight_bytes = parameter_bytes(model.base_model)
    bandwidth = measure_bandwidth(model.device)
    floor = weight_bytes / bandwidth
    points = []
    for batch, size in ((b, n) for b in config.batch_sizes for n in config.sizes):
        timing = step_seconds(model, size, config, batch)
        seconds = timing.seconds
        median = statistics.median(seconds)
        deciles = statistics.quantiles(seconds, n=10, method="inclusive") if len(seconds) > 1 else seconds * 9
        points.append(
            {
                "batch": batch,
                "nodes": size,
                "depth": timing.depth,
                "lookup": config.lookup,
                "attention_span": timing.attention_span,
                "median_ms": 1e3 * median,
                "min_ms": 1e3 * min(seconds),
                "p10_ms": 1e3 * deciles[0],
                "p90_ms": 1e3 * deciles[-1],
                "max_ms": 1e3 * max(seconds),
                "x_floor": median / floor,
            }
        )
        if progress is not None:
            progress(f"batch {batch}, {size} nodes: {1e3 * median:.3f} ms")
    for point in points:
        one_node = next((p["median_ms"] for p in points if p["nodes"] == 1 and p["batch"] == point["batch"]), None)
        point["x_one_token"] = point["median_ms"] / one_node if one_node else None
    return {
        "weight_bytes": weight_bytes,
        "heads_bytes": parameter_bytes(model.heads) if model.heads is not None else 0,
        "bandwidth_bytes_per_s": bandwidth,
        "floor_ms": 1e3 * floor,
        "points": points,
    }


def validate_cost_curve(result: dict) -> None:
    """Raise ``ValueError`` naming the first thing missing from a cost-curve result."""
    for key in ("meta", "weight_bytes", "bandwidth_bytes_per_s", "floor_ms", "points"):
        if key not in result:
            raise ValueError(f"cost curve lacks {key}")
    for index, point in enumerate(result["points"]):
        missing = [
            k
            for k in ("nodes", "depth", "median_ms", "min_ms", "p10_ms", "p90_ms", "max_ms", "x_floor", "x_one_token")
            if k not in point
        ]
        if missing:
            raise ValueError(f"cost curve points[{index}] lacks {', '.join(missing)}")


def plot_cost_curve(result: dict, path: str | Path) -> Path:
    """Step latency against tree nodes (log scale), with the memory floor as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot(1, 1, 1)
    batches = sorted({p.get("batch", 1) for p in result["points"]})
    for batch in batches:
        points = [p for p in result["points"] if p.get("batch", 1) == batch]
        nodes = [p["nodes"] for p in points]
        label = "one decoding step (median)" if len(batches) == 1 else f"batch {batch} (median step)"
        axis.plot(nodes, [p["median_ms"] for p in points], marker="o", label=label)
        axis.fill_between(
            nodes,
            [p["p10_ms"] for p in points],
            [p["p90_ms"] for p in points],
            alpha=0.2,
            label="10th to 90th percentile" if len(batches) == 1 else None,
        )
    nodes = sorted({p["nodes"] for p in result["points"]})
    axis.axhline(
        result["floor_ms"],
        color="black",
        linestyle="--",
        label=f"memory floor {result['floor_ms']:.3f} ms (weights / bandwidth)",
    )
    axis.set_xscale("log", base=2)
    axis.set_xticks(nodes, [str(n) for n in nodes])
    axis.set_ylim(bottom=0)
    axis.set_xlabel("tree nodes verified per step")
    axis.set_ylabel("milliseconds")
    meta = result["meta"]
    axis.set_title(
        f"{meta['model']} on {meta['device']} ({meta['dtype']}, context {meta['context']})", fontsize="medium"
    )
    axis.legend(fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120)
    return path
