"""Fitting the tree to the hardware: the node count that maximises expected tokens per second.

A step verifies the whole tree in one forward pass; its latency is flat while the GPU is bound by
reading the weights and grows once the tree's tokens make it compute-bound (on a CPU it grows almost
at once). Expected tokens per step grow ever more slowly with each node. The best tree is where
expected tokens per step divided by step latency peaks, which only this device's cost curve tells.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medusa.engine import EngineOptions
from medusa.errors import MedusaError
from medusa.files import read_json, write_json
from medusa.model import GenerationConfig, MedusaModel
from medusa.tree import Tree
from medusa.treeopt.build import build_tree, expected_grid
from medusa.treeopt.profile import HeadProfile
from medusa.tuned_trees import BatchTree, ChainedTree, TunedTree, device_kind

DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Lookup chains the tuner tries beside each heads tree (0: none); medusa.lookup.MAX_LOOKUP_NODES is the longest.
LOOKUP_CHOICES = (0, 2, 4, 6, 8, 10, 12, 16, 20, 24)


@dataclass
class CostCurve:
    """Seconds per decoding step against tree nodes, on one device, for one head type. JSON: {"points": [{"nodes",
    "seconds"}], "device", "head_type"}.

    ``load`` also reads ``medusa bench --cost-curve`` results (``median_ms`` per point, ``meta.device``,
    ``meta.heads.head_type``). Sequential heads make one head call per tree depth, so their steps cost more than
    Medusa heads' at the same size: a curve prices only its own head type (curves that name none are Medusa's).
    """

    points: dict[int, float]
    device: str | None = None
    head_type: str = "medusa"
    prefix_layer: bool = False  # timed with Hydra++'s prefix layer, which every step runs over its accepted path

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "head_type": self.head_type,
            "prefix_layer": self.prefix_layer,
            "points": [{"nodes": n, "seconds": s} for n, s in sorted(self.points.items())],
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(
            parents=True, exist_ok=True
        )  # a measured curve took minutes: never lose it to a missing folder
        write_json(path, self.to_dict(), indent=1)

    @staticmethod
    def batch_sizes(path: str | Path) -> list[int]:
        """The batch sizes a cost-curve file measured (points without a ``batch`` are batch 1)."""
        raw = read_json(path, "cost curve")
        points = raw.get("points") if isinstance(raw, dict) else None
        return sorted({p.get("batch", 1) for p in points if isinstance(p, dict)}) if isinstance(points, list) else []

    @classmethod
    def load(
        cls, path: str | Path, batch: int = 1, head_type: str | None = None, prefix_layer: bool | None = None
    ) -> CostCurve:
        """The curve at ``batch`` rows (a ``medusa bench --cost-curve --batch-sizes`` file holds several); with
        ``head_type`` (``prefix_layer``), refused unless it was measured with heads of that type (with or without
        the prefix layer)."""
        path = Path(path)
        raw = read_json(path, "cost curve")
        points = raw.get("points") if isinstance(raw, dict) else None
        if not isinstance(points, list) or not points:
            raise MedusaError(f'cost curve {path} must be {{"points": [{{"nodes": n, "seconds": s}}, ...]}}')
        points = [p for p in points if not isinstance(p, dict) or p.get("batch", 1) == batch]
        if not points:
            raise MedusaError(f"cost curve {path} has no point at batch size {batch}")
        curve: dict[int, float] = {}
        for point in points:
            nodes = point.get("nodes") if isinstance(point, dict) else None
            seconds = point.get("seconds") if isinstance(point, dict) else None
            if seconds is None and isinstance(point, dict) and isinstance(point.get("median_ms"), (int, float)):
                seconds = point["median_ms"] / 1e3
            if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
                raise MedusaError(f"cost curve {path}: nodes must be a positive integer, got {point!r:.80}")
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
                raise MedusaError(f"cost curve {path}: seconds must be a positive number, got {point!r:.80}")
            curve[nodes] = float(seconds)
        device = raw.get("device")
        meta = raw.get("meta")
        if device is None and isinstance(meta, dict):  # bench names the CPU by its model; tuning keys it "cpu"
            device = meta.get("device") if meta.get("device_type") == "cuda" else meta.get("device_type")
        measured = raw.get("head_type")
        if measured is None and isinstance(meta, dict) and isinstance(meta.get("heads"), dict):
            measured = meta["heads"].get("head_type")
        measured = measured or "medusa"  # curves from before sequential heads timed Medusa heads
        if head_type is not None and measured != head_type:
            raise MedusaError(
                f"cost curve {path} was measured with {measured} heads, but these heads are {head_type}: their steps "
                f"cost differently; measure one with `medusa bench --cost-curve --head-type {head_type}`, or let "
                "`medusa tree tune` time steps here"
            )
        with_prefix = raw.get("prefix_layer")
        if with_prefix is None and isinstance(meta, dict) and isinstance(meta.get("heads"), dict):
            with_prefix = meta["heads"].get("prefix_layer")
        with_prefix = bool(with_prefix)  # curves from before the prefix layer timed heads without one
        if prefix_layer is not None and with_prefix != prefix_layer:
            timed, these = ("with", "have none") if with_prefix else ("without", "have one")
            raise MedusaError(
                f"cost curve {path} was timed {timed} a prefix layer, but these heads {these}: their steps cost "
                f"differently; measure one with `medusa bench --cost-curve{' --prefix-layer' * prefix_layer}`, or "
                "let `medusa tree tune` time steps here"
            )
        return cls(curve, device if isinstance(device, str) else None, str(measured), with_prefix)


@dataclass
class TuneChoice:
    nodes: int  # the heads' tree, root included
    expected_accept_length: float  # tokens per step, root included
    step_seconds: float
    tokens_per_second: dict[int, float]  # expected, for every size both curves know, without a lookup branch
    lookup: int = 0  # nodes of the lookup chain besides the heads' tree
    # for every total size: the best lookup chain (> 0 nodes) in a tree of that many nodes, and its tokens/s
    lookup_tokens_per_second: dict[int, tuple[int, float]] = field(default_factory=dict)

    @property
    def total_nodes(self) -> int:
        return self.nodes + self.lookup

    @property
    def expected_tokens_per_second(self) -> float:
        return self.expected_accept_length / self.step_seconds


def choose_tree(expected: dict[tuple[int, int], float], cost: CostCurve, max_nodes: int | None = None) -> TuneChoice:
    """The (heads tree, lookup chain) pair with the most expected tokens per second; ``expected`` maps
    ``(tree nodes, chain nodes)`` to tokens per step. Among equals the fewest nodes, then the shortest chain.

    A step costs what the cost curve measured for its total node count, heads' nodes and chain alike
    (the chain's search adds a few small kernels, not counted). Totals the curve did not measure are
    not candidates: step latency jumps at hardware tile sizes, so it is not interpolated.
    """
    rates = {
        (n, lookup): value / cost.points[n + lookup]
        for (n, lookup), value in expected.items()
        if n + lookup in cost.points and (max_nodes is None or n + lookup <= max_nodes)
    }
    if not rates:
        totals = sorted({n + lookup for n, lookup in expected})
        raise MedusaError(
            f"the cost curve ({', '.join(map(str, sorted(cost.points)))} nodes) shares no tree size with the "
            f"profile's trees ({', '.join(map(str, totals))} nodes)"
        )
    best = max(rates, key=lambda pair: (rates[pair], -(pair[0] + pair[1]), -pair[1]))
    plain = {n: rate for (n, lookup), rate in rates.items() if lookup == 0}
    chained: dict[int, tuple[int, float]] = {}
    for (n, lookup), rate in rates.items():
        total = n + lookup
        if lookup and (total not in chained or rate > chained[total][1]):
            chained[total] = (lookup, rate)
    n, lookup = best
    return TuneChoice(n, expected[best], cost.points[n + lookup], plain, lookup, chained)


@dataclass
class TreeTuning:
    """What the tuner decided for one device, and the numbers it decided on."""

    estimate: str
    cost: CostCurve
    max_nodes: int
    grid: dict[tuple[int, int], float]  # (heads' tree nodes, chain nodes) -> expected tokens per step
    heads_choice: TuneChoice  # the best tree without a lookup chain (batched decoding runs it)
    chain_choice: TuneChoice | None  # the best tree with a lookup chain, when chains were tried
    best: TuneChoice  # what single-sequence decoding runs: one of the two
    tree: Tree  # the heads' tree of ``heads_choice``
    chained_tree: Tree | None  # the tree of ``best`` with its chain, when ``best`` has one

    def to_tuned_tree(
        self, profile: HeadProfile, num_heads: int, heads_fingerprint: str, max_new_tokens: int | None
    ) -> TunedTree:
        """The entry ``tuned_trees.json`` keeps for this device."""
        heads, best = self.heads_choice, self.best
        chained = None
        if self.chained_tree is not None:
            chained = ChainedTree(
                paths=[list(p) for p in self.chained_tree.paths],
                lookup=best.lookup,
                topk=self.chained_tree.topk,
                nodes=self.chained_tree.size,
                lookup_ngram=profile.position_ranks.lookup_ngram,
                expected_accept_length=round(best.expected_accept_length, 4),
                step_seconds=best.step_seconds,
                expected_tokens_per_second=round(best.expected_tokens_per_second, 2),
            )
        return TunedTree(
            paths=[list(p) for p in self.tree.paths],
            topk=self.tree.topk,
            nodes=self.tree.size,
            num_heads=num_heads,
            estimate=self.estimate,
            expected_accept_length=round(heads.expected_accept_length, 4),
            step_seconds=heads.step_seconds,
            expected_tokens_per_second=round(heads.expected_tokens_per_second, 2),
            heads_fingerprint=heads_fingerprint,
            profile_samples=profile.samples,
            max_new_tokens=max_new_tokens or None,
            max_nodes=self.max_nodes,
            cost_curve=self.cost.to_dict()["points"],
            chained=chained,
        )


def tune_tree(
    profile: HeadProfile,
    cost: CostCurve,
    estimate: str,
    chains: tuple[int, ...] = (0,),
    max_nodes: int = 256,
    keep_chain: bool = False,
) -> TreeTuning:
    """The fastest heads' tree on this cost curve, and the fastest with one of ``chains`` (node counts, 0 among them).

    The tree with a chain wins for single-sequence decoding when it is expected to be faster, or always with
    ``keep_chain`` (a chain length the user fixed). Only totals of at most ``max_nodes`` that the curve measured count.
    """
    totals = [n for n in cost.points if n <= max_nodes]
    pairs = {(total - chain, chain) for total in totals for chain in chains if total - chain >= 1}
    grid = expected_grid(profile, {n for n, _ in pairs}, chains, estimate)
    grid = {pair: value for pair, value in grid.items() if pair in pairs}
    heads_choice = choose_tree({pair: value for pair, value in grid.items() if pair[1] == 0}, cost, max_nodes)
    chained = {pair: value for pair, value in grid.items() if pair[1] > 0}
    chain_choice = choose_tree(chained, cost, max_nodes) if chained else None
    best = heads_choice
    if chain_choice is not None and (
        keep_chain or chain_choice.expected_tokens_per_second > heads_choice.expected_tokens_per_second
    ):
        best = chain_choice
    tree = build_tree(profile, heads_choice.nodes, estimate)
    chained_tree = build_tree(profile, best.nodes, estimate).with_lookup(best.lookup) if best.lookup else None
    return TreeTuning(estimate, cost, max_nodes, grid, heads_choice, chain_choice, best, tree, chained_tree)


def tune_batches(
    profile: HeadProfile,
    costs: dict[int, CostCurve],
    estimate: str,
    chains: tuple[int, ...] = (0,),
    max_nodes: int = 256,
) -> dict[int, BatchTree]:
    """The fastest tree, lookup chain included, for each batch size's cost curve.

    Every row of a batch gains the same expected tokens per step from a tree, and pays the step's cost, so the
    choice per batch size is the single-sequence one on that size's curve. Where the curve climbs steeply (a
    batch already fills the matrix units) it is the root alone: plain decoding.
    """
    chosen = {}
    for batch, cost in sorted(costs.items()):
        tuning = tune_tree(profile, cost, estimate, chains, max_nodes)
        best = tuning.best
        tree = tuning.chained_tree if best.lookup else tuning.tree
        if best.total_nodes == 1:
            tree = Tree.from_paths([])
        chosen[batch] = BatchTree(
            paths=[list(p) for p in tree.paths],
            lookup=tree.lookup,
            topk=tree.topk,
            nodes=tree.size,
            expected_accept_length=round(best.expected_accept_length, 4),
            step_seconds=best.step_seconds,
            expected_tokens_per_second=round(best.expected_tokens_per_second, 2),
        )
    return chosen


def greedy_trees(profile: HeadProfile, sizes: list[int], estimate: str) -> dict[int, Tree]:
    """The greedy tree of each size, keyed by its real size (a small profile may not fill the largest sizes)."""
    trees = (build_tree(profile, n, estimate) for n in sizes)
    return {tree.size: tree for tree in trees}


def measure_step_seconds(
    model: MedusaModel,
    tree: Tree,
    context: int = 128,
    steps: int = 16,
    repeats: int = 3,
    seed: int = 0,
    batch: int = 1,
) -> float:
    """Median seconds per decoding step of ``batch`` rows with this tree, after a warm-up run (which captures
    the graph on GPUs).

    The prompts are ``context`` random tokens and EOS is ignored, so every run takes the same steps.
    """
    if model.heads is None:
        raise MedusaError("timing trees needs heads")
    vocab = model.base_model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    config = GenerationConfig(max_new_tokens=steps * (tree.max_depth + 1), chat_template=False)
    model.check_lengths(context, config.max_new_tokens + tree.size)
    engine = model.engine(EngineOptions(), tree, max_rows=batch, max_length=context + config.max_new_tokens)
    timings = []
    for run in range(repeats + 1):
        prompts = [torch.randint(0, vocab, (context,), generator=generator).to(model.device) for _ in range(batch)]
        generations = [model.prepare(prompt, config) for prompt in prompts]
        for generation in generations:
            generation.eos_token_ids, generation.detokenizer = frozenset(), None
        engine.add(generations)
        started = time.perf_counter()
        for _ in range(steps):
            engine.step()
        seconds = time.perf_counter() - started
        engine.finish(generations)
        if run > 0:  # the first run warms up (and captures the CUDA graph)
            timings.append(seconds / steps)
    return statistics.median(timings)


def measure_cost_curve(
    model: MedusaModel,
    trees: dict[int, Tree],
    context: int = 128,
    steps: int = 16,
    repeats: int = 3,
    progress=None,
    batch: int = 1,
) -> CostCurve:
    """Seconds per step of ``batch`` rows for each of ``trees`` (nodes -> tree) on the model's device."""
    points = {}
    for nodes, tree in sorted(trees.items()):
        points[nodes] = measure_step_seconds(model, tree, context, steps, repeats, batch=batch)
        if progress is not None:
            progress(nodes, points[nodes])
    return CostCurve(points, device_kind(model.device), model.heads.config.head_type, model.heads.config.prefix_layer)
