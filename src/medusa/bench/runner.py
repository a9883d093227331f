"""The methods ``medusa bench`` compares, and the loop that runs them all on the same prompts.

Every method turns a prompt's token ids into a ``Sample``: the new tokens, prefill and decode time,
and how many forward passes produced them. Ours take their engine from ``MedusaModel.engine``,
as ``generate`` does, so whatever fast path it picks (CUDA graphs on a GPU) is what is measured;
transformers' methods call ``base_model.generate`` on the very same weights. No method detokenises
while it is timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
import transformers

from medusa.bench.environment import synchronize
from medusa.bench.specbench import Question, messages_as_text, turn_messages
from medusa.devices import spans_devices
from medusa.engine import EngineOptions
from medusa.errors import MedusaError
from medusa.lookup import DEFAULT_MAX_NGRAM, check_lookup
from medusa.model import GenerationConfig, MedusaModel

AUTOREGRESSIVE = "autoregressive"
MEDUSA = "medusa"
HF_GENERATE = "hf-generate"
PROMPT_LOOKUP = "prompt-lookup"
# Ours with the tree's lookup branch (medusa.lookup): with the heads' tree, and alone (prompt lookup on our fast path).
MEDUSA_LOOKUP = "medusa-lookup"
LOOKUP = "lookup"
DEFAULT_LOOKUP_NODES = 10  # the lookup branch's nodes when none was tuned for the device
METHOD_NAMES = (AUTOREGRESSIVE, MEDUSA, HF_GENERATE, PROMPT_LOOKUP, MEDUSA_LOOKUP, LOOKUP)
TRANSFORMERS_METHODS = (HF_GENERATE, PROMPT_LOOKUP)


@dataclass
class BenchConfig:
    methods: tuple[str, ...] = METHOD_NAMES
    max_new_tokens: int = 256
    turns: int = 1  # 2: also the second turns of the MT-bench rows, after the first answer
    warmup: int = 2  # prompts run by every method before timing starts (graph capture, allocator, caches)
    cuda_graphs: bool = True
    compile: bool | str = False
    prompt_lookup_num_tokens: int = 10
    # Nodes of the lookup branch in medusa-lookup and lookup; None: the chain tuned for this device
    # (`medusa tree tune`), else DEFAULT_LOOKUP_NODES.
    lookup: int | None = None
    # Transformers' eager methods are slow: run them only on the first N questions of each category.
    transformers_limit: int | None = None
    # Cache slots our decoders allocate at least: "auto" is enough for every first-turn prompt when
    # compiling (one compilation per method instead of one per cache size), else just what each prompt needs.
    cache_length: int | str | None = "auto"

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        unknown = [m for m in self.methods if m not in METHOD_NAMES]
        if unknown or not self.methods:
            raise MedusaError(
                f"unknown benchmark method(s) {unknown or '(none given)'}; choose among {', '.join(METHOD_NAMES)}"
            )
        if len(set(self.methods)) != len(self.methods):
            raise MedusaError(f"benchmark methods repeat: {list(self.methods)}")
        if self.turns not in (1, 2):
            raise MedusaError(f"turns must be 1 or 2, got {self.turns!r}")
        check_lookup(DEFAULT_LOOKUP_NODES if self.lookup is None else self.lookup, DEFAULT_MAX_NGRAM)
        if self.lookup == 0 and {MEDUSA_LOOKUP, LOOKUP} & set(self.methods):
            raise MedusaError(f"methods {MEDUSA_LOOKUP} and {LOOKUP} need a lookup branch of at least 1 node")
        for name in ("max_new_tokens", "prompt_lookup_num_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MedusaError(f"{name} must be a positive integer, got {value!r}")
        limit = self.transformers_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise MedusaError(f"transformers_limit must be a positive number of questions per category, got {limit!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise MedusaError(f"warmup must be 0 or more prompts, got {self.warmup!r}")
        length = self.cache_length
        if length not in ("auto", None) and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise MedusaError(f"cache_length must be a positive number of slots, 'auto' or None, got {length!r}")

    @property
    def reference(self) -> str:
        """The method whose answers are fed back as second-turn context, and the equality check's reference."""
        return AUTOREGRESSIVE if AUTOREGRESSIVE in self.methods else self.methods[0]


