"""Self-distillation: the base model answers a prompt pool itself, written as ShareGPT-style JSONL.

Heads trained on the base model's own answers learn the distribution they will be asked to guess
(paper, section 2.3.2). The answers come from our own decoding engine without heads (``MedusaModel``'s
``generate_batch``: continuous batching, CUDA graphs on a GPU), prompts of similar length together. A
sampled answer draws from a seed of its own (``--seed`` and the prompt's id), so it does not depend on which
prompts shared its batch or on a resumed run.

Rows are ``{"id", "conversations", "finish"}``, keyed by a stable prompt id (file name, index and
content). Each batch is appended and flushed at once, so a rerun after a kill reads the ids already
written, cuts a half-written last line, and answers only the rest: nothing is duplicated or lost.
The settings that shape the answers are kept beside the output (``OUTPUT.settings.json``); a rerun
with other ones is refused, naming the setting, rather than appending rows made another way.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from medusa.engine import EngineOptions
from medusa.errors import MedusaError
from medusa.files import append_text, read_json, write_json
from medusa.loading import load_base_model
from medusa.model import GenerationConfig, MedusaModel
from medusa.training.config import DistillConfig
from medusa.training.data import DataPrompt, encode_messages, read_prompts

WINDOW = 8  # batches whose prompts are sorted by length together
# DistillConfig fields that shape the answers: every row of one output must share them.
ANSWER_SETTINGS = ("model", "max_new_tokens", "temperature", "top_p", "seed", "dtype")
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


@dataclass
class DistillPlan:
    pending: list[tuple[DataPrompt, list[int]]]  # prompts still to answer, with their token ids, in answering order
    done: int  # rows already in the output
    total: int  # prompts in the pool (after --limit)
    skipped: list[str] = field(default_factory=list)  # "file:line: why"
    repaired: bool = False  # a half-written last line was cut off


@dataclass
class DistillBatch:
    rows: int
    new_tokens: int
    seconds: float


def read_done_ids(path: Path) -> tuple[set[str], bool]:
    """Ids already in the output, and whether a half-written last line (a kill mid-write) was cut off."""
    if not path.is_file():
        return set(), False
    data = path.read_bytes()
    repaired = False
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with path.open("r+b") as handle:
            handle.truncate(keep)
        data, repaired = data[:keep], True
    done = set()
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            done.add(row["id"])
    return done, repaired


def settings_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".settings.json")


def answer_settings(config: DistillConfig) -> dict:
    settings = {key: getattr(config, key) for key in ANSWER_SETTINGS}
    settings["model"] = str(Path(config.model).resolve()) if config.model else None
    return settings


def check_settings(config: DistillConfig) -> None:
    """Refuse to append to an output whose rows were made with other settings, naming the first that differs."""
    path = settings_path(config.output)
    if not path.is_file():
        return
    recorded = read_json(path, f"the settings of {config.output} (remove the file to continue it unchecked)")
    current = answer_settings(config)
    differing = [key for key in ANSWER_SETTINGS if key in recorded and recorded[key] != current[key]]
    if differing:
        key = differing[0]
        flag = "--" + key.replace("_", "-")
        raise MedusaError(
            f"cannot continue {config.output}: its rows were made with {flag} {recorded[key]!r}, this run has "
            f"{current[key]!r}"
            + (f" (also differing: {', '.join(differing[1:])})" if differing[1:] else "")
            + "; use the same settings, or another --output"
        )


def sample_prompts(prompts: list[DataPrompt], limit: int | None, seed: int) -> list[DataPrompt]:
    """A stable sample of ``limit`` prompts across all files: the same ones on every rerun."""
    if limit is None or limit >= len(prompts):
        return prompts
    rank = {p.id: hashlib.sha256(f"{seed}:{p.id}".encode()).hexdigest() for p in prompts}
    chosen = set(sorted(rank, key=rank.get)[:limit])
    return [p for p in prompts if p.id in chosen]


def plan(config: DistillConfig, tokenizer: PreTrainedTokenizerBase) -> DistillPlan:
    """Read the prompt pool and the output written so far; what is left to answer, longest prompt first.
    An output made with other answer settings is refused (``check_settings``)."""
    check_settings(config)
    read = read_prompts(config.data)
    pool = sample_prompts(read.items, config.limit, config.seed)
    seen: set[str] = set()
    unique = []
    for prompt in pool:  # the same prompt twice in one file keeps one row
        if prompt.id not in seen:
            seen.add(prompt.id)
            unique.append(prompt)
    done, repaired = read_done_ids(Path(config.output))
    skipped = list(read.skipped)
    pending = []
    for prompt in unique:
        if prompt.id in done:
            continue
        ids = encode_messages(tokenizer, prompt.messages)
        if len(ids) > config.max_prompt_tokens:
            skipped.append(
                f"{prompt.where}: prompt has {len(ids)} tokens, more than --max-prompt-tokens "
                f"{config.max_prompt_tokens}"
            )
            continue
        pending.append((prompt, ids))
    # A random but stable order (ids are hashes), so rows written before a kill are a fair sample of the
    # pool; sorted by length within windows of WINDOW batches, so a batch wastes little on padding and the
    # longest prompts of a window go first (a batch too large fails early).
    pending.sort(key=lambda item: item[0].id)
    window = WINDOW * config.batch_size
    pending = [
        item
        for start in range(0, len(pending), window)
        for item in sorted(pending[start : start + window], key=lambda item: -len(item[1]))
    ]
    return DistillPlan(pending, done=len(done & seen), total=len(unique), skipped=skipped, repaired=repaired)


def _row(prompt: DataPrompt, answer: str, finish: str) -> dict:
    turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in prompt.messages]
    turns.append({"from": "gpt", "value": answer})
    return {"id": prompt.id, "conversations": turns, "finish": finish}


def row_seed(seed: int, prompt_id: str) -> int:
    """A sampled answer's own seed, from the run's ``--seed`` and the prompt's id."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:8], "big") >> 1


