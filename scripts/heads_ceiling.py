"""The most tokens per step any tree could get from a set of heads: a ceiling, from their tree profile.

A tree that held every head's top-k at every depth (k + k^2 + ... nodes: 11,110 for k = 10 and 4
heads) accepts at each position as deep as every head so far ranked the right token within its top k.
Replaying decoding's walk over the profile's positions with those depths gives the tokens per step
that no tree of these heads, of any size, can beat on the profiled text. Run on the CPU:

    python scripts/heads_ceiling.py src/medusa/assets/heads/smollm2-135m-instruct/tree_profile.json
"""

from __future__ import annotations

import argparse

import numpy as np

from medusa.treeopt.profile import HeadProfile
from medusa.treeopt.walk import walk_lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="a tree_profile.json written by `medusa tree profile`")
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, help="walk the first N tokens of each answer (0: all)"
    )
    parser.add_argument("--top", default="1,2,3,5,10", help="top-k per depth to try (at most the profile's top-k)")
    args = parser.parse_args()
    profile = HeadProfile.load(args.profile).for_new_tokens(args.max_new_tokens or None)
    ranks = profile.position_ranks
    print(f"{ranks.positions} positions in {len(ranks.segments)} answers; ranks kept up to top-{profile.topk}")
    print(" top-k per depth   nodes below the root   tokens/step (walk)")
    for k in (int(part) for part in args.top.split(",")):
        if k > profile.topk:
            raise SystemExit(f"the profile keeps ranks up to {profile.topk}, not {k}")
        hit = (ranks.ranks >= 0) & (ranks.ranks < k)  # -1: missed here or at a shallower head
        depths = np.cumprod(hit, axis=1).sum(axis=1)
        nodes = sum(k**depth for depth in range(1, ranks.ranks.shape[1] + 1))
        print(f"{k:>16} {nodes:>22,} {walk_lengths(depths, ranks.segments)[0]:>20.3f}")


if __name__ == "__main__":
    main()
