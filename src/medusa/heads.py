"""Draft heads: K small residual MLPs on the base model's last hidden state (paper, section 2.1.1).

Head k (0-based) predicts the token k + 2 positions ahead of the hidden state it reads; the base
model's own ``lm_head`` predicts the next one. Blocks start at zero and the projection starts as the
base ``lm_head``, so an untrained head returns exactly the base model's logits.

Two head types share everything but their input. ``medusa`` heads (the paper's) read the hidden state
alone, so every head guesses without knowing what the heads before it guessed. ``sequential`` heads
(Hydra, Ankner et al. 2024) also read the input embeddings of the tokens on the candidate path above
them: head k sees the base model's next token and the guesses of heads 0..k-1, through a linear layer
over ``[hidden, embed(path)]`` that starts as the identity on the hidden state. So each child in a tree
is guessed for its own parent, at the price of one head call per tree depth.

Either type may add Hydra++'s prefix layer (``prefix_layer``): one causal self-attention block over the base
model's last hidden states, whose output the heads read instead of the last hidden state alone. It keeps its
own K/V of every committed position while decoding (``medusa.decoding``), and starts as the identity.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medusa.errors import MedusaError
from medusa.files import atomic_path, read_json, write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "medusa_heads.safetensors"
HEAD_TYPES = ("medusa", "sequential")
# The type of heads made or trained when none is named: sequential heads beat Medusa heads on the same data and
# replaced the shipped ones (docs/benchmarks/h100-sequential-heads-shipped). A config file that names no type
# predates them and holds Medusa heads, so MedusaHeadsConfig's own default stays "medusa".
DEFAULT_HEAD_TYPE = "sequential"


@dataclass
class MedusaHeadsConfig:
    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1
    # Share the base model's lm_head instead of a per-head copy: checkpoints shrink from
    # num_heads * vocab * hidden to num_heads * num_layers * hidden^2 parameters.
    share_lm_head: bool = False
    base_model: str | None = None
    # "medusa": each head reads the hidden state alone; "sequential": also the tokens on its candidate path.
    head_type: str = "medusa"
    # Hydra++: the heads read one causal self-attention layer's output over the base model's hidden states.
    prefix_layer: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_size", "vocab_size", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise MedusaError(f"heads config: {name} must be at least 1, got {getattr(self, name)}")
        if int(self.num_layers) < 0:
            raise MedusaError(f"heads config: num_layers must be 0 or more, got {self.num_layers}")
        if self.head_type not in HEAD_TYPES:
            raise MedusaError(
                f"heads config: head type {self.head_type!r} is not known; this version of medusa reads "
                f"{' and '.join(HEAD_TYPES)} heads"
            )

    @property
    def sequential(self) -> bool:
        """Whether head k reads the k + 1 tokens on its candidate path (the base token, then the guesses)."""
        return self.head_type == "sequential"

    def save(self, directory: str | Path) -> None:
        write_json(Path(directory) / CONFIG_NAME, {"model_type": "medusa_heads", **asdict(self)})

    @classmethod
    def load(cls, directory: str | Path) -> MedusaHeadsConfig:
        """Our own layout only; ``medusa.interop.load_heads_config`` reads the other projects' layouts too."""
        if not Path(directory).is_dir():
            raise MedusaError(f"heads directory {directory} does not exist")
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise MedusaError(f"no Medusa heads config at {path}")
        raw = read_json(path, "heads config")
        if not isinstance(raw, dict):
            raise MedusaError(f"heads config {path} is not a JSON object")
        if "medusa_num_heads" in raw or raw.get("model_type") == "medusa":
            raise MedusaError(
                f"heads config {path} is in the original Medusa project's layout or vLLM's; read it with "
                "medusa.interop.load_heads (MedusaModel.from_pretrained does)"
            )
        known = {f.name for f in fields(cls)}
        missing = {"hidden_size", "vocab_size"} - raw.keys()
        if missing:
            raise MedusaError(f"heads config {path} lacks {', '.join(sorted(missing))}")
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except MedusaError as error:
            raise MedusaError(f"{path}: {error}") from None


