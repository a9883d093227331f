"""Context-grounded prompts made from a pool's own texts: summarise, answer from documents, list, rewrite.

A pool of short questions (GSM8K, code and role-play instructions) teaches the heads to guess free
answers, but much real use (summarising, retrieval-augmented answers, extraction) copies from a long
prompt, and heads that never saw such prompts guess badly there. The pool's reference answers are
ready-made documents: wrapping them in a few task templates gives long, copy-heavy prompts for
self-distillation without taking any text from an evaluation set. Only the prompts are used; the
base model writes the answers (``medusa distill``).

Topic prompts (``ask``, ``instruct``, ``article``) need no pool: templates over a list of everyday
subjects (``medusa/assets/topics.txt``) give questions, writing tasks and articles on far broader ground
than a pool of math, code and role-play prompts. The base model was tried as the writer of such prompts
and failed (asked for a question, it offers to answer one), so templates write them. Distilled answers
to topic prompts then serve as documents for the document tasks in a second round.

The output is deterministic for a seed, so a rerun of the pipeline makes the same prompts and
distillation resumes on them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medusa.errors import MedusaError
from medusa.training.data import RecordError, read_records, record_messages

SUMMARISE = (
    "Summarize the following text in a few sentences.",
    "Write a short summary of this text.",
    "Give a concise summary of the passage below.",
    "Summarize the key ideas of the following text in one paragraph.",
)
KEY_POINTS = (
    "List the main points of the following text as bullet points.",
    "Extract the key facts from the text below as a numbered list.",
    "What are the most important details in this text? List them.",
)
REWRITE = (
    "Rewrite the following text in simpler words.",
    "Paraphrase the following text, keeping its meaning.",
    "Rewrite this text in a more formal tone.",
)
CONTEXT_QA = (
    "Answer the question using the documents below.",
    "Use the following passages to answer the question at the end.",
    "Read the documents and answer the question. Base your answer on the documents.",
)
TASKS = ("summarize", "key-points", "rewrite", "context-qa")  # over a pool's documents

# Topic prompts: {topic} is a subject, {other} a second one.
ASK = (
    "What is {topic}?",
    "How does {topic} work?",
    "Why is {topic} important?",
    "Can you explain {topic} in simple terms?",
    "What is the history of {topic}?",
    "What are common misconceptions about {topic}?",
    "How has {topic} changed over the last hundred years?",
    "What are the advantages and disadvantages of {topic}?",
    "Who are some of the most important people connected with {topic}?",
    "I want to learn about {topic}. Where should a beginner start?",
    "What is the difference between {topic} and {other}?",
    "Give me three interesting facts about {topic}.",
    "What questions about {topic} are still open today?",
    "How would you describe {topic} to someone who has never heard of it?",
)
INSTRUCT = (
    "Write a short poem about {topic}.",
    "Write a persuasive paragraph arguing that {topic} deserves more attention.",
    "Write an email to a friend telling them about {topic}.",
    "Write a short story in which {topic} plays a central role.",
    "Pretend you are a teacher and explain {topic} to a class of ten-year-olds.",
    "Write the introduction of a blog post about {topic}.",
    "Describe {topic} as if you were a tour guide.",
    "Write a dialogue between two people discussing {topic}.",
    "Give five tips for someone who wants to get started with {topic}.",
    "Write a product description for a book about {topic}.",
    "Summarize the main debates around {topic} in a balanced way.",
    "Create a short quiz with three questions about {topic}, with the answers.",
    "Write a short speech for a school event about {topic}.",
    "Explain how {topic} and {other} are related, if at all.",
)
ARTICLE = (
    "Write a short news article about {topic}.",
    "Write an encyclopedia-style entry about {topic}.",
    "Write a report on recent developments in {topic}.",
    "Write an informative essay about {topic}.",
    "Write a magazine feature about {topic}.",
)
TOPIC_TEMPLATES = {"ask": ASK, "instruct": INSTRUCT, "article": ARTICLE}
ALL_TASKS = TASKS + tuple(TOPIC_TEMPLATES)

_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations
_FINAL = re.compile(r"\n?#### *(.+)\s*$")  # GSM8K's final-answer line


@dataclass(frozen=True)
class Source:
    """One pool record: its question and its reference answer, the answer serving as a document."""

    question: str
    document: str
    where: str


def default_topics_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "topics.txt"


def read_topics(path: str | Path) -> list[str]:
    """One subject per line; blank lines and ``#`` comments are skipped, repeats kept once."""
    path = Path(path)
    if not path.is_file():
        raise MedusaError(f"topics file {path} does not exist")
    topics = []
    for line in path.read_text(encoding="utf-8").splitlines():
        topic = line.strip()
        if topic and not topic.startswith("#") and topic not in topics:
            topics.append(topic)
    if len(topics) < 2:
        raise MedusaError(f"topics file {path} holds {len(topics)} topic(s); topic prompts need at least 2")
    return topics


