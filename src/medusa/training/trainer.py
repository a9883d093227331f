"""The training loop for Medusa-1 (frozen base) and Medusa-2 (LoRA on the base), through accelerate.

The same code runs on the CPU, on one GPU, and under ``accelerate launch`` / ``torchrun``: accelerate
wraps the objective (DDP), shards the batches and reduces the metrics; nothing here talks to a process
group. Gradient accumulation is explicit (``no_sync`` until the last micro-batch), so the data position
after any optimizer step is a plain count and a resumed run replays exactly the batches, schedule and
optimizer state of an uninterrupted one.

Output layout::

    out/heads/               MedusaHeads.save_pretrained (MedusaModel.from_pretrained(heads=...))
    out/adapter/             stage 2: the peft LoRA adapter (safetensors)
    out/merged/              stage 2 with merge: the base with the adapter merged in
    out/checkpoints/         step-N/ and latest.json, for --resume
    out/train_log.jsonl      one line per logged step: loss per head, lr, tokens/s
    out/head_accuracy.json   held-out top-1/top-5 and per-rank hit rates per head
    out/train_config.json    the settings of the run
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch.utils.data import DataLoader

from medusa.errors import MedusaError
from medusa.files import append_text, atomic_directory, remove_stale_temporaries, write_json, write_text
from medusa.heads import MedusaHeads, MedusaHeadsConfig
from medusa.loading import load_base_model
from medusa.training.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    restore_optimizer,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from medusa.training.config import RESUMABLE_CHANGES, TrainConfig
from medusa.training.data import Collator, Example, LengthBatchSampler, load_examples, split_held_out
from medusa.training.evaluate import accuracy_report, count_hits
from medusa.training.objective import MedusaObjective

LOG_NAME = "train_log.jsonl"
ACCURACY_NAME = "head_accuracy.json"
CONFIG_NAME = "train_config.json"


class ResumeMismatch(MedusaError):
    """A resume asked with a setting that differs from the run it continues; ``setting`` names it."""

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass
class StepReport:
    step: int
    total_steps: int
    epoch: float
    loss: float
    head_losses: list[float]
    backbone_loss: float | None
    learning_rate: float
    tokens_per_second: float


@dataclass
class TrainResult:
    output_dir: Path
    heads_dir: Path
    steps: int
    resumed_from: int | None
    train_examples: int
    held_out_examples: int
    skipped: list[str] = field(default_factory=list)
    accuracy: dict = field(default_factory=dict)
    adapter_dir: Path | None = None
    merged_dir: Path | None = None
    main_process: bool = True  # False on the other ranks of a multi-process run (they should stay quiet)


def cosine_with_warmup(step: int, warmup: int, total: int, delay: int = 0) -> float:
    """Linear warm-up then cosine decay to 0 (as transformers' ``get_cosine_schedule_with_warmup``),
    starting ``delay`` steps late (Medusa-2's backbone waits for the heads' warm-up)."""
    step -= delay
    total = max(1, total - delay)
    if step < 0:
        return 0.0
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


class Trainer:
    """Train Medusa heads as ``config`` says. ``base_model``/``tokenizer`` skip loading (tests, notebooks)."""

    def __init__(
        self,
        config: TrainConfig,
        base_model: torch.nn.Module | None = None,
        tokenizer=None,
        base_name: str | None = None,
    ) -> None:
        self.config = config
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.base_name = base_name

    # ----- setup -------------------------------------------------------------------------------------

    def _accelerator(self) -> Accelerator:
        config = self.config
        cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
        precision = config.mixed_precision
        if precision == "auto":
            precision = "no" if cpu else "bf16"
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if config.stage == 2 else []
        return Accelerator(cpu=cpu, mixed_precision=precision, kwargs_handlers=handlers)

    def _load_base(self, accelerator: Accelerator) -> tuple[torch.nn.Module, object, str]:
        if self.base_model is not None:
            name = self.base_name or getattr(self.base_model.config, "_name_or_path", "") or "model"
            return self.base_model.to(accelerator.device), self.tokenizer, name
        model, tokenizer, name = load_base_model(self.config.model, dtype=self.config.dtype, device=accelerator.device)
        return model, tokenizer, name

    def _build(self, base: torch.nn.Module, name: str) -> MedusaObjective:
        config = self.config
        base.requires_grad_(False)
        base.eval()  # no dropout in the base: the teacher is deterministic
        lm_head = base.get_output_embeddings()
        heads_config = MedusaHeadsConfig(
            hidden_size=base.config.get_text_config().hidden_size,
            vocab_size=lm_head.weight.shape[0],
            num_heads=config.num_heads,
            num_layers=config.num_layers,
            share_lm_head=config.share_lm_head,
            base_model=name,
            head_type=config.head_type,
            prefix_layer=config.prefix_layer,
        )
        torch.manual_seed(config.seed)
        heads = MedusaHeads(heads_config, base_lm_head=lm_head).to(device=lm_head.weight.device, dtype=torch.float32)
        if config.stage == 2:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=config.lora.rank,
                lora_alpha=config.lora.alpha,
                lora_dropout=config.lora.dropout,
                target_modules=config.lora.target_modules,
                bias="none",
            )
            base = get_peft_model(base, lora)
        return MedusaObjective(
            base,
            heads,
            loss=config.loss,
            head_weights=config.head_weights,
            stage=config.stage,
            heads_lambda=config.heads_lambda,
            chunk_size=config.loss_chunk_size,
        )

    def _optimizer(self, objective: MedusaObjective) -> torch.optim.Optimizer:
        config = self.config
        heads = [p for p in objective.heads.parameters() if p.requires_grad]
        if not heads:
            raise MedusaError("the heads have nothing to train: with a shared lm_head, num_layers must be at least 1")
        groups = [{"params": heads, "lr": config.learning_rate}]
        backbone = [p for n, p in objective.base.named_parameters() if p.requires_grad]
        if config.stage == 2:
            if not backbone:
                raise MedusaError("stage 2: the LoRA adapter has no trainable parameters (check --lora-target)")
            groups.append({"params": backbone, "lr": config.backbone_learning_rate})
        return torch.optim.AdamW(groups, weight_decay=config.weight_decay)

    def _trainable_state(self, objective: MedusaObjective) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in objective.named_parameters() if p.requires_grad}

    # ----- the run -----------------------------------------------------------------------------------

    def train(self, resume: bool = False, on_step: Callable[[StepReport], None] | None = None) -> TrainResult:
        """Run to the end. ``resume`` continues from the newest checkpoint in the output directory (if any).

        ``on_step`` gets a report every ``log_every`` steps, on the main process only.
        """
        config = self.config
        output = Path(config.output_dir)
        checkpoints = output / "checkpoints"
        found = latest_checkpoint(checkpoints)
        if found is not None and not resume:
            raise MedusaError(
                f"{output} already holds checkpoints; pass --resume to continue, or choose another --output"
            )
        if found is not None:
            self._check_resume(found)  # before loading anything, and before train_config.json is rewritten
        accelerator = self._accelerator()
        if accelerator.is_main_process:
            for directory in (output, checkpoints, output / "heads"):
                remove_stale_temporaries(directory)  # what a killed run was writing
        base, tokenizer, name = self._load_base(accelerator)
        if tokenizer is None:
            raise MedusaError("training needs a tokenizer to apply the chat template")

        read = load_examples(config.data, tokenizer, config.max_length)
        train_set, held_out = split_held_out(read.items, config.eval_fraction, config.seed, config.eval_max_examples)
        if not train_set:
            raise MedusaError(
                f"no usable training conversations in {', '.join(config.data)} ({read.skipped_count} skipped)"
            )
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        collate = Collator(pad_id)

        objective = self._build(base, name)
        optimizer = self._optimizer(objective)
        sampler = LengthBatchSampler(
            [len(e.input_ids) for e in train_set], config.batch_size, config.max_tokens, config.seed
        )
        loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate)
        objective, optimizer, loader = accelerator.prepare(objective, optimizer, loader)
        model = accelerator.unwrap_model(objective)

        micro_per_epoch = len(loader)
        steps_per_epoch = math.ceil(micro_per_epoch / config.gradient_accumulation)
        total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_ratio * total_steps)
        delay = config.heads_warmup_steps if config.stage == 2 else 0
        lambdas = [functools.partial(cosine_with_warmup, warmup=warmup, total=total_steps)]
        if config.stage == 2:
            lambdas.append(functools.partial(cosine_with_warmup, warmup=warmup, total=total_steps, delay=delay))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

        start_step, resumed_from = 0, None
        data_shape = {"train_examples": len(train_set), "micro_batches_per_epoch": micro_per_epoch}
        if found is not None:
            start_step = self._restore(found, model, optimizer, scheduler, data_shape)
            resumed_from = start_step
        if accelerator.is_main_process:
            output.mkdir(parents=True, exist_ok=True)
            write_json(output / CONFIG_NAME, config.to_dict())
            _trim_log(output / LOG_NAME, start_step)
        accelerator.wait_for_everyone()

        batches = _micro_batches(loader, sampler, accelerator, start_step * config.gradient_accumulation)
        params = [p for p in objective.parameters() if p.requires_grad]
        window = _Window(config.num_heads, accelerator.device)
        step = start_step
        _training_mode(model)
        while step < total_steps:
            train_backbone = config.stage == 2 and step >= delay
            for micro in range(config.gradient_accumulation):
                batch = next(batches)
                last = micro == config.gradient_accumulation - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(objective):
                    out = objective(**batch, train_backbone=train_backbone)
                    accelerator.backward(out["loss"] / config.gradient_accumulation)
                window.add(out, batch["attention_mask"])
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % config.checkpoint_every == 0 or step == total_steps:
                self._save(accelerator, checkpoints, step, model, optimizer, scheduler, data_shape)
            if step % config.log_every == 0 or step == total_steps:
                report = window.report(
                    accelerator,
                    step,
                    total_steps,
                    step / steps_per_epoch,
                    scheduler.get_last_lr()[0],
                    config.stage == 2 and train_backbone,
                )
                if accelerator.is_main_process:
                    append_text(output / LOG_NAME, json.dumps(report.__dict__) + "\n")
                if on_step is not None and accelerator.is_main_process:
                    on_step(report)

        accuracy = self._evaluate(accelerator, model, held_out, collate)
        result = TrainResult(
            output,
            output / "heads",
            total_steps,
            resumed_from,
            len(train_set),
            len(held_out),
            skipped=read.skipped,
            accuracy=accuracy,
            main_process=accelerator.is_main_process,
        )
        if accelerator.is_main_process:
            self._save_outputs(model, tokenizer, result)
        accelerator.wait_for_everyone()
        return result

    def _save_outputs(self, model: MedusaObjective, tokenizer, result: TrainResult) -> None:
        """Heads (float32: a few MB with a shared lm_head), accuracy, and in stage 2 the adapter / merged model."""
        model.heads.save_pretrained(result.heads_dir)
        write_json(result.output_dir / ACCURACY_NAME, result.accuracy)
        if self.config.stage == 2:
            result.adapter_dir = result.output_dir / "adapter"
            with atomic_directory(result.adapter_dir) as directory:
                model.base.save_pretrained(directory, safe_serialization=True)
            if self.config.merge:  # last: merging rewrites the base's weights in place
                result.merged_dir = result.output_dir / "merged"
                merged = model.base.merge_and_unload()
                with atomic_directory(result.merged_dir) as directory:
                    merged.save_pretrained(directory, safe_serialization=True)
                    tokenizer.save_pretrained(directory)

    # ----- checkpoints, evaluation -------------------------------------------------------------------

    def _save(
        self,
        accelerator: Accelerator,
        root: Path,
        step: int,
        model: MedusaObjective,
        optimizer,
        scheduler,
        data_shape: dict,
    ) -> None:
        if accelerator.is_main_process:
            state = {
                "scheduler": scheduler.state_dict(),
                "micro_batches": step * self.config.gradient_accumulation,
                "parameters": list(self._trainable_state(model)),
                "config": self.config.to_dict(),
                "data": data_shape,
            }
            checkpoint = Checkpoint(step, self._trainable_state(model), optimizer.state_dict(), state, rng_state())
            save_checkpoint(root, checkpoint, keep=self.config.keep_checkpoints)
        accelerator.wait_for_everyone()

    def _check_resume(self, directory: Path) -> None:
        """Refuse to continue a run with settings that would change its result (RESUMABLE_CHANGES may differ)."""
        conflict = self.config.resume_conflict(read_state(directory).get("config", {}))
        if conflict is not None:
            name, saved, now = conflict
            raise ResumeMismatch(
                f"checkpoint {directory} was written with different settings: {name} was {saved!r}, now {now!r}. "
                f"Every setting that changes the result must match to resume (only {', '.join(RESUMABLE_CHANGES)} "
                "may change); resume with the same settings, or train into another --output",
                setting=name,
            )

    def _restore(self, directory: Path, model: MedusaObjective, optimizer, scheduler, data_shape: dict) -> int:
        checkpoint = load_checkpoint(directory)
        if checkpoint.state.get("data") != data_shape:
            raise MedusaError(
                f"checkpoint {directory} was trained on other data ({checkpoint.state.get('data')}, now "
                f"{data_shape}); resume with the same data files"
            )
        expected = self._trainable_state(model)
        if list(expected) != checkpoint.state.get("parameters") or set(expected) != set(checkpoint.weights):
            raise MedusaError(f"checkpoint {directory} holds other trainable parameters than this run has")
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in checkpoint.weights:
                    parameter.copy_(checkpoint.weights[name])
        restore_optimizer(optimizer, checkpoint.optimizer)
        scheduler.load_state_dict(checkpoint.state["scheduler"])
        restore_rng(checkpoint.rng)
        return checkpoint.step

    def _evaluate(
        self, accelerator: Accelerator, model: MedusaObjective, held_out: list[Example], collate: Collator
    ) -> dict:
        if not held_out:
            return {}
        sampler = LengthBatchSampler(
            [len(e.input_ids) for e in held_out], self.config.batch_size, self.config.max_tokens, seed=0, shuffle=False
        )
        batches = list(sampler)
        with accelerator.split_between_processes(batches) as mine:
            totals = count_hits(model, (collate([held_out[i] for i in batch]) for batch in mine))
        totals = {key: accelerator.reduce(value, reduction="sum") for key, value in totals.items()}
        return accuracy_report(totals, self.config.stage, self.config.head_type)


def _micro_batches(
    loader: DataLoader, sampler: LengthBatchSampler, accelerator: Accelerator, start: int
) -> Iterator[dict]:
    """Micro-batches forever, epoch after epoch, starting after the first ``start`` of them."""
    epoch, skip = divmod(start, len(loader))
    while True:
        sampler.use_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


class _Window:
    """Metrics summed on the device between log lines; read (one sync) only when a line is written."""

    def __init__(self, num_heads: int, device: torch.device) -> None:
        self.num_heads, self.device = num_heads, device
        self._reset()

    def _reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.heads = torch.zeros(self.num_heads, device=self.device)
        self.backbone = torch.zeros((), device=self.device)
        self.micro = torch.zeros((), device=self.device)
        self.tokens = torch.zeros((), device=self.device)
        self.started = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], attention_mask: torch.Tensor) -> None:
        self.loss += out["loss"].detach().float()
        self.heads += out["head_losses"].float()
        self.backbone += out["backbone_loss"].float()
        self.micro += 1
        self.tokens += attention_mask.sum()

    def report(
        self, accelerator: Accelerator, step: int, total: int, epoch: float, lr: float, backbone: bool
    ) -> StepReport:
        values = torch.cat(
            [self.loss.view(1), self.heads, self.backbone.view(1), self.micro.view(1), self.tokens.view(1)]
        )
        values = accelerator.reduce(values, reduction="sum").tolist()
        micro = max(values[-2], 1.0)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        report = StepReport(
            step=step,
            total_steps=total,
            epoch=round(epoch, 4),
            loss=values[0] / micro,
            head_losses=[v / micro for v in values[1 : 1 + self.num_heads]],
            backbone_loss=values[1 + self.num_heads] / micro if backbone else None,
            learning_rate=lr,
            tokens_per_second=values[-1] / elapsed,
        )
        self._reset()
        return report


def _training_mode(model: MedusaObjective) -> None:
    """Evaluation mode everywhere (the frozen base is the teacher: no dropout) but the adapter's dropout."""
    model.eval()
    for name, module in model.base.named_modules():
        if name.split(".")[-1] == "lora_dropout":
            module.train()


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines after ``step``: a resumed run rewrites the steps the killed one did past its checkpoint."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    write_text(path, "".join(line + "\n" for line in kept))
