"""When the tree pays: the engine times its own steps and, per batch bucket and step kind, runs whichever of a tree
step and a plain one-token step has been committing more tokens per row and second.

`medusa tree tune` prices a bucket's tree with a cost curve timed on greedy steps and acceptance profiled on greedy
text. A load can differ from both: with half the rows sampling at 0.7 (and the sampling noise not yet fused), the
shipped heads ran at 0.88x plain decoding at batch 32 on the H100, and the switch brought that to 0.92x
(docs/benchmarks/h100-sampled-steps/). With the noise fused the heads ran 1.15x there and the switch 1.13x
(docs/benchmarks/h100-fused-noise/): it is for trees that do not pay, which these no longer are.

The switch measures what the tuner assumes (seconds per step and tokens per row-step, each smoothed over the last
steps) for both modes of each (bucket, kind), runs the faster, and keeps probing the other one every
``probe_every`` steps, since the text and the rows' settings change. It is opt-in
(``EngineOptions.adaptive``, ``medusa serve --adaptive``): its second set of graphs costs captures.

Switching never changes what is generated: greedy and seeded rejection sampling commit the same tokens whether a
step verifies a tree or the root alone (each position's sample is fixed by the row's seed and the position).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SwitchSettings:
    """How the switch learns: ``warmup`` measured steps of each mode first, then a probe of the other mode every
    ``probe_every`` steps; ``smoothing`` is the weight of each new measurement in the running means."""

    warmup: int = 4
    probe_every: int = 32
    smoothing: float = 0.125


@dataclass
class Rate:
    """Running means of one mode's measured steps at one (bucket, kind)."""

    seconds: float = 0.0  # per step, from its launch (or the previous step's end) to its tokens read
    tokens: float = 0.0  # committed per running row
    samples: int = 0

    def add(self, seconds: float, tokens: float, smoothing: float) -> None:
        weight = 1.0 if self.samples == 0 else smoothing
        self.seconds += weight * (seconds - self.seconds)
        self.tokens += weight * (tokens - self.tokens)
        self.samples += 1

    @property
    def per_row_second(self) -> float:
        """Tokens a row gains per second in this mode: what the switch compares."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class KeyState:
    tree: Rate = field(default_factory=Rate)
    plain: Rate = field(default_factory=Rate)
    decisions: int = 0
    plain_steps: int = 0


class SpeculationSwitch:
    """Chooses, before each step, whether it verifies the bucket's tree or only the next token (``plain``), from
    the steps measured so far at the same key (the bucket and step kind)."""

    def __init__(self, settings: SwitchSettings = SwitchSettings()) -> None:
        if settings.warmup < 1 or settings.probe_every < 2 or not 0 < settings.smoothing <= 1:
            raise ValueError(f"switch settings out of range: {settings}")
        self.settings = settings
        self.states: dict[Hashable, KeyState] = {}

    def plain(self, key: Hashable) -> bool:
        """Whether the next step at ``key`` runs plain: the tree until it is measured, then plain until that is,
        then the faster mode, with the other one every ``probe_every`` steps."""
        state = self.states.setdefault(key, KeyState())
        state.decisions += 1
        warmup = self.settings.warmup
        if state.tree.samples < warmup:
            choice = False
        elif state.plain.samples < warmup:
            choice = True
        else:
            choice = state.plain.per_row_second > state.tree.per_row_second
            if state.decisions % self.settings.probe_every == 0:
                choice = not choice
        state.plain_steps += choice
        return choice

    def record(self, key: Hashable, plain: bool, seconds: float, tokens_per_row: float) -> None:
        """A measured step: its mode, its seconds and the tokens each of its running rows committed."""
        state = self.states.setdefault(key, KeyState())
        (state.plain if plain else state.tree).add(seconds, tokens_per_row, self.settings.smoothing)

    def report(self) -> dict[Hashable, dict[str, float]]:
        """Per key: both modes' measured tokens per row and second, and the share of steps that ran plain."""
        return {
            key: {
                "tree_tokens_per_row_second": state.tree.per_row_second,
                "plain_tokens_per_row_second": state.plain.per_row_second,
                "tree_tokens_per_row_step": state.tree.tokens,
                "plain_share": state.plain_steps / max(state.decisions, 1),
            }
            for key, state in self.states.items()
        }