@dataclass
class PromptTaskConfig:
    data: list[str]
    count: int
    tasks: tuple[str, ...] = TASKS
    topics: str | None = None  # topic tasks: a file of subjects, one per line (default: the packaged list)
    documents_per_question: int = 3  # context-qa: the right document among this many
    min_document_chars: int = 200  # shorter answers make poor documents
    max_prompt_chars: int = 4000  # about 1000 tokens for English text
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [task for task in self.tasks if task not in ALL_TASKS]
        if unknown:
            raise MedusaError(f"unknown prompt task(s) {', '.join(unknown)}; choose from {', '.join(ALL_TASKS)}")
        if not self.tasks:
            raise MedusaError("no prompt tasks given")
        repeated = sorted({task for task in self.tasks if self.tasks.count(task) > 1})
        if repeated:
            raise MedusaError(f"prompt task(s) {', '.join(repeated)} given more than once")
        if not self.data and any(task in TASKS for task in self.tasks):
            raise MedusaError(
                f"tasks {', '.join(t for t in self.tasks if t in TASKS)} need --data (a pool with answers)"
            )
        if self.count < 1:
            raise MedusaError(f"--count must be at least 1, got {self.count}")
        if self.max_prompt_chars < 400:
            raise MedusaError(
                f"--max-prompt-chars must be at least 400 (an instruction and some text), got {self.max_prompt_chars}"
            )
        if self.documents_per_question < 1:
            raise MedusaError(f"documents per question must be at least 1, got {self.documents_per_question}")


@dataclass
class PromptTaskResult:
    prompts: list[dict] = field(default_factory=list)  # {"prompt", "task"}
    sources: int = 0  # records usable as documents
    short: int = 0  # document prompts cut short: the pool held too few documents for the length drawn
    skipped: list[str] = field(default_factory=list)  # "file:line: why"


def clean_document(text: str) -> str:
    """Drop dataset markup a reader would not see (GSM8K's ``<<a*b=c>>`` and ``#### n`` lines)."""
    text = _CALCULATOR.sub("", text)
    text = _FINAL.sub(lambda match: f"\nThe answer is {match.group(1).strip()}.", text)
    return text.strip()


def read_sources(paths: Sequence[str | Path], min_document_chars: int) -> tuple[list[Source], list[str]]:
    """Records that have both a question and an answer long enough to be a document."""
    skipped: list[str] = []
    sources = []
    seen: set[str] = set()
    for record in read_records(paths, skipped):
        try:
            messages = record_messages(record.value)
        except RecordError as error:
            skipped.append(f"{record.where}: {error}")
            continue
        question = next((m["content"] for m in messages if m["role"] == "user"), "")
        answer = next((m["content"] for m in messages if m["role"] == "assistant"), "")
        document = clean_document(answer)
        if not question.strip() or len(document) < min_document_chars or document in seen:
            continue  # not an error: a short answer is simply no document, and one text is one document
        seen.add(document)
        sources.append(Source(question.strip(), document, record.where))
    return sources, skipped