@dataclass
class Sample:
    token_ids: list[int]
    prefill_seconds: float  # the prompt's forward pass, up to the first new token
    decode_seconds: float  # the rest, up to the last new token
    steps: int  # forward passes that produced the tokens (transformers: prefill included)
    accepted: int  # tokens those passes committed before EOS/length truncation

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds


@dataclass
class Record:
    """One prompt (a question's turn) and every method's sample on it."""

    question_id: int | str
    category: str
    turn: int  # 1-based
    prompt_tokens: int
    samples: dict[str, Sample] = field(default_factory=dict)


class Method(Protocol):
    name: str

    def run(self, prompt_ids: list[int]) -> Sample:
        """Generate greedily from ``prompt_ids`` (batch 1) and time it."""


def lookup_nodes(model: MedusaModel, config: BenchConfig) -> int:
    """The lookup chain medusa-lookup and lookup run: the one asked for, else the one tuned for this device."""
    if config.lookup is not None:
        return config.lookup
    return (model.tree.lookup if model.heads is not None else 0) or DEFAULT_LOOKUP_NODES


class OurDecoder:
    """Our decoding loop: with heads and the tree, or plainly one token per step on the same cache;
    either with the tree's lookup branch added."""

    def __init__(self, model: MedusaModel, use_heads: bool, config: BenchConfig, with_lookup: bool = False) -> None:
        self.name = {
            (True, False): MEDUSA,
            (False, False): AUTOREGRESSIVE,
            (True, True): MEDUSA_LOOKUP,
            (False, True): LOOKUP,
        }[use_heads, with_lookup]
        if use_heads and model.heads is None:
            raise MedusaError(f"the {self.name} method needs heads, but the model has none")
        self.model = model
        self.generation = GenerationConfig(max_new_tokens=config.max_new_tokens)
        self.options = EngineOptions(
            use_heads=use_heads,
            cuda_graphs=config.cuda_graphs,
            compile=config.compile,
            lookup=lookup_nodes(model, config) if with_lookup else 0,
            cache_length=config.cache_length if isinstance(config.cache_length, int) else None,
        )

    def run(self, prompt_ids: list[int]) -> Sample:
        # The engine ``MedusaModel.generate`` runs, without its incremental detokenisation (transformers'
        # methods return ids too): on a GPU its CUDA-graph steps, exactly as ``generate`` does. The engine
        # syncs the device after prefill and at every step, so its clocks are exact; building the engine
        # (and capturing its graphs the first time) is not timed.
        prompt = torch.tensor(prompt_ids, dtype=torch.long, device=self.model.device)
        generation = self.model.prepare(prompt, self.generation)
        generation.detokenizer = None
        engine = self.model.engine(self.options, max_length=prompt.numel() + self.generation.max_new_tokens)
        for _ in engine.run([generation]):
            pass
        stats = generation.stats
        return Sample(
            token_ids=generation.tokens,
            prefill_seconds=stats.prefill_seconds,
            decode_seconds=stats.decode_seconds,
            steps=stats.steps,
            accepted=sum(stats.accepted_per_step),
        )


class _FirstTokenClock:
    """A transformers streamer that only notes when the first new token arrives (the end of prefill)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_time: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2 and self.first_token_time is None:  # the first put is the prompt
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


class _ForwardCounter:
    """A forward hook counting the base model's forward passes (transformers' decoding steps)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *_) -> None:
        self.calls += 1


class TransformersGenerate:
    """``base_model.generate(do_sample=False)``, eager, optionally with prompt-lookup decoding."""

    def __init__(self, model: MedusaModel, config: BenchConfig, prompt_lookup: bool) -> None:
        self.name = PROMPT_LOOKUP if prompt_lookup else HF_GENERATE
        self.model = model
        base = model.base_model
        eos = sorted(model.eos_token_ids())
        pad = getattr(base.generation_config, "pad_token_id", None)
        if pad is None and model.tokenizer is not None:
            pad = model.tokenizer.pad_token_id
        if pad is None and eos:
            pad = eos[0]
        self.generation = transformers.GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=config.max_new_tokens,
            eos_token_id=eos or None,
            pad_token_id=pad,
            bos_token_id=getattr(base.generation_config, "bos_token_id", None),
            prompt_lookup_num_tokens=config.prompt_lookup_num_tokens if prompt_lookup else None,
        )

    def run(self, prompt_ids: list[int]) -> Sample:
        base = self.model.base_model
        device = self.model.device
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        clock = _FirstTokenClock()
        forwards = _ForwardCounter()
        hook = base.register_forward_hook(forwards)
        try:
            synchronize(device)
            started = time.perf_counter()
            with torch.inference_mode():
                output = base.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=self.generation,
                    streamer=clock,
                )
            synchronize(device)
            finished = time.perf_counter()
        finally:
            hook.remove()
        tokens = output[0, len(prompt_ids) :].tolist()
        first = clock.first_token_time if clock.first_token_time is not None else finished
        return Sample(
            token_ids=tokens,
            prefill_seconds=first - started,
            decode_seconds=finished - first,
            steps=forwards.calls,
            accepted=len(tokens),
        )


