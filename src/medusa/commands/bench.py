"""``medusa bench``: Spec-Bench for our decoding against transformers' (JSON, PNG, table), or ``--cost-curve``."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from medusa.bench.costcurve import (
    SHAPES,
    CostCurveConfig,
    cost_curve,
    plot_cost_curve,
    random_model,
    validate_cost_curve,
)
from medusa.bench.environment import environment
from medusa.bench.journal import (
    REPORT_NAME,
    finished_report,
    journal_path,
    refuse_unfinished,
    start_journal,
    unreported,
    with_earlier,
)
from medusa.bench.report import (
    build_report,
    equality_line,
    markdown_summary,
    merge_reports,
    plot_report,
    report_table,
    write_report,
)
from medusa.bench.runner import (
    METHOD_NAMES,
    BenchConfig,
    Record,
    describe_run,
    planned_runs,
    resolve_cache_length,
    run_benchmark,
    step_settings,
)
from medusa.bench.specbench import default_questions_path, load_questions, select_questions
from medusa.commands.common import add_model_arguments, heads_source, load_model
from medusa.commands.output import print_table
from medusa.decoding import ATTENTION_SPAN_STEP
from medusa.errors import MedusaError
from medusa.files import read_json, write_json, write_text
from medusa.heads import DEFAULT_HEAD_TYPE, MedusaHeadsConfig
from medusa.loading import resolve_device, resolve_dtype
from medusa.model import MedusaModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    bench = parser.add_argument_group("Spec-Bench (the default mode)")
    bench.add_argument(
        "--questions",
        help="Spec-Bench question.jsonl (default: ../shared/data/spec_bench/question.jsonl beside the checkout)",
    )
    bench.add_argument("--categories", help="comma-separated categories (mt_bench means its eight; default: all)")
    bench.add_argument("--limit", type=int, help="the first N questions of each category (default: all)")
    bench.add_argument(
        "--turns",
        type=int,
        choices=(1, 2),
        default=1,
        help="2 also runs the MT-bench second turns, after the reference method's first answer",
    )
    bench.add_argument("--max-new-tokens", type=int, default=256, help="most new tokens per answer (default 256)")
    bench.add_argument(
        "--methods", default=",".join(METHOD_NAMES), help=f"comma-separated subset of {', '.join(METHOD_NAMES)}"
    )
    bench.add_argument("--warmup", type=int, default=2, help="prompts every method runs untimed first (default 2)")
    bench.add_argument(
        "--prompt-lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens for prompt-lookup"
    )
    bench.add_argument(
        "--lookup-nodes",
        type=int,
        default=None,
        help="nodes of the tree's lookup branch in medusa-lookup and lookup (default: the chain `medusa tree "
        "tune` chose for this device, else 10)",
    )
    bench.add_argument(
        "--transformers-limit",
        type=int,
        help="run hf-generate and prompt-lookup only on the first N questions of each category "
        "(they are slow; speedups over them use the prompts both ran)",
    )
    bench.add_argument(
        "--keep-tokens",
        action="store_true",
        help="also write every answer's token ids into bench.json (to compare answers across runs)",
    )
    bench.add_argument(
        "--resume",
        action="store_true",
        help="continue a run that stopped before its end, from --output-dir's records.jsonl "
        "(every finished prompt is journaled there as it is measured); the settings must match. A finished run of "
        "the same settings and questions is left as it is",
    )
    bench.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="instead of running, merge bench.json files of one setup run on different questions",
    )
    parser.add_argument("--no-cuda-graphs", action="store_true", help="step our decoder eagerly on the GPU")
    parser.add_argument(
        "--compile",
        choices=("off", "on", "max-autotune"),
        default="off",
        help="torch.compile our decoding step before capturing it (GPU)",
    )
    bench.add_argument(
        "--cache-length",
        default="auto",
        help="cache slots our decoders allocate at least (auto: one size for every first-turn prompt "
        "when compiling, so each method compiles once; none: what each prompt needs)",
    )
    parser.add_argument("--output-dir", default="bench-results", help="where the JSON, PNG and summary go")
    curve = parser.add_argument_group("cost curve (--cost-curve)")
    curve.add_argument(
        "--cost-curve",
        action="store_true",
        help="instead of Spec-Bench, time one decoding step against the tree's size",
    )
    curve.add_argument(
        "--shape",
        choices=tuple(SHAPES),
        help="a Llama of these dimensions with random weights, instead of --model; with --heads, those trained heads "
        "on it (a step's time depends on the shapes, not the weights: a device's curve for heads without the model)",
    )
    curve.add_argument(
        "--prefix-layer",
        action="store_true",
        help="with --shape: time heads with Hydra++'s prefix layer (trained heads carry their own)",
    )
    curve.add_argument("--sizes", default="1,2,4,8,16,32,64,128,256", help="tree sizes in nodes, root included")
    curve.add_argument("--context", type=int, default=512, help="committed tokens in the cache during the step")
    curve.add_argument(
        "--batch-sizes",
        default="1",
        metavar="B,B,...",
        help="rows decoded together, each a batch bucket of 1, 2, 4, ..., 64 (default 1); "
        "`medusa tree tune --batch-sizes` chooses a tree for each from this curve",
    )
    curve.add_argument(
        "--curve-lookup",
        type=int,
        default=0,
        metavar="N",
        help="make N nodes of every tree a lookup chain, its search included in the step (default 0)",
    )
    curve.add_argument(
        "--span-step",
        type=int,
        default=ATTENTION_SPAN_STEP,
        metavar="SLOTS",
        help="steps attend over the cache's first multiple of SLOTS that holds the tree; 0: over "
        f"every slot (default {ATTENTION_SPAN_STEP}; compiled steps always attend over every slot)",
    )
    curve.add_argument("--repeats", type=int, default=50, help="timed steps per size (the median is reported)")
    curve.add_argument("--step-warmup", type=int, default=5, help="untimed steps per size first")


def run(args: argparse.Namespace) -> int:
    if args.prefix_layer and not (args.cost_curve and args.shape):
        raise MedusaError(
            "--prefix-layer applies to --cost-curve --shape's random heads; trained heads carry their own"
        )
    if args.cost_curve:
        return run_cost_curve(args)
    if args.shape:
        raise MedusaError(
            "--shape only applies with --cost-curve; Spec-Bench needs a real model and tokenizer (--model)"
        )
    if args.merge:
        return run_merge(args)
    return run_spec_bench(args)


def run_spec_bench(args: argparse.Namespace) -> int:
    config = _bench_config(args)
    questions_file = Path(args.questions) if args.questions else default_questions_path()
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    questions = select_questions(load_questions(questions_file), categories, args.limit)
    output = Path(args.output_dir)
    refuse_unfinished(output, args.resume)
    model = load_model(args)
    config = replace(config, cache_length=resolve_cache_length(model, questions, config))
    meta = {
        **_command_meta(args),
        **environment(model.device),
        **describe_run(model, config),
        "heads_source": heads_source(args),
        "questions_file": str(questions_file.resolve()),
        "categories": categories,
        "limit_per_category": args.limit,
    }
    finished = finished_report(output, meta) if args.resume and not journal_path(output).is_file() else None
    if finished is not None:
        print(f"nothing to resume: {finished} is a finished run of these settings and questions", file=sys.stderr)
        return 0
    journal, done, notes = start_journal(output, meta, args.resume)
    for note in notes:
        print(note, file=sys.stderr)
    records: list[Record] = []
    try:
        with _sigterm_as_interrupt(), _progress(planned_runs(questions, config, done)) as advance:
            run_benchmark(
                model, questions, config, progress=advance, done=done, on_record=journal.append, records=records
            )
    except KeyboardInterrupt:
        measured = with_earlier(records, done, questions)
        print(
            f"stopped after {len(measured)} prompts; {journal.path} keeps every prompt measured: rerun with --resume "
            f"to continue",
            file=sys.stderr,
        )
        if measured:
            meta.update(prompts=len(measured), complete=False)
            _write_outputs(build_report(meta, measured, config.methods, args.keep_tokens), output)
        return 130
    meta.update(prompts=len(records), complete=True)
    status = _write_outputs(build_report(meta, records, config.methods, args.keep_tokens), output)
    left_out = unreported(records, done)
    if left_out:
        print(
            f"kept {journal.path}: it holds {len(left_out)} prompts of questions this run did not select",
            file=sys.stderr,
        )
    else:
        journal.remove()  # the report holds it all now
    return status


def _bench_config(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        max_new_tokens=args.max_new_tokens,
        turns=args.turns,
        warmup=args.warmup,
        cuda_graphs=not args.no_cuda_graphs,
        compile=_compile_setting(args.compile),
        prompt_lookup_num_tokens=args.prompt_lookup_tokens,
        lookup=args.lookup_nodes,
        transformers_limit=args.transformers_limit,
        cache_length=_cache_length_setting(args.cache_length),
    )


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[str], None]]:
    """A progress bar on a terminal; elsewhere (a log, a remote job) a plain line per generation, so that
    a run cut short still shows how far it got."""
    console = Console(stderr=True)
    if console.is_terminal:
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            task = progress.add_task("Spec-Bench", total=total)
            yield lambda text: progress.update(task, advance=1, description=text)
        return
    started = time.perf_counter()
    count = 0

    def line(text: str) -> None:
        nonlocal count
        count += 1
        print(f"[{count}/{total}, {time.perf_counter() - started:.0f} s] {text}", file=sys.stderr, flush=True)

    yield line


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (``timeout``, a job scheduler) like Ctrl-C, so a stopped run still writes its report."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_merge(args: argparse.Namespace) -> int:
    reports = []
    for name in args.merge:
        reports.append(read_json(name, "benchmark report"))
    try:
        merged = merge_reports(reports)
    except ValueError as error:
        raise MedusaError(f"cannot merge {', '.join(args.merge)}: {error}") from None
    merged["meta"]["command"] = _command_meta(args)["command"]
    return _write_outputs(merged, Path(args.output_dir))


def _write_outputs(report: dict, output: Path) -> int:
    json_path = write_report(report, output / REPORT_NAME)
    png_path = plot_report(report, output / "bench.png")
    write_text(output / "summary.md", markdown_summary(report))
    print_table(report_table(report))
    print(equality_line(report))
    print(f"wrote {json_path}, {png_path} and {output / 'summary.md'}")
    return 0


def run_cost_curve(args: argparse.Namespace) -> int:
    config = CostCurveConfig(
        sizes=_sizes(args.sizes),
        batch_sizes=_sizes(args.batch_sizes),
        context=args.context,
        repeats=args.repeats,
        warmup=args.step_warmup,
        cuda_graphs=not args.no_cuda_graphs,
        compile=_compile_setting(args.compile),
        lookup=args.curve_lookup,
        span_step=args.span_step or None,
    )
    if args.shape:
        if args.model:
            raise MedusaError("give either --shape (random weights) or --model, not both")
        if args.heads and args.prefix_layer:
            raise MedusaError("--prefix-layer applies to --shape's random heads; the heads in --heads carry their own")
        device = resolve_device(args.device)
        base = random_model(args.shape, device, resolve_dtype(args.dtype, device))
        text = base.config
        # Heads that share the lm_head: the cheapest heads, so the curve shows the tree's own cost.
        # Sequential heads cost one head call per tree depth: time the head type being tuned (--head-type).
        # Trained heads (--heads) bring their own layers, type and prefix layer; their sizes must fit the shape.
        heads = args.heads or MedusaHeadsConfig(
            hidden_size=text.hidden_size,
            vocab_size=text.vocab_size,
            num_heads=args.num_heads,
            share_lm_head=True,
            head_type=args.head_type or DEFAULT_HEAD_TYPE,
            prefix_layer=args.prefix_layer,
        )
        model = MedusaModel.from_pretrained(base, heads=heads)
        model_label = base.config._name_or_path
    else:
        model = load_model(args)
        model_label = model.name
    console = Console(stderr=True)
    with console.status("timing decoding steps") as status:
        result = cost_curve(model, config, progress=lambda text: status.update(f"timing decoding steps: {text}"))
    heads = model.heads.config
    result["meta"] = {
        **_command_meta(args),
        **environment(model.device),
        "model": model_label,
        "dtype": str(model.base_model.dtype).removeprefix("torch."),
        "heads": {
            "num_heads": heads.num_heads,
            "num_layers": heads.num_layers,
            "share_lm_head": heads.share_lm_head,
            "head_type": heads.head_type,
            "prefix_layer": heads.prefix_layer,
        },
        "context": config.context,
        "batch_sizes": list(config.batch_sizes),
        "repeats": config.repeats,
        "warmup_steps": config.warmup,
        **step_settings(model, config.cuda_graphs, config.compile),
        "span_step": config.span_step,
        "tree_prior": "medusa.tree.GENERIC_HEAD_ACCURACY, greedy layout (build_tree_from_accuracies)",
    }
    validate_cost_curve(result)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    json_path = output / "cost_curve.json"
    write_json(json_path, result, indent=1)
    png_path = plot_cost_curve(result, output / "cost_curve.png")
    table = Table(
        title=f"one decoding step, {model_label}, context {config.context}; memory floor "
        f"{result['floor_ms']:.3f} ms ({result['weight_bytes'] / 1e6:,.1f} MB of weights at "
        f"{result['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)"
    )
    for column in ("nodes", "depth", "median ms", "min ms", "x floor", "x one token"):
        table.add_column(column, justify="right")
    for p in result["points"]:
        ratio = "-" if p["x_one_token"] is None else f"{p['x_one_token']:.2f}"
        table.add_row(
            str(p["nodes"]),
            str(p["depth"]),
            f"{p['median_ms']:.3f}",
            f"{p['min_ms']:.3f}",
            f"{p['x_floor']:.2f}",
            ratio,
        )
    print_table(table)
    print(f"wrote {json_path} and {png_path}")
    return 0


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise MedusaError(f"--sizes takes comma-separated node counts such as 1,8,64, got {text!r}") from None


def _cache_length_setting(value: str) -> int | str | None:
    if value in ("auto", "none"):
        return None if value == "none" else value
    try:
        return int(value)
    except ValueError:
        raise MedusaError(f"--cache-length takes a number of slots, auto or none, got {value!r}") from None


def _compile_setting(value: str) -> bool | str:
    return {"off": False, "on": True}.get(value, value)


def _command_meta(args: argparse.Namespace) -> dict:
    arguments = {k: v for k, v in vars(args).items() if k != "handler" and not callable(v)}
    return {
        "command": shlex.join(["medusa", *sys.argv[1:]]) if _ran_as_medusa() else "medusa (called in-process)",
        "arguments": {
            k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in arguments.items()
        },
    }


def _ran_as_medusa() -> bool:
    return Path(sys.argv[0]).name in ("medusa", "cli.py", "__main__.py")