def answer_batch(
    model: MedusaModel, batch: list[tuple[DataPrompt, list[int]]], config: DistillConfig
) -> tuple[list[list[int]], list[bool]]:
    """Each prompt's answer token ids (EOS cut off), and whether it stopped at EOS."""
    configs = [
        GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=row_seed(config.seed, prompt.id),
            chat_template=False,  # the ids are the rendered conversation already
        )
        for prompt, _ in batch
    ]
    results = model.generate_batch([ids for _, ids in batch], configs, options=EngineOptions(use_heads=False))
    eos = model.eos_token_ids()
    answers, stopped = [], []
    for result in results:
        ended = bool(result.token_ids) and result.token_ids[-1] in eos
        answers.append(result.token_ids[:-1] if ended else result.token_ids)
        stopped.append(ended)
    return answers, stopped


def distill(
    config: DistillConfig,
    work: DistillPlan,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
) -> Iterator[DistillBatch]:
    """Answer ``work.pending`` batch by batch, appending each batch to the output before yielding it."""
    decoder = MedusaModel(model, tokenizer, None)
    if not decoder.eos_token_ids():
        raise MedusaError("the model has no end-of-sequence token; distillation would never stop early")
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    check_settings(config)
    settings = settings_path(output)
    if not settings.is_file():
        write_json(settings, answer_settings(config), indent=1)
    for start in range(0, len(work.pending), config.batch_size):
        batch = work.pending[start : start + config.batch_size]
        started = time.perf_counter()
        answers, stopped = answer_batch(decoder, batch, config)
        seconds = time.perf_counter() - started
        lines = []
        for (prompt, _), tokens, stop in zip(batch, answers, stopped):
            answer = tokenizer.decode(tokens, skip_special_tokens=True)
            lines.append(json.dumps(_row(prompt, answer, "stop" if stop else "length"), ensure_ascii=False) + "\n")
        append_text(output, "".join(lines))
        yield DistillBatch(
            rows=len(batch), new_tokens=sum(len(t) + s for t, s in zip(answers, stopped)), seconds=seconds
        )


def load_for_distill(config: DistillConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    model, tokenizer, name = load_base_model(config.model, dtype=config.dtype, device=config.device)
    if tokenizer is None:
        raise MedusaError("distillation needs the model's tokenizer")
    return model, tokenizer, name