def make_methods(model: MedusaModel, config: BenchConfig) -> list[Method]:
    makers: dict[str, Callable[[], Method]] = {
        AUTOREGRESSIVE: lambda: OurDecoder(model, use_heads=False, config=config),
        MEDUSA: lambda: OurDecoder(model, use_heads=True, config=config),
        HF_GENERATE: lambda: TransformersGenerate(model, config, prompt_lookup=False),
        PROMPT_LOOKUP: lambda: TransformersGenerate(model, config, prompt_lookup=True),
        MEDUSA_LOOKUP: lambda: OurDecoder(model, use_heads=True, config=config, with_lookup=True),
        LOOKUP: lambda: OurDecoder(model, use_heads=False, config=config, with_lookup=True),
    }
    return [makers[name]() for name in config.methods]


def _method_plan(questions: Sequence[Question], config: BenchConfig) -> list[tuple[str, ...]]:
    """Per question, the methods that run on it (transformers' only within ``transformers_limit``)."""
    seen: dict[str, int] = {}
    plan = []
    for question in questions:
        index = seen.get(question.category, 0)
        seen[question.category] = index + 1
        within = config.transformers_limit is None or index < config.transformers_limit
        plan.append(tuple(m for m in config.methods if within or m not in TRANSFORMERS_METHODS))
    return plan


def planned_runs(questions: Sequence[Question], config: BenchConfig, done: Sequence[Record] = ()) -> int:
    """How many single generations ``run_benchmark`` will do, warm-up included (for a progress bar)."""
    plan = [
        (q, names) for q, names in zip(questions, _method_plan(questions, config)) if not _finished(q, config, done)
    ]
    if not plan:
        return 0
    warmup = min(config.warmup, len(questions)) * len(config.methods)
    return warmup + sum(_turns_run(q, config) * len(names) for q, names in plan)


def _turns_run(question: Question, config: BenchConfig) -> int:
    return min(config.turns, len(question.turns))


def _finished(question: Question, config: BenchConfig, done: Sequence[Record]) -> list[Record] | None:
    """The records of ``done`` for every turn of ``question`` this run takes, or None if one is missing."""
    turns = {record.turn: record for record in done if record.question_id == question.question_id}
    wanted = range(1, _turns_run(question, config) + 1)
    return [turns[turn] for turn in wanted] if all(turn in turns for turn in wanted) else None