class ResidualBlock(nn.Module):
    """``x + SiLU(W x + b)``, zero-initialised so a fresh block is the identity."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


PREFIX_HEAD_DIM = 64  # the prefix layer's attention heads are this wide where the hidden size divides by it
ROPE_BASE = 10000.0


def rotate(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``states [rows, heads, n, dim]`` at ``positions [rows, n]`` (halves rotated)."""
    half = states.shape[-1] // 2
    frequencies = ROPE_BASE ** (-torch.arange(half, device=states.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None, :, None] * frequencies  # [rows, 1, n, half]
    cos, sin = angles.cos().to(states.dtype), angles.sin().to(states.dtype)
    first, second = states[..., :half], states[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class PrefixAttention(nn.Module):
    """Hydra++'s prefix layer: ``h + W_o attention(norm(h))``, causal self-attention over the base model's last
    hidden states with rotary positions. ``W_o`` starts at zero, so a fresh layer passes the hidden state
    through. Whole sequences go through ``forward`` (training, profiling); decoding calls ``project`` and
    ``attend`` with K/V it keeps for every committed position."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.num_heads = hidden_size // PREFIX_HEAD_DIM if hidden_size % PREFIX_HEAD_DIM == 0 else 1
        self.head_dim = hidden_size // self.num_heads
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.out.weight)

    def project(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries, keys and values ``[rows, heads, n, head_dim]`` of ``hidden [rows, n, hidden]`` at ``positions
        [rows, n]`` (rotated)."""
        rows, count, _ = hidden.shape
        parameter = self.qkv.weight
        states = self.qkv(self.norm(hidden.to(parameter.dtype)))
        query, key, value = states.view(rows, count, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return rotate(query, positions), rotate(key, positions), value

    def attend(
        self, hidden: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        """The layer's output ``[rows, n, hidden]`` for ``hidden [rows, n, hidden]``, its ``query [rows, heads, n,
        head_dim]`` and the ``keys``/``values [rows, heads, slots, head_dim]`` that each query may see where
        ``visible [rows, n, slots]``."""
        mask = visible[:, None]  # [rows, 1, n, slots]
        attended = nn.functional.scaled_dot_product_attention(query, keys.to(query.dtype), values.to(query.dtype), mask)
        merged = attended.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
        return hidden.to(merged.dtype) + self.out(merged)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden [batch, seq, hidden]`` of right-padded sequences (``attention_mask [batch, seq]``: 1 on real
        tokens), positions from 0: each position attends to itself and those before it."""
        batch, length, _ = hidden.shape
        positions = torch.arange(length, device=hidden.device).expand(batch, length)
        query, key, value = self.project(hidden, positions)
        visible = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()[None]
        if attention_mask is not None:
            visible = visible & attention_mask.bool()[:, None, :]
        visible = visible | torch.eye(length, dtype=torch.bool, device=hidden.device)  # padding sees itself
        return self.attend(hidden, query, key, value, visible.expand(batch, -1, -1))


def _path_input(hidden_size: int, tokens: int) -> nn.Linear:
    """``[hidden, embed(t_0), ..., embed(t_{tokens-1})] -> hidden``, starting as the identity on the hidden state
    (so a fresh sequential head, like a fresh Medusa head, returns the base model's logits)."""
    layer = nn.Linear(hidden_size * (1 + tokens), hidden_size)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:, :hidden_size].copy_(torch.eye(hidden_size))
        layer.bias.zero_()
    return layer


class MedusaHeads(nn.Module):
    """K heads over a hidden state. ``forward`` returns logits ``[num_heads, *hidden.shape[:-1], vocab]``. With a
    prefix layer, the hidden state they read is its output (``prefix_states``), which callers compute first.

    Sequential heads (``config.sequential``) also need the tokens on each head's candidate path and the base
    model's input embeddings (``attach_base_model``); ``forward`` then takes ``path [..., num_heads]``.
    """

    def __init__(self, config: MedusaHeadsConfig, base_lm_head: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        # Sequential heads: head k's first layer reads the hidden state and k + 1 token embeddings.
        self.path_inputs = (
            nn.ModuleList(_path_input(config.hidden_size, k + 1) for k in range(config.num_heads))
            if config.sequential
            else None
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResidualBlock(config.hidden_size) for _ in range(config.num_layers)])
            for _ in range(config.num_heads)
        )
        self.prefix = PrefixAttention(config.hidden_size) if config.prefix_layer else None
        if config.share_lm_head:
            self.projections = None
        else:
            self.projections = nn.ModuleList(
                nn.Linear(config.hidden_size, config.vocab_size, bias=False) for _ in range(config.num_heads)
            )
            if base_lm_head is not None:
                self.copy_projection_from(base_lm_head)
        # Held outside the module tree so they are neither saved nor trained with the heads.
        self._shared_lm_head = [base_lm_head]
        self._input_embeddings: list[nn.Module | None] = [None]

    def copy_projection_from(self, lm_head: nn.Module) -> None:
        """Start every projection as the base model's lm_head: an untrained head equals the base head."""
        if self.projections is None:
            return
        weight = lm_head.weight
        if tuple(weight.shape) != (self.config.vocab_size, self.config.hidden_size):
            raise MedusaError(
                f"base lm_head has shape {tuple(weight.shape)}, heads expect "
                f"({self.config.vocab_size}, {self.config.hidden_size})"
            )
        with torch.no_grad():
            for projection in self.projections:
                projection.weight.copy_(weight)

    def attach_lm_head(self, lm_head: nn.Module) -> None:
        self._shared_lm_head = [lm_head]

    def attach_base_model(self, model: nn.Module) -> None:
        """Share the base model's lm_head and, for sequential heads, its input embeddings."""
        self.attach_lm_head(model.get_output_embeddings())
        self._input_embeddings = [model.get_input_embeddings()]

    def prefix_states(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """What the heads read at each position of right-padded sequences ``hidden [batch, seq, hidden]``: the prefix
        layer's output where there is one, else the hidden states themselves. Decoding computes the same position
        by position, with the layer's K/V kept (``medusa.decoding``)."""
        if self.prefix is None:
            return hidden
        return self.prefix(hidden.to(self.device), attention_mask)

    def features(self, head_index: int, hidden: torch.Tensor, path: torch.Tensor | None = None) -> torch.Tensor:
        """Head ``head_index``'s last-layer features ``[..., hidden]`` before the vocabulary projection.

        ``hidden [..., hidden]``; ``path [..., head_index + 1]`` (sequential heads only): the base model's next
        token, then the guesses of the heads before this one, for the same candidate.
        """
        block = self.blocks[head_index]
        if self.path_inputs is not None:
            if path is None or path.shape[-1] != head_index + 1:
                raise MedusaError(
                    f"sequential head {head_index} reads {head_index + 1} path tokens, got "
                    f"{None if path is None else path.shape[-1]}"
                )
            embeddings = self._input_embeddings[0]
            if embeddings is None:
                raise MedusaError("sequential heads read the base model's input embeddings, but none were attached")
            layer = self.path_inputs[head_index]
            embedded = embeddings(path.to(embeddings.weight.device)).to(device=hidden.device, dtype=layer.weight.dtype)
            hidden = layer(torch.cat([hidden.to(layer.weight.dtype), embedded.flatten(-2)], dim=-1))
        parameter = next(block.parameters(), None)
        return block(hidden.to(parameter.dtype) if parameter is not None else hidden)

    def head_logits(self, head_index: int, hidden: torch.Tensor, path: torch.Tensor | None = None) -> torch.Tensor:
        """Head ``head_index``'s logits ``[..., vocab]`` (see ``features``)."""
        return self.project(head_index, self.features(head_index, hidden.to(self.device), path))

    def own_guesses(self, hidden: torch.Tensor, next_token: torch.Tensor) -> torch.Tensor:
        """Logits ``[num_heads, ..., vocab]`` with every head fed the top-1 guesses of the heads before it (the
        tree's first path); for Medusa heads the same as ``forward``. ``hidden [..., hidden]``, ``next_token [...]``."""
        if self.path_inputs is None:
            return self(hidden)
        path = next_token[..., None]
        logits = []
        for k in range(self.config.num_heads):
            logits.append(self.head_logits(k, hidden, path))
            path = torch.cat([path, logits[-1].argmax(dim=-1, keepdim=True).to(path.device)], dim=-1)
        return torch.stack(logits)

    def project(self, head_index: int, features: torch.Tensor) -> torch.Tensor:
        if self.projections is not None:
            return self.projections[head_index](features)
        lm_head = self._shared_lm_head[0]
        if lm_head is None:
            raise MedusaError("heads share the base lm_head, but none was attached")
        return lm_head(features)

    @property
    def device(self) -> torch.device:
        """Where the heads compute: with their projections, or with the base lm_head they share."""
        if self.projections is not None:
            return self.projections[0].weight.device
        lm_head = self._shared_lm_head[0]
        if lm_head is None:
            raise MedusaError("heads share the base lm_head, but none was attached")
        return lm_head.weight.device

    def forward(self, hidden: torch.Tensor, path: torch.Tensor | None = None) -> torch.Tensor:
        """``path [..., num_heads]`` (sequential heads): the true next tokens, head k reading the first k + 1."""
        # A base model split over devices hands its last hidden state over from wherever its output lands.
        hidden = hidden.to(self.device)
        if self.path_inputs is not None:
            if path is None:
                raise MedusaError("sequential heads need the tokens on their candidate path")
            features = torch.stack([self.features(k, hidden, path[..., : k + 1]) for k in range(len(self.blocks))])
        else:
            features = torch.stack([block(hidden) for block in self.blocks])  # [heads, ..., hidden]
        if self.projections is None:
            # One matmul against the shared lm_head reads its weight once for all heads.
            return self.project(0, features)
        return torch.stack([projection(features[k]) for k, projection in enumerate(self.projections)])

    def save_pretrained(self, directory: str | Path) -> None:
        """Weights, then the config that describes them, each written atomically (``medusa.files``)."""
        directory = Path(directory)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as temporary:
            save_file(state, str(temporary), metadata={"format": "pt"})
        self.config.save(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, base_lm_head: nn.Module | None = None) -> MedusaHeads:
        """Our own layout only; ``medusa.interop.load_heads`` reads the other projects' layouts too."""
        directory = Path(directory)
        config = MedusaHeadsConfig.load(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise MedusaError(f"no heads weights at {weights}")
        heads = cls(config, base_lm_head=None)
        state = load_file(str(weights))
        expected = heads.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise MedusaError(
                f"heads weights {weights} do not match their config: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise MedusaError(
                    f"heads weight {name} has shape {tuple(tensor.shape)}, config implies {tuple(expected[name].shape)}"
                )
        heads.load_state_dict(state)
        heads.attach_lm_head(base_lm_head)
        return heads
