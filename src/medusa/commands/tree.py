"""``medusa tree profile|build|tune|evaluate``: the best sparse tree for the heads and for this device.

profile  measure each head's top-k accuracy on held-out conversations  -> HEADS/tree_profile.json
build    the greedy tree of N nodes from the profile                   -> HEADS/tree.json
tune     time steps against tree size here, keep the fastest tree      -> HEADS/tuned_trees.json
evaluate decode prompts with several trees: measured against expected accepted length, tokens/s

For the heads shipped in the package, HEADS is the user's copy under the cache (medusa.paths): the package
itself is never written to, and loading the shipped heads reads the user's files first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from medusa.commands.output import count_of
from medusa.commands.threads import add_threads_argument
from medusa.errors import MedusaError
from medusa.files import write_json, write_text
from medusa.paths import DEFAULT_MODEL_NAME, heads_file, is_shipped, shipped_heads_directory, user_heads_directory

if TYPE_CHECKING:  # for type hints only: parsing flags must not import torch
    from medusa.heads import MedusaHeadsConfig

# medusa.treeopt.build.ESTIMATES, spelled out so that parsing flags does not import torch
ESTIMATE_CHOICES = ("walk", "joint", "paper")
ESTIMATE_HELP = (
    "walk (default when the profile has per-position ranks, else joint): replay decoding's walk over the profiled "
    "answers, each step starting where the last one stopped; joint: how often whole paths were right, averaged over "
    "all positions (over-predicts: steps start more often on hard text); paper: product of head accuracies. "
    "Trees are built in the joint order for walk"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tree_command", required=True)

    profile = sub.add_parser(
        "profile",
        help="measure head accuracies on held-out conversations",
        description="Decode held-out conversations written by the base model (medusa distill) and measure how often "
        "each "
        "head's top-k guesses are right, and which paths of guesses come true together. Writes "
        "HEADS/tree_profile.json (for the shipped heads: your copy under the cache), which build, tune and "
        "evaluate read.",
    )
    _add_model_arguments(profile)
    profile.add_argument(
        "--data", nargs="+", required=True, help="JSON/JSONL conversations written by the base model (medusa distill)"
    )
    profile.add_argument("--limit", type=int, default=200, help="conversations to use (default 200)")
    profile.add_argument(
        "--offset", type=int, default=0, help="skip this many records first (say, those the heads were trained on)"
    )
    profile.add_argument("--topk", type=int, default=10, help="ranks to measure per head (default 10)")
    profile.add_argument(
        "--max-length", type=int, default=1024, help="cut conversations to this many tokens (default 1024)"
    )
    profile.add_argument("--output", help="profile file (default HEADS/tree_profile.json)")

    build = sub.add_parser(
        "build",
        help="the greedy tree of N nodes from the profile",
        description="Build the tree of N nodes with the most expected accepted tokens per step from the profile (the "
        "paper's greedy construction) and write it as HEADS/tree.json (for the shipped heads: your copy "
        "under the cache). A tree tuned for a device by `medusa tree tune` still wins on that device.",
    )
    _add_heads_arguments(build)
    build.add_argument("--nodes", type=int, required=True, help="tree nodes, root included")
    build.add_argument("--output", help="tree file (default HEADS/tree.json)")
    build.add_argument("--plot-dir", help="write the tree's drawing and accepted length against N here")

    tune = sub.add_parser(
        "tune",
        help="choose the tree size with the most expected tokens/s on this device",
        description="Time one decoding step against tree size on this device (or read a cost curve), divide the "
        "profile's expected tokens per step by it, and keep the fastest tree for this kind of device in "
        "HEADS/tuned_trees.json (for the shipped heads: your copy under the cache). Loading the heads on such "
        "a device then uses it.",
    )
    _add_model_arguments(tune)
    tune.add_argument("--profile", help="profile file (default HEADS/tree_profile.json)")
    tune.add_argument("--estimate", choices=ESTIMATE_CHOICES, help=ESTIMATE_HELP)
    _add_answer_length_argument(tune)
    tune.add_argument(
        "--cost-curve",
        help='use this cost curve ({"points": [{"nodes", "seconds"}]}, from medusa bench --cost-curve) '
        "instead of timing here",
    )
    tune.add_argument("--sizes", help="tree sizes to time (default 1,2,3,4,6,8,12,16,24,32,48,64,96,128,192,256)")
    tune.add_argument(
        "--max-nodes", type=int, default=256, help="largest tree to consider, lookup chain included (default 256)"
    )
    tune.add_argument(
        "--lookup",
        default="auto",
        help="auto (default): also try lookup chains of 2 to 24 nodes beside each heads' tree, when the profile "
        "measured the lookup branch, and keep one if it is faster; 0: no lookup branch; N: tune the heads' "
        "tree for a chain of N nodes",
    )
    tune.add_argument(
        "--batch-sizes",
        help="also choose a tree for each of these batch buckets (1,2,4,...,64), from the cost curve at that size "
        "(timed here, or read from a --cost-curve measured with --batch-sizes); batches of a size without one cut "
        "the model's tree to a node budget",
    )
    tune.add_argument("--context", type=int, default=128, help="prompt tokens before the timed steps (default 128)")
    tune.add_argument("--steps", type=int, default=16, help="timed steps per run (default 16)")
    tune.add_argument("--repeats", type=int, default=3, help="timed runs per size; the median counts (default 3)")
    tune.add_argument(
        "--device-kind", help="save under this device kind (default: the cost curve's device, else this device)"
    )
    tune.add_argument("--save-cost-curve", help="also write the measured cost curve here")
    tune.add_argument("--dry-run", action="store_true", help="report the choice without writing tuned_trees.json")
    tune.add_argument("--plot-dir", help="write tokens/s and accepted length against N, and the chosen tree, here")

    evaluate = sub.add_parser(
        "evaluate",
        help="decode prompts with several trees: measured vs expected accepted length",
        description="Decode prompts with greedy trees of several sizes (and the default or tuned trees) and print, per "
        "tree, the measured tokens per step, the profile's expected value with its error relative to the "
        "measured one, and tokens/s.",
    )
    _add_model_arguments(evaluate)
    evaluate.add_argument("--profile", help="profile file (default HEADS/tree_profile.json)")
    evaluate.add_argument(
        "--estimate",
        choices=ESTIMATE_CHOICES,
        help="estimate used to build the trees and to report errors: " + ESTIMATE_HELP,
    )
    evaluate.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="prompts: Spec-Bench question.jsonl, conversations, prompt/question/instruction records",
    )
    evaluate.add_argument(
        "--limit", type=int, default=10, help="prompts per category (Spec-Bench), else in all (default 10)"
    )
    evaluate.add_argument(
        "--sizes", default="8,16,32,64", help="greedy trees from the profile to decode with (default 8,16,32,64)"
    )
    evaluate.add_argument(
        "--lookup",
        default="0",
        help="lookup chains to add to each greedy tree, comma-separated node counts (default 0: none); "
        "0 among them keeps the trees without a chain",
    )
    evaluate.add_argument(
        "--default-trees", action="store_true", help="also decode with the default trees of the same sizes"
    )
    evaluate.add_argument(
        "--tuned",
        action="store_true",
        help="also decode with the tree tuned for this device (and its lookup tree, if it has one)",
    )
    evaluate.add_argument(
        "--max-new-tokens",
        type=int,
        default=128,
        help="new tokens per prompt (default 128); the walk estimate reads as many positions of each profiled answer",
    )
    evaluate.add_argument("--output", help="write the results as JSON here")
    evaluate.add_argument("--plot-dir", help="write measured and expected accepted length against N here")


def _add_heads_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heads", help="Medusa heads directory (default: the heads shipped for the default model)")
    parser.add_argument("--profile", help="profile file (default HEADS/tree_profile.json)")
    parser.add_argument("--estimate", choices=ESTIMATE_CHOICES, help=ESTIMATE_HELP)
    _add_answer_length_argument(parser)


def _add_answer_length_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="estimate for generations of this many new tokens: the walk reads only the first N positions "
        "of each profiled answer (default 256; 0: whole answers)",
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="base model: a local model directory or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--heads", help="Medusa heads directory (default: the heads shipped for the default model)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU)")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    return {"profile": run_profile, "build": run_build, "tune": run_tune, "evaluate": run_evaluate}[args.tree_command](
        args
    )


# ----- shared -----------------------------------------------------------------------------------


def _heads_directory(args: argparse.Namespace) -> Path:
    if args.heads:
        directory = Path(args.heads)
        if not directory.is_dir():
            raise MedusaError(f"heads directory {directory} does not exist")
        return directory
    shipped = shipped_heads_directory(DEFAULT_MODEL_NAME) if getattr(args, "model", None) is None else None
    if shipped is None:
        raise MedusaError("give --heads: the heads directory to optimise the tree for")
    return shipped


def _load_profile(args: argparse.Namespace, directory: Path, config: MedusaHeadsConfig):
    """The profile for these heads (``config``: theirs), its walk data cut to the generation length estimated for
    (--max-new-tokens)."""
    from medusa.treeopt.profile import PROFILE_FILE, HeadProfile, heads_fingerprint

    path = Path(args.profile) if args.profile else heads_file(directory, PROFILE_FILE)
    profile = HeadProfile.load(path)
    profile.check_heads(config.num_heads, heads_fingerprint(directory), f"profile {path}", config.head_type)
    tokens = getattr(args, "max_new_tokens", 0)
    if tokens < 0:
        raise MedusaError(f"--max-new-tokens must be 0 (whole answers) or more, got {tokens}")
    return profile.for_new_tokens(tokens or None)


def _estimate(args: argparse.Namespace, profile) -> str:
    """The estimate asked for, or the default: walk when the profile allows it, else joint with a note."""
    from medusa.treeopt.build import default_estimate

    if args.estimate is not None:
        return args.estimate  # walk on a profile without its data is refused, naming the fix
    estimate = default_estimate(profile)
    if estimate != "walk":
        print(
            "note: this profile has no per-position ranks (it predates the walk estimate), so the joint estimate is "
            "used; it over-predicts measured tokens per step (by 13-18% in docs/benchmarks/cpu-tree-evaluate-pool). "
            "Run `medusa tree profile` again for the walk estimate",
            file=sys.stderr,
        )
    return estimate


def _expected_all(profile, tree) -> dict[str, float]:
    """The tree's expected tokens per step under every estimate the profile allows (only walk counts a lookup chain)."""
    from medusa.treeopt.build import available_estimates, expected_length, has_lookup

    if tree.lookup:
        return {"walk": expected_length(profile, tree, "walk")} if has_lookup(profile) else {}
    return {name: expected_length(profile, tree, name) for name in available_estimates(profile)}


