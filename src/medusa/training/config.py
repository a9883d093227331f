"""Settings of ``medusa distill`` and ``medusa train`` as dataclasses; the CLI maps flags onto them and nothing else."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields

from medusa.errors import MedusaError


@dataclass
class DistillConfig:
    data: list[str]
    output: str
    model: str | None = None  # None: the default model
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy, the tokens Medusa's greedy verification accepts
    top_p: float = 1.0
    batch_size: int = 128
    limit: int | None = None  # the first N prompts (in file order) form the pool
    max_prompt_tokens: int = 1024  # longer prompts are skipped
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "max_new_tokens", "batch_size", "max_prompt_tokens")
        if self.limit is not None and self.limit < 1:
            raise MedusaError(f"limit must be at least 1, got {self.limit}")
        if self.temperature < 0:
            raise MedusaError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MedusaError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not self.data:
            raise MedusaError("no data files given")


@dataclass
class LoraSettings:
    """Medusa-2's adapter on the backbone (peft LoRA)."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0  # 0 keeps a resumed run bit-identical to an uninterrupted one
    target_modules: str | list[str] = "all-linear"  # peft excludes the lm_head from "all-linear"


@dataclass
class TrainConfig:
    data: list[str]
    output_dir: str
    model: str | None = None
    stage: int = 1  # 1: heads on a frozen base; 2: heads and a LoRA adapter on the base
    num_heads: int = 4
    num_layers: int = 1
    # A shared lm_head keeps the heads to num_heads * num_layers * hidden^2 parameters (2.7 M floats for
    # SmolLM2-135M); a projection per head adds vocab * hidden each (28 M floats for SmolLM2-135M).
    share_lm_head: bool = True
    # "medusa": each head reads the hidden state alone; "sequential": also the true tokens on its path (Hydra).
    # medusa.heads.DEFAULT_HEAD_TYPE (not imported: `medusa train --help` must not import torch)
    head_type: str = "sequential"
    # Hydra++: the heads read one causal self-attention layer over the hidden states, trained with them
    prefix_layer: bool = False
    loss: str = "kl"  # "kl": towards the base model's own distribution; "ce": the data's tokens
    head_weight_decay: float = 0.8  # head k's loss weighs decay**k (paper, eq. 1)
    learning_rate: float = 1e-3  # heads
    backbone_learning_rate: float = 5e-5  # stage 2, the LoRA adapter
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None: warmup_ratio of the optimizer steps
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 8  # sequences per micro-batch per process
    max_tokens: int | None = None  # also cap a micro-batch's padded tokens (batch x longest)
    gradient_accumulation: int = 1
    max_length: int = 1024
    eval_fraction: float = 0.02
    eval_max_examples: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    loss_chunk_size: int = 2048  # positions whose vocab-sized logits exist at once
    # stage 2
    heads_lambda: float = 0.2  # loss = backbone KL + heads_lambda * sum_k decay**k * head_k loss
    heads_warmup_steps: int = 0  # stage 2: train the heads alone for this many steps first
    lora: LoraSettings = field(default_factory=LoraSettings)
    merge: bool = False  # stage 2: also save the base with the adapter merged in
    dtype: str = "auto"  # the frozen base's weights: bf16 on GPU, fp32 on CPU
    mixed_precision: str = "auto"  # "bf16" autocast on GPU, "no" on CPU
    device: str = "auto"  # only for single-process runs; accelerate picks the device otherwise

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        _positive(
            self,
            "num_heads",
            "batch_size",
            "gradient_accumulation",
            "max_length",
            "checkpoint_every",
            "log_every",
            "loss_chunk_size",
            "keep_checkpoints",
        )
        if self.stage not in (1, 2):
            raise MedusaError(f"stage must be 1 (frozen base) or 2 (LoRA on the base), got {self.stage}")
        from medusa.heads import HEAD_TYPES  # here, not at the top: `medusa train --help` must not import torch

        if self.head_type not in HEAD_TYPES:
            raise MedusaError(f"head_type must be one of {', '.join(HEAD_TYPES)}, got {self.head_type!r}")
        if self.loss not in ("kl", "ce"):
            raise MedusaError(f"loss must be 'kl' or 'ce', got {self.loss!r}")
        if self.num_layers < 0:
            raise MedusaError(f"num_layers must be 0 or more, got {self.num_layers}")
        if not 0 <= self.eval_fraction < 1:
            raise MedusaError(f"eval_fraction must lie in [0, 1), got {self.eval_fraction}")
        if self.max_steps is not None and self.max_steps < 1:
            raise MedusaError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise MedusaError(f"epochs must be positive, got {self.epochs}")
        if self.max_tokens is not None and self.max_tokens < self.max_length:
            raise MedusaError(f"max_tokens ({self.max_tokens}) must be at least max_length ({self.max_length})")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise MedusaError(f"mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if not self.data:
            raise MedusaError("no data files given")

    @property
    def head_weights(self) -> list[float]:
        return [self.head_weight_decay**k for k in range(self.num_heads)]

    def to_dict(self) -> dict:
        return asdict(self)

    def resume_conflict(self, saved: dict) -> tuple[str, object, object] | None:
        """The first setting (in field order) that differs from ``saved``, the run a resume continues, as
        ``(name, saved value, this value)``; None when every setting that changes the result matches.

        Only ``RESUMABLE_CHANGES`` may differ. A setting the saved run does not record predates it, so that
        run had its default. Nested settings are named with a dot (``lora.rank``).
        """
        current = _flat(json.loads(json.dumps(self.to_dict())))  # as the saved JSON holds it (tuples as lists)
        defaults = _flat(_defaults(TrainConfig))
        before = _flat(saved)
        for name, value in current.items():
            if name.split(".")[0] in RESUMABLE_CHANGES:
                continue
            old = before.get(name, defaults.get(name))
            if old != value:
                return name, old, value
        return None


# Settings a resumed run may change: they decide how often the run logs and checkpoints, where it is and what
# is written beside its result, not the result. Every other TrainConfig setting must match (docs/training.md).
RESUMABLE_CHANGES = ("output_dir", "checkpoint_every", "keep_checkpoints", "log_every", "merge")


def _defaults(cls: type) -> dict:
    values = {}
    for item in fields(cls):
        if item.default is not MISSING:
            values[item.name] = item.default
        elif item.default_factory is not MISSING:
            made = item.default_factory()
            values[item.name] = asdict(made) if hasattr(made, "__dataclass_fields__") else made
    return values


def _flat(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


def _positive(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MedusaError(f"{name} must be a positive integer, got {value!r}")