def _document_prompt(
    rng: random.Random, sources: list[Source], instructions: Sequence[str], limit: int
) -> tuple[str, bool]:
    """An instruction over distinct documents joined up to a random length (real contexts run to many
    paragraphs); and whether the pool ran out of documents before that length."""
    instruction = rng.choice(instructions)
    room = limit - len(instruction) - 2
    target = rng.randint(min(800, room), room)
    parts: list[str] = []
    used: set[int] = set()
    length = 0
    while length < target and len(used) < len(sources):
        index = rng.randrange(len(sources))
        if index in used:  # one document at most once per prompt
            continue
        used.add(index)
        parts.append(sources[index].document)
        length += len(parts[-1]) + 2
    context = "\n\n".join(parts)[:room]
    return f"{instruction}\n\n{context}", length < target


def _context_qa_prompt(rng: random.Random, sources: list[Source], documents: int, limit: int) -> str:
    """A question with its own answer as one document among others (the retrieval-augmented shape)."""
    picked = rng.sample(sources, min(documents, len(sources)))
    question = picked[0].question
    rng.shuffle(picked)
    instruction = rng.choice(CONTEXT_QA)
    room = max(200, (limit - len(instruction) - len(question) - 40) // len(picked))
    body = "\n\n".join(
        f"Document [{number}]: {source.document[:room]}" for number, source in enumerate(picked, start=1)
    )
    return f"{instruction}\n\n{body}\n\nQuestion: {question}"


def topic_prompts(task: str, topics: list[str], count: int, rng: random.Random) -> list[str]:
    """``count`` distinct prompts of a topic task: every template and subject pairing, in a seeded order."""
    pairs = [(template, topic) for template in TOPIC_TEMPLATES[task] for topic in topics]
    if count > len(pairs):
        raise MedusaError(
            f"{count} '{task}' prompts asked for, but {len(TOPIC_TEMPLATES[task])} templates x {len(topics)} topics "
            f"make only {len(pairs)} distinct ones; lower --count or give more --topics"
        )
    rng.shuffle(pairs)
    prompts = []
    for template, topic in pairs[:count]:
        other = rng.choice([t for t in topics if t != topic]) if "{other}" in template else ""
        text = template.format(topic=topic, other=other)
        prompts.append(text[0].upper() + text[1:])
    return prompts


def make_prompts(config: PromptTaskConfig) -> PromptTaskResult:
    """``config.count`` prompts, the tasks taking turns: document tasks from the pool, topic tasks from templates."""
    rng = random.Random(config.seed)
    result = PromptTaskResult()
    sources: list[Source] = []
    if any(task in TASKS for task in config.tasks):
        sources, result.skipped = read_sources(config.data, config.min_document_chars)
        result.sources = len(sources)
        if len(sources) < config.documents_per_question:
            raise MedusaError(
                f"{', '.join(map(str, config.data))}: {len(sources)} records have an answer of at least "
                f"{config.min_document_chars} characters; context prompts need at least {config.documents_per_question}"
            )
    per_task = {task: len(range(number, config.count, len(config.tasks))) for number, task in enumerate(config.tasks)}
    topical = {}
    if any(task in TOPIC_TEMPLATES for task in config.tasks):
        topics = read_topics(config.topics or default_topics_path())
        topical = {
            task: iter(topic_prompts(task, topics, per_task[task], rng))
            for task in config.tasks
            if task in TOPIC_TEMPLATES
        }
    templates = {"summarize": SUMMARISE, "key-points": KEY_POINTS, "rewrite": REWRITE}
    for number in range(config.count):
        task = config.tasks[number % len(config.tasks)]
        if task in topical:
            text = next(topical[task])
        elif task == "context-qa":
            text = _context_qa_prompt(rng, sources, config.documents_per_question, config.max_prompt_chars)
        else:
            text, short = _document_prompt(rng, sources, templates[task], config.max_prompt_chars)
            result.short += short
        result.prompts.append({"prompt": text, "task": task})
    return result
