"""``medusa train``: Medusa-1 heads on a frozen base (``--stage 1``) or Medusa-2 with LoRA (``--stage 2``).

Runs as is on one device, or on several under ``accelerate launch`` / ``torchrun`` with the same flags.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tqdm import tqdm

from medusa.commands.common import DEFAULT_HEAD_TYPE, add_head_type_argument
from medusa.commands.threads import add_threads_argument
from medusa.errors import MedusaError
from medusa.training.config import LoraSettings, TrainConfig

if TYPE_CHECKING:  # the trainer (torch, accelerate) loads when the command runs, not for --help
    from medusa.training.trainer import StepReport

# The flag behind each TrainConfig setting whose name differs from it (errors name the flag a user typed).
FLAGS = {
    "output_dir": "--output",
    "head_weight_decay": "--head-decay",
    "learning_rate": "--lr",
    "backbone_learning_rate": "--backbone-lr",
    "gradient_accumulation": "--grad-accum",
    "lora.target_modules": "--lora-target",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, help="conversation files, comma-separated (JSON or JSONL; medusa distill's output)"
    )
    parser.add_argument(
        "--output", required=True, help="output directory: heads/, checkpoints/, train_log.jsonl, head_accuracy.json"
    )
    parser.add_argument(
        "--model", help="base model: a local model directory or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--stage",
        type=int,
        choices=(1, 2),
        default=1,
        help="1: frozen base (Medusa-1); 2: LoRA on the base too (Medusa-2)",
    )
    parser.add_argument("--num-heads", type=int, default=4, help="heads to train (default 4)")
    parser.add_argument("--num-layers", type=int, default=1, help="residual blocks per head (default 1)")
    add_head_type_argument(
        parser, f"(default {DEFAULT_HEAD_TYPE}; medusa for heads that vLLM or TensorRT-LLM can read: `medusa export`) "
    )
    parser.add_argument(
        "--prefix-layer",
        action="store_true",
        help="Hydra++: the heads read a causal self-attention layer over the base hidden states, trained with them",
    )
    parser.add_argument(
        "--share-lm-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="heads project through the base lm_head (default; small files) or their own copies",
    )
    parser.add_argument(
        "--loss",
        choices=("kl", "ce"),
        default="kl",
        help="kl (default): towards the base model's own distribution; ce: the data's tokens",
    )
    parser.add_argument("--head-decay", type=float, default=0.8, help="head k's loss weighs decay**k (default 0.8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="heads' learning rate (default 1e-3)")
    parser.add_argument(
        "--backbone-lr", type=float, default=5e-5, help="stage 2: the adapter's learning rate (default 5e-5)"
    )
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    parser.add_argument("--warmup-steps", type=int, help="learning-rate warm-up steps (default: 5%% of the steps)")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the data, fractions allowed (default 1)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process (default 8)")
    parser.add_argument("--max-tokens", type=int, help="also cap a micro-batch at this many padded tokens")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    parser.add_argument(
        "--max-length", type=int, default=1024, help="cut conversations to this many tokens (default 1024)"
    )
    parser.add_argument(
        "--eval-fraction", type=float, default=0.02, help="held out for the accuracy report (default 0.02)"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=500, help="optimizer steps between checkpoints (default 500)"
    )
    parser.add_argument("--log-every", type=int, default=10, help="print and log the loss every N steps (default 10)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the split, the batch order and fresh heads (default 0)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    parser.add_argument(
        "--heads-lambda", type=float, default=0.2, help="stage 2: weight of the heads' loss (default 0.2)"
    )
    parser.add_argument("--heads-warmup-steps", type=int, default=0, help="stage 2: train the heads alone first")
    parser.add_argument("--lora-rank", type=int, default=16, help="Medusa-2: LoRA rank on the backbone (default 16)")
    parser.add_argument("--lora-alpha", type=int, default=32, help="Medusa-2: LoRA alpha (default 32)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="Medusa-2: LoRA dropout (default 0)")
    parser.add_argument(
        "--lora-target", default="all-linear", help="peft target modules: all-linear or comma-separated names"
    )
    parser.add_argument(
        "--merge", action="store_true", help="stage 2: also save the base with the adapter merged in (out/merged)"
    )
    parser.add_argument("--device", default="auto", help="cpu or auto (default); several GPUs: accelerate launch")
    parser.add_argument(
        "--dtype", default="auto", help="base weights: float32, bfloat16 or auto (bf16 on GPU, fp32 on CPU)"
    )
    add_threads_argument(parser)
    parser.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16", "fp16"))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    target = args.lora_target if args.lora_target == "all-linear" else [t for t in args.lora_target.split(",") if t]
    return TrainConfig(
        data=[path for path in args.data.split(",") if path],
        output_dir=args.output,
        model=args.model,
        stage=args.stage,
        num_heads=args.num_heads,
        num_layers=args.num_layers,
        share_lm_head=args.share_lm_head,
        head_type=args.head_type,
        prefix_layer=args.prefix_layer,
        loss=args.loss,
        head_weight_decay=args.head_decay,
        learning_rate=args.lr,
        backbone_learning_rate=args.backbone_lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        gradient_accumulation=args.grad_accum,
        max_length=args.max_length,
        eval_fraction=args.eval_fraction,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        seed=args.seed,
        heads_lambda=args.heads_lambda,
        heads_warmup_steps=args.heads_warmup_steps,
        merge=args.merge,
        dtype=args.dtype,
        mixed_precision=args.mixed_precision,
        device=args.device,
        lora=LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=target),
    )


def run(args: argparse.Namespace) -> int:
    from medusa.training.trainer import ResumeMismatch, Trainer

    config = config_from_args(args)
    trainer = Trainer(config)
    bar = None

    def on_step(report: StepReport) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(
                total=report.total_steps,
                initial=report.step,
                unit="steps",
                desc=f"train stage {config.stage}",
                file=sys.stderr,
            )
        bar.update(report.step - bar.n)
        heads = " ".join(f"{value:.3f}" for value in report.head_losses)
        backbone = f" backbone {report.backbone_loss:.4f}" if report.backbone_loss is not None else ""
        bar.set_postfix_str(f"loss {report.loss:.4f} heads [{heads}]{backbone} {report.tokens_per_second:,.0f} tok/s")

    try:
        result = trainer.train(resume=args.resume, on_step=on_step)
    except ResumeMismatch as error:
        dest = error.setting.replace(".", "_")
        flag = FLAGS.get(error.setting) or ("--" + dest.replace("_", "-") if hasattr(args, dest) else None)
        raise MedusaError(f"{error} [{error.setting} is set by {flag}]" if flag else str(error)) from None
    if bar is not None:
        bar.close()
    if not result.main_process:
        return 0
    if result.resumed_from is not None:
        print(f"resumed from step {result.resumed_from}", file=sys.stderr)
    for line in result.skipped[:20]:
        print(f"skipped {line}", file=sys.stderr)
    print(
        f"{result.train_examples} conversations trained on, {result.held_out_examples} held out, "
        f"{len(result.skipped)} records skipped; {result.steps} steps",
        file=sys.stderr,
    )
    for head in result.accuracy.get("heads", []):
        print(
            f"head {head['head']} (token t+{head['head'] + 2}): top-1 {head['top1']:.3f}  top-5 {head['top5']:.3f}  "
            f"over {head['positions']} held-out positions"
        )
    if "backbone_agreement" in result.accuracy:
        print(
            "adapted backbone agrees with the original's next token at "
            f"{result.accuracy['backbone_agreement']:.3f} of positions"
        )
    print(
        f"heads saved to {result.heads_dir}"
        + (f"; adapter to {result.adapter_dir}" if result.adapter_dir else "")
        + (f"; merged model to {result.merged_dir}" if result.merged_dir else "")
    )
    return 0
