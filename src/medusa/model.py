"""``MedusaModel``: a base causal LM, its Medusa heads, a tree, and text in / text out around the loop."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from medusa.acceptance import DEFAULT_TYPICAL_DELTA, DEFAULT_TYPICAL_EPS, AcceptanceScheme, make_acceptance
from medusa.batching import BatchDecoder, BatchRunner, BatchSequence
from medusa.decoding import ATTENTION_SPAN_STEP, DecodingStats, MedusaDecoder, decode, model_device, spans_devices
from medusa.errors import MedusaError
from medusa.graphs import DecoderPool, GraphedStep
from medusa.heads import MedusaHeads, MedusaHeadsConfig
from medusa.loading import load_base_model, resolve_device, resolve_dtype
from medusa.lookup import DEFAULT_MAX_NGRAM, check_lookup
from medusa.paths import DEFAULT_MODEL_NAME, shipped_heads_directory
from medusa.sampling import SamplingParams, check_seed
from medusa.tree import Tree, TreeSpec, load_tree
from medusa.treeopt.tuned import TreeChoice, choose_tree

TREE_FILE = "tree.json"

Prompt = str | Sequence[dict] | Sequence[int] | torch.Tensor


def check_slots(name: str, value: object) -> None:
    """Refuse a cache-slot setting that is neither None nor a positive integer (bools are not counts)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise MedusaError(f"{name} must be a positive number of slots or None, got {value!r}")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    # False decodes plainly, one token per step, on the same cache: the honest baseline.
    use_heads: bool = True
    # "auto": greedy at temperature 0, lossless rejection sampling above; or "greedy", "typical", "rejection".
    acceptance: str = "auto"
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None  # None: a fresh random seed per generation
    typical_eps: float = DEFAULT_TYPICAL_EPS
    typical_delta: float = DEFAULT_TYPICAL_DELTA
    chat_template: bool = True
    # Replay each step as a CUDA graph on GPUs (falls back to eager, with one warning, if capture fails).
    cuda_graphs: bool = True
    # Also fuse the step's kernels with torch.compile before capture (slow first call, faster steps).
    compile: bool | str = False  # True, or "max-autotune" to also tune the matrix kernels
    # A lookup branch of this many nodes in the tree: guesses copied from where the text's last tokens
    # occurred before (medusa.lookup). Without heads it is prompt-lookup decoding on our fast path.
    # None: the model's own tree as it is, with the lookup chain `medusa tree tune` chose for this device
    # if it chose one (never with use_heads=False: that is the plain baseline).
    lookup: int | None = None
    lookup_ngram: int = DEFAULT_MAX_NGRAM  # the longest suffix searched for
    # Allocate at least this many cache slots, so that one decoder (one CUDA graph, one compiled step)
    # serves every prompt that fits; longer ones still get a longer cache. None: just what the prompt needs.
    cache_length: int | None = None
    # Uncompiled steps attend over the cache's first multiple of this many slots that holds the tree
    # (one CUDA graph per span), not over every preallocated slot. None: always every slot.
    attention_span_step: int | None = ATTENTION_SPAN_STEP

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise MedusaError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise MedusaError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        check_seed(self.seed)
        check_lookup(0 if self.lookup is None else self.lookup, self.lookup_ngram)
        check_slots("cache_length", self.cache_length)
        check_slots("attention_span_step", self.attention_span_step)
        self.acceptance_scheme()  # refuses bad sampling settings now, not at the first step

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def acceptance_scheme(self) -> AcceptanceScheme:
        return make_acceptance(self.acceptance, self.sampling(), self.typical_eps, self.typical_delta)


@dataclass
class GenerationChunk:
    text: str  # new text since the last chunk
    token_ids: list[int]
    accepted: int  # tokens this step committed (1 + accepted guesses)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: DecodingStats = field(default_factory=DecodingStats)

    @property
    def mean_accepted(self) -> float:
        return self.stats.mean_accepted

    @property
    def tokens_per_second(self) -> float:
        return self.stats.tokens_per_second