def _heads_config(directory: Path):
    from medusa.interop import load_heads_config

    return load_heads_config(directory)


def _load_model(args: argparse.Namespace, directory: Path):
    from medusa.model import MedusaModel

    return MedusaModel.from_pretrained(args.model, heads=directory, dtype=args.dtype, device=args.device)


def _parse_sizes(text: str, max_nodes: int | None = None) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise MedusaError(f"sizes must be a comma-separated list of node counts, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise MedusaError(f"sizes must be positive node counts, got {text!r}")
    return [n for n in sizes if max_nodes is None or n <= max_nodes]


def _parse_chains(text: str) -> list[int]:
    from medusa.lookup import MAX_LOOKUP_NODES

    try:
        chains = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        chains = []
    if not chains or chains[0] < 0 or chains[-1] > MAX_LOOKUP_NODES:
        raise MedusaError(
            f"--lookup must list chain lengths from 0 to {MAX_LOOKUP_NODES}, comma-separated, got {text!r}"
        )
    return chains


def _output_for(directory: Path, name: str) -> Path:
    """Where a file for these heads goes by default: beside them, or the user's copy for the read-only shipped heads."""
    target = user_heads_directory(directory)
    if target != directory:
        print(
            f"note: the shipped heads in {directory} are read-only; writing {name} to {target} instead, which "
            "loading these heads reads first (give --heads DIR to work on a copy of your own)",
            file=sys.stderr,
        )
        target.mkdir(parents=True, exist_ok=True)
    return target / name


def _report_skipped(skipped: list[str]) -> None:
    for line in skipped[:5]:
        print(f"skipped {line}", file=sys.stderr)
    if len(skipped) > 5:
        print(f"... and {len(skipped) - 5} more skipped", file=sys.stderr)


def _progress(total: int, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, disable=not sys.stderr.isatty())


# ----- profile ----------------------------------------------------------------------------------


def run_profile(args: argparse.Namespace) -> int:
    from medusa.treeopt.build import available_estimates, expected_lengths, has_lookup, has_walk
    from medusa.treeopt.data import read_profile_examples
    from medusa.treeopt.profile import PROFILE_FILE, heads_fingerprint, profile_heads

    if args.limit < 1 or args.max_length < 2 or args.offset < 0:
        raise MedusaError("--limit must be at least 1, --max-length at least 2 and --offset at least 0")
    directory = _heads_directory(args)
    model = _load_model(args, directory)
    if model.tokenizer is None:
        raise MedusaError("the base model has no tokenizer to read conversations with")
    examples, skipped = read_profile_examples(args.data, model.tokenizer, args.limit, args.max_length, args.offset)
    _report_skipped(skipped)
    if not examples:
        raise MedusaError(f"no usable conversation in {', '.join(args.data)}")
    with _progress(len(examples), "conversation") as bar:
        profile = profile_heads(
            model.base_model, model.heads, examples, args.topk, heads_fingerprint(directory), progress=bar.update
        )
    output = Path(args.output) if args.output else _output_for(directory, PROFILE_FILE)
    profile.save(output)
    print(
        f"profiled {profile.num_heads} heads on {profile.samples} positions of {len(examples)} conversations; "
        f"saved {output}"
    )
    for k, row in enumerate(profile.accuracy):
        print(
            f"  head {k}: top-1 {row[0]:.3f}  top-{min(5, profile.topk)} {sum(row[:5]):.3f}  "
            f"top-{profile.topk} {sum(row):.3f}"
        )
    if profile.samples:
        sizes = (8, 16, 32, 64)
        curves = {name: expected_lengths(profile, sizes, name) for name in available_estimates(profile)}
        print(
            f"  walk data: {profile.position_ranks.positions} positions in "
            f"{len(profile.position_ranks.segments)} answers"
            if has_walk(profile)
            else "  walk data: none"
        )
        print(
            "  expected tokens per step of the greedy tree: "
            + ", ".join(
                f"{n} nodes " + " ".join(f"{curve[n]:.2f} ({name})" for name, curve in curves.items()) for n in sizes
            )
        )
        if has_lookup(profile):
            chained = expected_lengths(profile, sizes, "walk", lookup=10)
            print(
                "  with a 10-node lookup chain besides (walk): "
                + ", ".join(f"{n} nodes {chained[n]:.2f}" for n in sizes)
            )
    return 0


# ----- build ------------------------------------------------------------------------------------


def run_build(args: argparse.Namespace) -> int:
    from medusa.interop import load_heads_config
    from medusa.treeopt.build import build_tree, expected_lengths
    from medusa.tuned_trees import read_tuned_trees

    if args.nodes < 1:
        raise MedusaError(f"--nodes must be at least 1, got {args.nodes}")
    directory = _heads_directory(args)
    config = load_heads_config(directory)
    profile = _load_profile(args, directory, config)
    estimate = _estimate(args, profile)
    tree = build_tree(profile, args.nodes, estimate)
    output = Path(args.output) if args.output else _output_for(directory, "tree.json")
    write_text(output, tree.to_json() + "\n")
    expected = _expected_all(profile, tree)
    order = "joint order" if estimate == "walk" else f"{estimate} estimate"
    print(f"tree of {count_of(tree.size, 'node')}, {tree.max_depth} deep, top-{tree.topk} ({order}); saved {output}")
    labels = {"paper": "paper's product of accuracies"}
    print(
        "expected accepted tokens per step: "
        + ", ".join(f"{value:.3f} ({labels.get(name, name)})" for name, value in expected.items())
    )
    if tree.size < args.nodes:
        print(
            f"note: only {count_of(tree.size, 'node')} exist for {profile.num_heads} heads of top-{profile.topk}",
            file=sys.stderr,
        )
    tuned = read_tuned_trees(directory)
    if tuned and output == user_heads_directory(directory) / "tree.json":
        print(f"note: on {', '.join(map(repr, tuned))} the tuned tree takes precedence over tree.json", file=sys.stderr)
    if args.plot_dir:
        _plot_build(Path(args.plot_dir), profile, tree, estimate, expected_lengths)
    return 0


def _plot_build(plot_dir: Path, profile, tree, estimate: str, expected_lengths) -> None:
    from medusa.treeopt.build import available_estimates, node_chances
    from medusa.treeopt.plots import plot_accept_length, plot_tree

    sizes = list(range(1, 257))
    curves = {name: expected_lengths(profile, sizes, name) for name in available_estimates(profile)}
    written = [
        plot_accept_length(plot_dir / "accept_length.png", curves),
        plot_tree(plot_dir / f"tree_{tree.size}.png", tree, node_chances(profile, tree, estimate)),
    ]
    print("plots: " + ", ".join(map(str, written)))


# ----- tune -------------------------------------------------------------------------------------


def run_tune(args: argparse.Namespace) -> int:
    from medusa.interop import load_heads_config
    from medusa.treeopt.profile import heads_fingerprint
    from medusa.treeopt.tune import DEFAULT_SIZES, CostCurve, greedy_trees, measure_cost_curve, tune_batches, tune_tree
    from medusa.tuned_trees import device_kind, write_tuned_tree

    if args.max_nodes < 1:
        raise MedusaError(f"--max-nodes must be at least 1, got {args.max_nodes}")
    directory = _heads_directory(args)
    config = load_heads_config(directory)
    profile = _load_profile(args, directory, config)
    estimate = _estimate(args, profile)
    chains = _lookup_choices(args.lookup, profile, estimate)
    batch_sizes = _batch_sizes(args.batch_sizes)
    batch_costs: dict[int, CostCurve] = {}
    if args.cost_curve:
        cost = CostCurve.load(args.cost_curve, head_type=config.head_type, prefix_layer=config.prefix_layer)
        kind = (config.head_type, config.prefix_layer)
        batch_costs = {batch: CostCurve.load(args.cost_curve, batch, *kind) for batch in batch_sizes}
        if (args.device_kind or cost.device) is None:
            raise MedusaError(
                f'cost curve {args.cost_curve} names no device: give --device-kind ("cpu" or the GPU\'s name)'
            )
    else:
        if min(args.context, args.steps, args.repeats) < 1:
            raise MedusaError("--context, --steps and --repeats must be at least 1")
        sizes = (
            _parse_sizes(args.sizes, args.max_nodes)
            if args.sizes
            else [n for n in DEFAULT_SIZES if n <= args.max_nodes]
        )
        model = _load_model(args, directory)
        trees = greedy_trees(profile, sizes, estimate)
        print(f"timing {len(trees)} tree sizes on {device_kind(model.device)}", file=sys.stderr)
        cost = measure_cost_curve(
            model,
            trees,
            args.context,
            args.steps,
            args.repeats,
            progress=lambda n, s: print(f"  {n:4d} nodes: {s * 1e3:8.2f} ms/step", file=sys.stderr),
        )
        for batch in batch_sizes:
            batch_costs[batch] = (
                cost
                if batch == 1
                else measure_cost_curve(
                    model,
                    trees,
                    args.context,
                    args.steps,
                    args.repeats,
                    batch=batch,
                    progress=lambda n, s, b=batch: print(
                        f"  batch {b}, {n:4d} nodes: {s * 1e3:8.2f} ms/step", file=sys.stderr
                    ),
                )
            )
        if args.save_cost_curve:
            cost.save(args.save_cost_curve)
    kind = args.device_kind or cost.device
    tuning = tune_tree(profile, cost, estimate, chains, args.max_nodes, keep_chain=args.lookup != "auto")
    heads, best, tree, chain_tree = tuning.heads_choice, tuning.best, tuning.tree, tuning.chained_tree
    _print_tune_table(heads, tuning.chain_choice, best.total_nodes, tuning.grid, cost)
    length = (
        f", over the first {args.max_new_tokens} tokens of each answer"
        if args.max_new_tokens and estimate == "walk"
        else ""
    )
    print(f"({estimate} estimate of tokens per step{length})")
    print(
        f"best heads' tree for {kind!r}: {count_of(tree.size, 'node')}, {tree.max_depth} deep, top-{tree.topk}: "
        f"{heads.expected_accept_length:.2f} tokens/step expected, "
        f"{heads.expected_tokens_per_second:.1f} tokens/s expected"
    )
    if chain_tree is not None:
        in_use = "; decoding uses it by default here" if best is not heads and not args.dry_run else ""
        print(
            f"best with a lookup chain: {chain_tree.size} nodes ({best.nodes} of the heads' tree and a "
            f"{best.lookup}-node chain): {best.expected_accept_length:.2f} tokens/step expected, "
            f"{best.expected_tokens_per_second:.1f} tokens/s expected{in_use}"
        )
    entry = tuning.to_tuned_tree(profile, config.num_heads, heads_fingerprint(directory), args.max_new_tokens)
    if batch_costs:
        entry.batches = tune_batches(profile, batch_costs, estimate, chains, args.max_nodes)
        print(
            "per batch size: "
            + ", ".join(
                f"{batch}: {tree.nodes} nodes" + (f" ({tree.lookup} lookup)" if tree.lookup else "")
                for batch, tree in entry.batches.items()
            )
        )
    if not args.dry_run:
        if is_shipped(directory):
            _output_for(directory, "tuned_trees.json")  # says where, once
        print(f"saved {write_tuned_tree(directory, kind, entry)}")
    if args.plot_dir:
        from medusa.treeopt.plots import plot_tuning

        print("plots: " + ", ".join(map(str, plot_tuning(args.plot_dir, tuning, profile, kind))))
    return 0


def _batch_sizes(text: str | None) -> list[int]:
    from medusa.engine import BATCH_BUCKETS

    if not text:
        return []
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise MedusaError(f"--batch-sizes takes batch buckets separated by commas, got {text!r}") from None
    wrong = [size for size in sizes if size not in BATCH_BUCKETS]
    if wrong:
        raise MedusaError(f"--batch-sizes must be batch buckets ({', '.join(map(str, BATCH_BUCKETS))}), got {wrong}")
    return sizes


def _lookup_choices(text: str, profile, estimate: str) -> tuple[int, ...]:
    """The lookup chains ``--lookup`` asks the tuner to try, 0 (none) always among them."""
    from medusa.lookup import MAX_LOOKUP_NODES
    from medusa.treeopt.build import has_lookup
    from medusa.treeopt.tune import LOOKUP_CHOICES

    if text == "auto":
        if estimate == "walk" and has_lookup(profile):
            return LOOKUP_CHOICES
        print(
            "note: this profile did not measure the lookup branch (or the estimate is not walk), so no lookup chain is "
            "tried; run `medusa tree profile` again to include it",
            file=sys.stderr,
        )
        return (0,)
    try:
        chain = int(text)
    except ValueError:
        raise MedusaError(
            f"--lookup must be auto or a number of nodes from 0 to {MAX_LOOKUP_NODES}, got {text!r}"
        ) from None
    if not 0 <= chain <= MAX_LOOKUP_NODES:
        raise MedusaError(f"--lookup must be auto or a number of nodes from 0 to {MAX_LOOKUP_NODES}, got {chain}")
    return (0, chain) if chain else (0,)


def _print_tune_table(plain, with_chain, chosen: int, grid: dict, cost) -> None:
    """Per total size: the heads' tree alone, and (when chains were tried) the best tree with a lookup chain."""
    chained = with_chain.lookup_tokens_per_second if with_chain is not None else {}
    header = f"{'nodes':>6} {'ms/step':>9} {'tokens/step':>12} {'tokens/s':>9}"
    print(header + (f" | {'chain':>6} {'tokens/step':>12} {'tokens/s':>9}" if chained else ""))
    for total in sorted(set(plain.tokens_per_second) | set(chained)):
        line = f"{total:6d} {cost.points[total] * 1e3:9.2f} "
        if total in plain.tokens_per_second:
            line += f"{grid[total, 0]:12.3f} {plain.tokens_per_second[total]:9.1f}"
        else:
            line += " " * 22
        if total in chained:
            chain, rate = chained[total]
            line += f" | {chain:6d} {grid[total - chain, chain]:12.3f} {rate:9.1f}"
        if total == chosen:
            line += "  <- chosen"
        print(line)


# ----- evaluate ---------------------------------------------------------------------------------


def run_evaluate(args: argparse.Namespace) -> int:
    from medusa.interop import load_heads_config
    from medusa.tree import DEFAULT_TREE_SIZES, default_tree
    from medusa.treeopt.build import build_tree
    from medusa.treeopt.data import read_evaluation_prompts
    from medusa.tuned_trees import device_kind, tuned_tree

    if args.limit < 1 or args.max_new_tokens < 1:
        raise MedusaError("--limit and --max-new-tokens must be at least 1")
    directory = _heads_directory(args)
    config = load_heads_config(directory)
    profile = _load_profile(args, directory, config)
    estimate = _estimate(args, profile)
    prompts, skipped = read_evaluation_prompts(args.data, args.limit)
    _report_skipped(skipped)
    if not prompts:
        raise MedusaError(f"no prompt found in {', '.join(args.data)}")
    chains = _parse_chains(args.lookup)
    model = _load_model(args, directory)
    trees = {}
    for n in _parse_sizes(args.sizes):
        greedy = build_tree(profile, n, estimate)
        trees |= {f"greedy-{n}" + (f"+lookup-{chain}" if chain else ""): greedy.with_lookup(chain) for chain in chains}
    if args.default_trees:
        trees |= {
            f"default-{n}": default_tree(n, config.num_heads)
            for n in _parse_sizes(args.sizes)
            if n in DEFAULT_TREE_SIZES
        }
    if args.tuned:
        tuned = tuned_tree(directory, model.device, config.num_heads)
        if tuned is None:
            raise MedusaError(
                f"no tree tuned for {device_kind(model.device)!r} beside {directory}: run `medusa tree tune`"
            )
        trees["tuned"] = tuned
        chained = tuned_tree(directory, model.device, config.num_heads, chained=True)
        if chained.lookup:
            trees["tuned+lookup"] = chained
    results = []
    for label, tree in trees.items():
        measured = _decode_prompts(model, prompts, tree, args.max_new_tokens, label)
        expected = _expected_all(profile, tree)
        row = {
            "tree": label,
            "nodes": tree.size,
            **measured,
            **{f"expected_{name}": round(value, 4) for name, value in expected.items()},
        }
        results.append(row)
        errors = {
            name: value / row["mean_accepted"] - 1 if row["mean_accepted"] else float("nan")
            for name, value in expected.items()
        }
        print(
            f"{label:>12} {tree.size:4d} {'node: ' if tree.size == 1 else 'nodes:'} "
            f"measured {row['mean_accepted']:.3f} "
            "tokens/step, expected "
            + ", ".join(f"{value:.3f} {name} ({errors[name]:+.1%} vs measured)" for name, value in expected.items())
            + f"; {row['tokens_per_second']:.1f} tokens/s",
            flush=True,
        )
    summary = {
        "device": device_kind(model.device),
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "data": list(args.data),
        "heads": str(directory),
        "estimate": estimate,
        "results": results,
    }
    if args.output:
        write_json(args.output, summary, indent=1)
        print(f"saved {args.output}")
    if args.plot_dir:
        _plot_evaluate(Path(args.plot_dir), profile, results, estimate)
    return 0


def _decode_prompts(model, prompts, tree, max_new_tokens: int, label: str) -> dict:
    from medusa.decoding import DecodingStats
    from medusa.model import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens)
    if model.device.type == "cuda":  # untimed: first kernels and the graph capture of this tree
        for _ in model.stream(prompts[0], GenerationConfig(max_new_tokens=min(16, max_new_tokens)), tree=tree):
            pass
    accepted = steps = tokens = 0
    seconds = 0.0
    with _progress(len(prompts), "prompt") as bar:
        bar.set_description(label)
        for prompt in prompts:
            stats = DecodingStats()
            for _ in model.stream(prompt, config, stats=stats, tree=tree):
                pass
            accepted += sum(stats.accepted_per_step)
            steps += stats.steps
            tokens += stats.new_tokens
            seconds += stats.decode_seconds
            bar.update(1)
    return {
        "mean_accepted": round(accepted / steps, 4) if steps else 0.0,
        "steps": steps,
        "new_tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 2) if seconds else 0.0,
    }


def _plot_evaluate(plot_dir: Path, profile, results: list[dict], estimate: str) -> None:
    from medusa.treeopt.build import ESTIMATES, expected_lengths
    from medusa.treeopt.plots import plot_accept_length

    greedy = [r for r in results if r["tree"].startswith("greedy-") and "+lookup" not in r["tree"]]
    if not greedy:
        return
    sizes = list(range(1, 1 + max(256, *(r["nodes"] for r in results))))
    curves = {f"{estimate}, greedy trees": expected_lengths(profile, sizes, estimate)}
    for name in ESTIMATES:
        if name != estimate and all(f"expected_{name}" in r for r in greedy):
            curves[f"{name}, same trees"] = {r["nodes"]: r[f"expected_{name}"] for r in greedy}
    measured = {r["nodes"]: r["mean_accepted"] for r in greedy}
    path = plot_accept_length(plot_dir / "accept_length_measured.png", curves, measured)
    print(f"plot: {path}")