def encode_turn(model: MedusaModel, messages: list[dict]) -> list[int]:
    """Prompt ids through the chat template, or the plain conversation text when there is none."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise MedusaError("the benchmark needs a tokenizer to turn its questions into prompts")
    if getattr(tokenizer, "chat_template", None):
        return model.encode_prompt(messages).tolist()
    return model.encode_prompt(messages_as_text(messages), chat_template=False).tolist()


def resolve_cache_length(model: MedusaModel, questions: Sequence[Question], config: BenchConfig) -> int | None:
    """``config.cache_length`` with "auto" made a number (or None).

    Compiling specialises the step to its cache length, and a compilation takes far longer than a
    generation, so when compiling "auto" sizes one cache for every first turn: the longest first-turn
    prompt, the new tokens, and the largest tree (heads and lookup branch). Second turns that need more
    still get a longer cache, compiled once for it.
    """
    if config.cache_length != "auto":
        return config.cache_length
    if not config.compile:
        return None
    longest = max(len(encode_turn(model, turn_messages(question, 0, []))) for question in questions)
    chain = lookup_nodes(model, config) if {MEDUSA_LOOKUP, LOOKUP} & set(config.methods) else 0
    largest_tree = (model.heads_tree.size if model.heads is not None else 1) + chain
    return longest + config.max_new_tokens + largest_tree


def run_benchmark(
    model: MedusaModel,
    questions: Sequence[Question],
    config: BenchConfig,
    progress: Callable[[str], None] | None = None,
    done: Sequence[Record] = (),
    on_record: Callable[[Record], None] | None = None,
    records: list[Record] | None = None,
) -> list[Record]:
    """Run every method on every chosen prompt, question by question, methods in the given order.

    A second turn's prompt holds the reference method's first answer, the same for every method.
    ``progress`` is called after each generation with a short description. ``done``: records of an
    earlier, stopped run (``medusa.bench.journal``); questions they cover whole are not run again.
    ``on_record`` gets each new record as soon as it is measured. ``records``: the list to fill (the
    caller keeps what was measured if the run is stopped); returned, in question order.
    """
    if not questions:
        raise MedusaError("no questions to run: check --categories and --limit")
    config = replace(config, cache_length=resolve_cache_length(model, questions, config))
    records = [] if records is None else records
    plan = [
        (question, names, _finished(question, config, done))
        for question, names in zip(questions, _method_plan(questions, config))
    ]
    methods = make_methods(model, config) if any(finished is None for _, _, finished in plan) else []
    report = progress or (lambda _: None)
    for question in questions[: config.warmup] if methods else ():
        prompt = encode_turn(model, turn_messages(question, 0, []))
        for method in methods:
            method.run(prompt)
            report(f"warm-up {method.name}")
    for question, names, finished in plan:
        if finished is not None:
            records.extend(finished)
            continue
        answers: list[str] = []
        for turn in range(_turns_run(question, config)):
            prompt = encode_turn(model, turn_messages(question, turn, answers))
            record = Record(question.question_id, question.category, turn + 1, len(prompt))
            for method in methods:
                if method.name in names:
                    record.samples[method.name] = method.run(prompt)
                    report(f"{question.category} #{question.question_id} turn {turn + 1}: {method.name}")
            records.append(record)
            if on_record is not None:
                on_record(record)
            reference = record.samples.get(config.reference) or next(iter(record.samples.values()))
            answers.append(model.tokenizer.decode(reference.token_ids, skip_special_tokens=True))
    return records


def step_settings(model: MedusaModel, cuda_graphs: bool, compile: bool | str) -> dict:
    """What steps ran as, not what was asked: CUDA graphs and compiled steps exist only on a GPU
    (and graphs only for a base model on one device); the CPU always steps eagerly."""
    on_gpu = model.device.type == "cuda"
    return {
        "cuda_graphs": bool(cuda_graphs and on_gpu and not spans_devices(model.base_model)),
        "compile": compile if on_gpu else False,
    }


def describe_run(model: MedusaModel, config: BenchConfig) -> dict:
    """The run's settings for the report's ``meta`` (the caller adds the command and the questions)."""
    heads = model.heads.config if model.heads is not None else None
    return {
        "model": model.name,
        "dtype": str(model.base_model.dtype).removeprefix("torch."),
        "heads": None
        if heads is None
        else {
            "num_heads": heads.num_heads,
            "num_layers": heads.num_layers,
            "share_lm_head": heads.share_lm_head,
            "head_type": heads.head_type,
        },
        "tree_size": model.heads_tree.size if model.heads is not None else 1,
        "max_new_tokens": config.max_new_tokens,
        "turns": config.turns,
        "methods": list(config.methods),
        "warmup_prompts": config.warmup,
        **step_settings(model, config.cuda_graphs, config.compile),
        "cache_length": config.cache_length,
        "prompt_lookup_num_tokens": config.prompt_lookup_num_tokens,
        "lookup_nodes": lookup_nodes(model, config) if {MEDUSA_LOOKUP, LOOKUP} & set(config.methods) else None,
        "lookup_tree_size": (
            model.tree_for(EngineOptions(lookup=lookup_nodes(model, config))).size
            if MEDUSA_LOOKUP in config.methods and model.heads is not None
            else None
        ),
        "transformers_limit_per_category": config.transformers_limit,
        "reference": config.reference,
    }