class MedusaModel(nn.Module):
    def __init__(
        self,
        base_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        heads: MedusaHeads | None,
        tree: TreeSpec = None,
        name: str | None = None,
        plain_tree: Tree | None = None,
    ) -> None:
        """``tree`` decodes one sequence by default and may carry a lookup chain; ``plain_tree`` (default:
        ``tree`` without its chain) serves batches and ``lookup=0``."""
        super().__init__()
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.name = name or getattr(base_model.config, "_name_or_path", "") or "model"
        if heads is not None:
            check_heads_match(heads.config, base_model)
            device, dtype = heads_device(base_model), base_model.dtype
            heads = heads.to(device=device, dtype=dtype)
            heads.attach_lm_head(base_model.get_output_embeddings())
            heads.eval()
        self.heads = heads
        self._decoder_pool = DecoderPool()
        self.tree = load_tree(tree, heads.config.num_heads) if heads is not None else Tree.from_paths([])
        if plain_tree is not None and heads is not None:
            self.plain_tree = load_tree(plain_tree, heads.config.num_heads).with_lookup(0)
        else:
            self.plain_tree = self.tree.with_lookup(0)
        # Where the tree came from when loading chose it (from_pretrained without a tree); None: given.
        self.tree_choice: TreeChoice | None = None

    # ----- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path | PreTrainedModel | None = None,
        heads: str | Path | MedusaHeads | MedusaHeadsConfig | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        num_heads: int = 4,
        num_layers: int = 1,
        share_lm_head: bool = False,
        tree: TreeSpec = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict | None = None,
    ) -> "MedusaModel":
        """Wrap a base model (directory, ``.gguf`` file, model object, or None for the default model).

        ``heads`` is a heads directory, a ``MedusaHeads``, a config for fresh heads, or None: the heads
        shipped for the default model when there are some, otherwise fresh (untrained) heads.
        ``device_map`` (``"auto"``, or accelerate's dict) splits a base model too big for one GPU over
        several; a model object passed in may come split already. Either way the heads go with the lm_head.
        """
        if isinstance(base, PreTrainedModel):
            if device_map is not None:
                raise MedusaError("device_map applies when loading a model from a path; place a model object yourself")
            base_model, name = base, getattr(base.config, "_name_or_path", None)
            if device is not None or dtype is not None:  # asked for, so honoured: the model moves (in place)
                target_device = resolve_device(device) if device is not None else None
                target_dtype = resolve_dtype(dtype, target_device or model_device(base_model)) if dtype is not None else None
                base_model.to(device=target_device, dtype=target_dtype)
        else:
            base_model, loaded_tokenizer, name = load_base_model(base, dtype=dtype, device=device, device_map=device_map)
            tokenizer = tokenizer or loaded_tokenizer
        text_config = base_model.config.get_text_config()
        lm_head = base_model.get_output_embeddings()
        if heads is None and base is None and shipped_heads_directory(DEFAULT_MODEL_NAME) is not None:
            heads = shipped_heads_directory(DEFAULT_MODEL_NAME)
        if heads is None:
            heads = MedusaHeadsConfig(
                hidden_size=text_config.hidden_size,
                vocab_size=lm_head.weight.shape[0],
                num_heads=num_heads,
                num_layers=num_layers,
                share_lm_head=share_lm_head,
                base_model=name,
            )
        if isinstance(heads, MedusaHeadsConfig):
            check_heads_match(heads, base_model)
            heads = MedusaHeads(heads, base_lm_head=lm_head)
        plain_tree = choice = None
        if isinstance(heads, (str, Path)):
            directory = Path(heads)
            heads_config = MedusaHeadsConfig.load(directory)
            check_heads_match(heads_config, base_model)
            if tree is None:  # the tree tuned for this device, else one chosen for its kind (medusa.treeopt.tuned)
                choice = choose_tree(directory, model_device(base_model), heads_config.num_heads)
                tree, plain_tree = choice.tree, choice.plain_tree
            heads = MedusaHeads.from_pretrained(directory, base_lm_head=lm_head)
        model = cls(base_model, tokenizer, heads, tree=tree, name=name, plain_tree=plain_tree)
        if choice is not None:
            model.tree_choice = choice
        return model

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the heads (config and safetensors) and the tree; the base model is referenced, not copied."""
        if self.heads is None:
            raise MedusaError("this model has no heads to save")
        directory = Path(directory)
        self.heads.save_pretrained(directory)
        (directory / TREE_FILE).write_text(self.plain_tree.to_json() + "\n")

    # ----- generation ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return model_device(self.base_model)

    @property
    def context_length(self) -> int | None:
        return getattr(self.base_model.config.get_text_config(), "max_position_embeddings", None)

    def eos_token_ids(self) -> set[int]:
        configured = getattr(self.base_model.generation_config, "eos_token_id", None)
        if configured is None and self.tokenizer is not None:
            configured = self.tokenizer.eos_token_id
        if configured is None:
            return set()
        return {configured} if isinstance(configured, int) else set(configured)

    def encode_prompt(self, prompt: Prompt, chat_template: bool = True) -> torch.Tensor:
        """Token ids ``[prompt_len]``; text and message lists go through the chat template when there is one."""
        if isinstance(prompt, torch.Tensor):
            ids = prompt.flatten().tolist()
        elif isinstance(prompt, str):
            if not prompt.strip():
                raise MedusaError("the prompt is empty")
            tokenizer = self._require_tokenizer()
            if chat_template and getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                )
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
            tokenizer = self._require_tokenizer()
            if not getattr(tokenizer, "chat_template", None):
                raise MedusaError("messages were given, but the tokenizer has no chat template")
            text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise MedusaError(f"a prompt is text, a list of chat messages or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise MedusaError("the prompt is empty")
        vocab = self.base_model.get_input_embeddings().weight.shape[0]
        if min(ids) < 0 or max(ids) >= vocab:
            raise MedusaError(f"prompt token ids must lie in [0, {vocab}), got {min(ids)}..{max(ids)}")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise MedusaError("this model has no tokenizer: pass token ids, or a tokenizer to from_pretrained")
        return self.tokenizer

    def _check_lengths(self, prompt_len: int, max_new_tokens: int) -> None:
        context = self.context_length
        if context is None:
            return
        if prompt_len >= context:
            raise MedusaError(f"the prompt has {prompt_len} tokens; the model's context is {context} tokens")
        if prompt_len + max_new_tokens > context:
            raise MedusaError(
                f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"context of {context} tokens; lower max_new_tokens to at most {context - prompt_len}"
            )

    def make_decoder(
        self, prompt_ids: torch.Tensor, config: GenerationConfig, tree: Tree | None = None
    ) -> tuple[MedusaDecoder, GraphedStep | None]:
        """A decoder for this prompt, and its CUDA-graph step when on a GPU (None: step eagerly).

        On the CPU every generation gets a fresh decoder of the exact length; on a GPU decoders and
        their captured steps are pooled and reused across generations.
        """
        heads, tree = self._heads_and_tree(config, tree)
        needed = max(prompt_ids.numel() + config.max_new_tokens + tree.size, config.cache_length or 0)
        acceptance = config.acceptance_scheme()

        # A compiled step is specialised to its shapes, and compiling takes minutes: one attention span only.
        span_step = None if config.compile else config.attention_span_step

        def build(max_length: int) -> MedusaDecoder:
            # Compiled steps keep per-layer buffers: one store aliased by every layer's views is untested under inductor.
            return MedusaDecoder(self.base_model, heads, tree, acceptance, max_length, config.lookup_ngram, span_step,
                                 one_store=not config.compile)

        if self.device.type != "cuda":
            return build(needed), None
        # Schemes hash by their settings, not the seed.
        key = (tree.paths, tree.lookup, config.lookup_ngram, heads is not None, acceptance, span_step)
        return self._decoder_pool.acquire(
            key,
            build,
            needed,
            prompt_ids,
            # One CUDA graph cannot span the devices of a split base model.
            use_graphs=config.cuda_graphs and not spans_devices(self.base_model),
            compile_step=config.compile,
        )

    def tree_for(self, config: GenerationConfig) -> Tree:
        """The tree a generation with these settings runs, lookup chain included (the root alone without heads)."""
        return self._heads_and_tree(config, None)[1]

    def _heads_and_tree(self, config: GenerationConfig, tree: Tree | None) -> tuple[MedusaHeads | None, Tree]:
        """The heads and tree a generation runs: no heads when the tree has no head paths (a tuned
        tree may be the root alone), so they are not run for nothing; the config's lookup branch set.

        ``lookup=None`` keeps the tree's own chain (the tuned one, for the model's tree); ``lookup=0`` on
        the model's tree takes the tree tuned without a chain.
        """
        heads = self.heads if config.use_heads else None
        if heads is None:
            return None, Tree.from_paths([]).with_lookup(config.lookup or 0)
        if tree is None:
            tree = self.plain_tree if config.lookup == 0 else self.tree
        if not tree.paths:
            heads = None
        return heads, tree if config.lookup is None else tree.with_lookup(config.lookup)

    def stream(
        self,
        prompt: Prompt,
        config: GenerationConfig | None = None,
        stats: DecodingStats | None = None,
        tree: Tree | str | Sequence[Sequence[int]] | None = None,
        **overrides,
    ) -> Iterator[GenerationChunk]:
        """Yield text as it is produced. ``stats`` (if given) is filled in as decoding goes."""
        config = config or GenerationConfig(**overrides)
        stats = stats if stats is not None else DecodingStats()
        prompt_ids = self.encode_prompt(prompt, config.chat_template)
        self._check_lengths(prompt_ids.numel(), config.max_new_tokens)
        if tree is not None and self.heads is not None:
            tree = load_tree(tree, self.heads.config.num_heads)
        decoder, graphed_step = self.make_decoder(prompt_ids, config, tree)
        text_tracker = TextTracker(self.tokenizer, config.stop)
        steps = decode(
            decoder, prompt_ids, config.max_new_tokens, self.eos_token_ids(), stats, step=graphed_step, seed=config.seed
        )
        for step in steps:
            text, keep, stopped = text_tracker.add(step.tokens)
            if stopped:
                stats.finish_reason = "stop"
            yield GenerationChunk(text=text, token_ids=step.tokens[:keep], accepted=step.accepted)
            if stopped:
                break
        tail = text_tracker.flush()
        if tail:
            yield GenerationChunk(text=tail, token_ids=[], accepted=0)

    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        config: GenerationConfig | None = None,
        tree: Tree | str | Sequence[Sequence[int]] | None = None,
        **overrides,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate a whole answer. Keyword overrides fill a ``GenerationConfig`` (max_new_tokens, stop, ...).

        A list of prompts (texts, token-id lists, message lists or tensors) is decoded as one batch
        (``generate_batch``) and gives a list of results, in order.
        """
        if is_prompt_batch(prompt):
            return self.generate_batch(prompt, config, tree=tree, **overrides)
        stats = DecodingStats()
        texts: list[str] = []
        tokens: list[int] = []
        for chunk in self.stream(prompt, config, stats=stats, tree=tree, **overrides):
            texts.append(chunk.text)
            tokens.extend(chunk.token_ids)
        return GenerationResult(text="".join(texts), token_ids=tokens, finish_reason=stats.finish_reason, stats=stats)

    def batch_decoder(self, config: GenerationConfig, tree: Tree | None = None) -> BatchDecoder:
        """A ``BatchDecoder`` for these settings; it refuses sampling (batches are greedy only) and a lookup branch
        asked for (``lookup=None`` runs the tree tuned without one)."""
        if tree is None and config.lookup is None:
            tree = self.plain_tree
        heads, tree = self._heads_and_tree(config, tree)
        return BatchDecoder(self.base_model, heads, tree, config.acceptance_scheme())

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        config: GenerationConfig | None = None,
        tree: Tree | str | Sequence[Sequence[int]] | None = None,
        **overrides,
    ) -> list[GenerationResult]:
        """Decode several prompts together, greedy: one forward pass per step verifies every sequence's tree.

        Each sequence accepts its own number of tokens per step and stops at its own EOS, stop string or
        ``max_new_tokens``; its answer is exactly the one ``generate`` gives it alone. See docs/batching.md.
        """
        config = config or GenerationConfig(**overrides)
        if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence):
            raise MedusaError(f"generate_batch takes a list of prompts, got {type(prompts).__name__}")
        if not prompts:
            raise MedusaError("no prompts to generate from: the list of prompts is empty")
        if not config.sampling().greedy:
            raise MedusaError(
                f"batched generation is greedy only (temperature 0), got temperature {config.temperature}; "
                "generate sampled answers one prompt at a time"
            )
        encoded = []
        for index, prompt in enumerate(prompts):
            try:
                ids = self.encode_prompt(prompt, config.chat_template)
                self._check_lengths(ids.numel(), config.max_new_tokens)
            except MedusaError as error:
                raise MedusaError(f"prompt {index}: {error}") from None
            encoded.append(ids)
        if tree is not None and self.heads is not None:
            tree = load_tree(tree, self.heads.config.num_heads)
        runner = BatchRunner(self.batch_decoder(config, tree))
        eos = frozenset(self.eos_token_ids())
        sequences = [BatchSequence(ids, config.max_new_tokens, eos) for ids in encoded]
        trackers = {id(s): TextTracker(self.tokenizer, config.stop) for s in sequences}
        kept: dict[int, list[int]] = {id(s): [] for s in sequences}
        texts: dict[int, list[str]] = {id(s): [] for s in sequences}
        runner.add(sequences)
        while runner.active:
            stopped = []
            for sequence, output in runner.step():
                text, keep, stop = trackers[id(sequence)].add(output.tokens)
                texts[id(sequence)].append(text)
                kept[id(sequence)].extend(output.tokens[:keep])
                if stop:
                    sequence.stats.finish_reason = "stop"
                    stopped.append(sequence)
            runner.finish(stopped)
        results = []
        for sequence in sequences:
            text = "".join(texts[id(sequence)]) + trackers[id(sequence)].flush()
            tokens = kept[id(sequence)]
            results.append(GenerationResult(text, tokens, sequence.stats.finish_reason, sequence.stats))
        return results


