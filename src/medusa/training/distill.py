"""Self-distillation: the base model answers a prompt pool itself, written as ShareGPT-style JSONL.

Heads trained on the base model's own answers learn the distribution they will be asked to guess
(paper, section 2.3.2). Generation is batched with left padding through transformers' ``generate``,
prompts of similar length together so a batch wastes little on padding.

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

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from medusa.errors import MedusaError
from medusa.files import append_text, read_json, write_json
from medusa.loading import load_base_model
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


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        raise MedusaError("the model has no end-of-sequence token; distillation would never stop early")
    return [configured] if isinstance(configured, int) else list(configured)


def _row(prompt: DataPrompt, answer: str, finish: str) -> dict:
    turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in prompt.messages]
    turns.append({"from": "gpt", "value": answer})
    return {"id": prompt.id, "conversations": turns, "finish": finish}


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    config: DistillConfig,
    eos_ids: list[int],
    pad_id: int,
) -> tuple[list[list[int]], list[bool]]:
    """Answer token ids per prompt (EOS cut off) and whether each stopped at EOS; prompts left-padded."""
    device = next(model.parameters()).device
    longest = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, longest - len(ids) :] = torch.tensor(ids)
        attention_mask[row, longest - len(ids) :] = 1
    sampling = (
        {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p, "top_k": 0}
        if config.temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=config.max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            **sampling,
        )
    answers, stopped = [], []
    eos = set(eos_ids)
    for tokens in output[:, longest:].tolist():
        end = next((i for i, token in enumerate(tokens) if token in eos), None)
        answers.append(tokens[:end] if end is not None else tokens)
        stopped.append(end is not None)
    return answers, stopped


def distill(
    config: DistillConfig,
    work: DistillPlan,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
) -> Iterator[DistillBatch]:
    """Answer ``work.pending`` batch by batch, appending each batch to the output before yielding it."""
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    check_settings(config)
    settings = settings_path(output)
    if not settings.is_file():
        write_json(settings, answer_settings(config), indent=1)
    for number, start in enumerate(range(0, len(work.pending), config.batch_size)):
        batch = work.pending[start : start + config.batch_size]
        torch.manual_seed(config.seed + number)
        started = time.perf_counter()
        answers, stopped = generate_batch(model, tokenizer, [ids for _, ids in batch], config, eos_ids, pad_id)
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
