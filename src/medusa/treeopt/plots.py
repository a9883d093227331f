"""Plots for tree optimisation (matplotlib, Agg backend): accepted length, tokens/s, and the tree itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from medusa.files import atomic_path  # noqa: E402
from medusa.tree import Tree  # noqa: E402

if TYPE_CHECKING:
    from medusa.treeopt.profile import HeadProfile
    from medusa.treeopt.tune import TreeTuning


def plot_accept_length(
    path: str | Path,
    expected: Mapping[str, Mapping[int, float]],
    measured: Mapping[int, float] | None = None,
    title: str = "Accepted tokens per step against tree size",
) -> Path:
    """Expected curves (one per estimate) and measured points of tokens per step (root included) against N."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, curve in expected.items():
        sizes = sorted(curve)
        axes.plot(
            sizes, [curve[n] for n in sizes], marker="." if len(sizes) <= 40 else None, label=f"expected ({label})"
        )
    if measured:
        sizes = sorted(measured)
        axes.plot(sizes, [measured[n] for n in sizes], "o", color="black", label="measured (greedy)")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("tree nodes N (root included)")
    axes.set_ylabel("tokens per step")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_tokens_per_second(
    path: str | Path,
    rates: Mapping[int, float],
    chosen: int,
    device: str,
    measured: Mapping[int, float] | None = None,
    lookup_rates: Mapping[int, float] | None = None,
) -> Path:
    """Expected tokens/s against N with the chosen N marked (and measured tokens/s, when given).

    ``lookup_rates``: for each total N, the best tree of N nodes that includes a lookup chain.
    """
    figure, axes = plt.subplots(figsize=(7, 4.5))
    sizes = sorted(rates)
    axes.plot(sizes, [rates[n] for n in sizes], marker=".", label="expected, heads' tree")
    if lookup_rates:
        chained = sorted(lookup_rates)
        axes.plot(chained, [lookup_rates[n] for n in chained], marker=".", label="expected, heads' tree + lookup chain")
    if measured:
        measured_sizes = sorted(measured)
        axes.plot(measured_sizes, [measured[n] for n in measured_sizes], "o", color="black", label="measured")
    best = max(rate.get(chosen, 0.0) for rate in (rates, lookup_rates or {}))
    axes.axvline(chosen, color="tab:red", linestyle="--", alpha=0.7)
    axes.annotate(
        f"N = {chosen}\n{best:.1f} tokens/s",
        (chosen, best),
        textcoords="offset points",
        xytext=(8, -28),
        color="tab:red",
    )
    axes.set_xscale("log", base=2)
    axes.set_xlabel("tree nodes N (root and lookup chain included)")
    axes.set_ylabel("tokens per second")
    axes.set_title(f"Expected decoding speed on {device}")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return _save(figure, path)


def tree_layout(paths: Sequence[Sequence[int]]) -> dict[tuple[int, ...], tuple[float, int]]:
    """``(x, depth)`` per node: leaves side by side in depth-first order, each parent above its children's middle."""
    children: dict[tuple[int, ...], list[tuple[int, ...]]] = {(): []}
    for path in sorted(map(tuple, paths), key=lambda p: (len(p), p)):
        children.setdefault(path, [])
        children[path[:-1]].append(path)
    position: dict[tuple[int, ...], tuple[float, int]] = {}
    next_leaf = 0.0

    def place(node: tuple[int, ...]) -> float:
        nonlocal next_leaf
        kids = sorted(children[node])
        if not kids:
            x, next_leaf = next_leaf, next_leaf + 1
        else:
            xs = [place(kid) for kid in kids]
            x = (xs[0] + xs[-1]) / 2
        position[node] = (x, len(node))
        return x

    place(())
    return position


def plot_tree(
    path: str | Path, tree: Tree, chances: Mapping[tuple[int, ...], float] | None = None, title: str | None = None
) -> Path:
    """The tree drawn by depth, root on top: each node labelled by its top-k rank, coloured by its chance."""
    position = tree_layout(tree.paths)
    leaves = tree.retrieve_paths.shape[0]
    figure, axes = plt.subplots(figsize=(min(40, max(6, 0.28 * leaves)), 1.3 * (tree.max_depth + 1) + 1))
    for node, (x, depth) in position.items():
        if node:
            parent_x, parent_depth = position[node[:-1]]
            axes.plot([parent_x, x], [-parent_depth, -depth], color="grey", linewidth=0.6, zorder=1)
    nodes = list(position)
    colours = [1.0 if not node else (chances or {}).get(node, 0.0) for node in nodes]
    points = axes.scatter(
        [position[n][0] for n in nodes],
        [-position[n][1] for n in nodes],
        c=colours,
        cmap="viridis",
        vmin=0,
        vmax=1,
        s=110,
        zorder=2,
        edgecolors="black",
        linewidths=0.4,
    )
    if chances:
        figure.colorbar(points, ax=axes, fraction=0.02, pad=0.01, label="chance of acceptance")
    font = 7 if leaves < 80 else 5
    for node in nodes:
        x, depth = position[node]
        axes.annotate(
            "root" if not node else str(node[-1]),
            (x, -depth),
            ha="center",
            va="center",
            fontsize=font,
            color="white" if node and (chances or {}).get(node, 0.0) < 0.5 else "black",
            zorder=3,
        )
    axes.set_yticks([-d for d in range(tree.max_depth + 1)], ["root"] + [f"head {d}" for d in range(tree.max_depth)])
    axes.set_xticks([])
    axes.set_title(
        title or f"Tree of {tree.size} nodes (labels: top-k rank{'; colour: chance of acceptance' if chances else ''})"
    )
    for side in ("top", "right", "bottom"):
        axes.spines[side].set_visible(False)
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120)
    plt.close(figure)
    return path


def plot_tuning(plot_dir: str | Path, tuning: TreeTuning, profile: HeadProfile, kind: str) -> list[Path]:
    """Tokens/s and accepted length against N for one device's tuning, and the tree it chose (with its chain)."""
    from medusa.treeopt.build import node_chances

    plot_dir = Path(plot_dir)
    slug = "".join(c if c.isalnum() else "_" for c in kind).strip("_").lower()
    heads_sizes = sorted(n for n, chain in tuning.grid if chain == 0)
    lookup_rates = None
    if tuning.chain_choice is not None:  # what the chains would give, chosen or not
        lookup_rates = {total: rate for total, (_, rate) in tuning.chain_choice.lookup_tokens_per_second.items()}
    shown = tuning.chained_tree or tuning.tree
    return [
        plot_tokens_per_second(
            plot_dir / f"tokens_per_second_{slug}.png",
            tuning.heads_choice.tokens_per_second,
            tuning.best.total_nodes,
            kind,
            lookup_rates=lookup_rates,
        ),
        plot_accept_length(
            plot_dir / f"accept_length_{slug}.png", {tuning.estimate: {n: tuning.grid[n, 0] for n in heads_sizes}}
        ),
        plot_tree(plot_dir / f"tuned_tree_{slug}.png", shown, node_chances(profile, shown, tuning.estimate)),
    ]