def is_prompt_batch(prompt: object) -> bool:
    """A list whose items are prompts themselves (texts, lists, tensors), not token ids or chat messages."""
    if isinstance(prompt, (str, torch.Tensor)) or not isinstance(prompt, Sequence) or not prompt:
        return False
    return all(isinstance(item, (str, torch.Tensor)) or (isinstance(item, Sequence) and not isinstance(item, dict))
               for item in prompt)


class TextTracker:
    """Incremental detokenisation with stop strings: emits only text that can no longer change or stop."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.emitted = 0
        self.text = ""

    def add(self, tokens: list[int]) -> tuple[str, int, bool]:
        """Add a step's tokens; return ``(new text, how many of the tokens to keep, stopped)``."""
        if self.tokenizer is None:
            self.tokens.extend(tokens)
            return "", len(tokens), False
        before = len(self.tokens)
        self.tokens.extend(tokens)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        found = []
        for stop in self.stop:
            start = self.text.find(stop, max(0, self.emitted - len(stop)))
            if start >= 0:
                found.append((start, stop))
        if found:  # one step may complete several stop strings: the earliest wins
            start, stop = min(found)
            keep = self._tokens_to_reach(before, start + len(stop))
            self.text = self.text[:start]
            return self._emit(len(self.text)), keep, True
        safe = len(self.text)
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":  # an unfinished UTF-8 character
            safe -= 1
        for stop in self.stop:  # hold back what may be the start of a stop string
            for size in range(min(len(stop) - 1, safe - self.emitted), 0, -1):
                if self.text[safe - size : safe] == stop[:size]:
                    safe -= size
                    break
        return self._emit(safe), len(tokens), False

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        chunk = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return chunk

    def _tokens_to_reach(self, before: int, length: int) -> int:
        for count in range(1, len(self.tokens) - before + 1):
            if len(self.tokenizer.decode(self.tokens[: before + count], skip_special_tokens=True)) >= length:
                self.tokens = self.tokens[: before + count]
                return count
        return len(self.tokens) - before


def check_heads_match(config: MedusaHeadsConfig, base_model: PreTrainedModel) -> None:
    hidden = base_model.config.get_text_config().hidden_size
    vocab = base_model.get_output_embeddings().weight.shape[0]
    if config.hidden_size != hidden:
        raise MedusaError(f"heads hidden size {config.hidden_size} does not match the base model's {hidden}")
    if config.vocab_size != vocab:
        raise MedusaError(f"heads vocabulary {config.vocab_size} does not match the base model's {vocab}")


def heads_device(base_model: PreTrainedModel) -> torch.device:
    """The heads sit with the base lm_head: on the last device when ``device_map`` splits the base model."""
    lm_head = base_model.get_output_embeddings()
    weight = getattr(lm_head, "weight", None)
    return weight.device if weight is not None else model_device(base_model)

