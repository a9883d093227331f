"""``MedusaModel``: a base causal LM, its Medusa heads, a tree, and text in / text out around the loop."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from medusa.acceptance import (
    DEFAULT_TYPICAL_DELTA,
    DEFAULT_TYPICAL_EPS,
    AcceptanceScheme,
    make_acceptance,
    token_logprobs,
)
from medusa.attention import use_grouped_sdpa
from medusa.decoding import MAX_TOP_LOGPROBS, DecodingStats
from medusa.devices import model_device
from medusa.engine import BATCH_BUCKETS, DecodingEngine, EngineOptions, Generation, bucket_for, check_count
from medusa.errors import MedusaError
from medusa.files import write_text
from medusa.heads import DEFAULT_HEAD_TYPE, MedusaHeads, MedusaHeadsConfig
from medusa.interop import load_heads, load_heads_config
from medusa.loading import load_base_model, resolve_device, resolve_dtype
from medusa.paths import DEFAULT_MODEL_NAME, shipped_heads_directory
from medusa.sampling import SamplingParams, check_seed
from medusa.text import Prompt, TextTracker, is_prompt_batch, prompt_token_ids
from medusa.tree import Tree, TreeSpec, load_tree
from medusa.tuned_trees import TreeChoice, choose_tree

PROMPT_LOGPROBS_CHUNK = 512  # prompt positions whose float32 log-softmax over the vocabulary is held at once
NODE_BUDGET = 256  # tree nodes verified per step across the batch when no tree was tuned for the batch size
TREE_FILE = "tree.json"


@dataclass
class GenerationConfig:
    """What one request asks for; how the engine runs is ``EngineOptions``."""

    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    # "auto": greedy at temperature 0, lossless rejection sampling above; or "greedy", "typical", "rejection".
    acceptance: str = "auto"
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None  # None: a fresh random seed per generation
    typical_eps: float = DEFAULT_TYPICAL_EPS
    typical_delta: float = DEFAULT_TYPICAL_DELTA
    chat_template: bool = True
    # None: no log-probabilities; k (0 to 20): each token's log-probability under the base model and its top k
    # alternatives, from the verification pass.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise MedusaError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise MedusaError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        check_seed(self.seed)
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool)
            or not isinstance(self.logprobs, int)
            or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            raise MedusaError(
                f"logprobs must be None or an integer from 0 to {MAX_TOP_LOGPROBS}, got {self.logprobs!r}"
            )
        self.acceptance_scheme()  # refuses bad sampling settings now, not at the first step

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def acceptance_scheme(self) -> AcceptanceScheme:
        return make_acceptance(self.acceptance, self.sampling(), self.typical_eps, self.typical_delta)


REQUEST_FIELDS = frozenset(f.name for f in fields(GenerationConfig))
ENGINE_FIELDS = frozenset(f.name for f in fields(EngineOptions))


def split_settings(
    config: GenerationConfig | None, options: EngineOptions | None, overrides: dict
) -> tuple[GenerationConfig, EngineOptions]:
    """Keyword settings go to the request or the engine by name; a name that is neither is refused."""
    unknown = set(overrides) - REQUEST_FIELDS - ENGINE_FIELDS
    if unknown:
        raise MedusaError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
    request = {k: v for k, v in overrides.items() if k in REQUEST_FIELDS}
    engine = {k: v for k, v in overrides.items() if k in ENGINE_FIELDS}
    if config is not None and request:
        raise MedusaError("pass request settings either as a GenerationConfig or as keywords, not both")
    if options is not None and engine:
        raise MedusaError("pass engine settings either as EngineOptions or as keywords, not both")
    return config or GenerationConfig(**request), options or EngineOptions(**engine)


@dataclass
class GenerationChunk:
    text: str  # new text since the last chunk
    token_ids: list[int]
    accepted: int  # tokens this step committed (1 + accepted guesses)
    # With ``logprobs`` asked for: each token's log-probability under the base model, and its top alternatives.
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: DecodingStats = field(default_factory=DecodingStats)
    logprobs: list[float] | None = None  # with ``logprobs`` asked for, as ``GenerationChunk``'s
    top_logprobs: list[list[tuple[int, float]]] | None = None

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
        heads_tree: Tree | None = None,
    ) -> None:
        """``tree`` decodes one sequence by default and may carry a lookup chain; ``heads_tree``, the tree of
        head paths only (default: ``tree`` without its chain), serves batches and ``lookup=0``.

        A grouped-query base model on "sdpa" attention is switched, in place, to ``medusa.attention``'s
        implementation, which attends under the tree masks without copying K/V per query head."""
        super().__init__()
        use_grouped_sdpa(base_model)
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.name = name or getattr(base_model.config, "_name_or_path", "") or "model"
        if heads is not None:
            check_heads_match(heads.config, base_model)
            device, dtype = heads_device(base_model), base_model.dtype
            heads = heads.to(device=device, dtype=dtype)
            heads.attach_base_model(base_model)
            heads.eval()
        self.heads = heads
        self._engines: OrderedDict[tuple, DecodingEngine] = OrderedDict()  # least recently used first
        # Trees tuned per batch bucket (``medusa tree tune --batch-sizes``); buckets without one cut the model's
        # tree so that rows x nodes stays within ``node_budget`` (a batch fills the matrix units by itself).
        self.batch_trees: dict[int, Tree] = {}
        self.node_budget = NODE_BUDGET
        self.tree = load_tree(tree, heads.config.num_heads) if heads is not None else Tree.from_paths([])
        if heads_tree is not None and heads is not None:
            self.heads_tree = load_tree(heads_tree, heads.config.num_heads).with_lookup(0)
        else:
            self.heads_tree = self.tree.with_lookup(0)
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
        head_type: str | None = None,
        tree: TreeSpec = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict | None = None,
    ) -> MedusaModel:
        """Wrap a base model (directory, ``.gguf`` file, model object, or None for the default model).

        ``heads`` is a heads directory, a ``MedusaHeads``, a config for fresh heads, or None: the heads
        shipped for the default model when there are some (and they are of ``head_type``, if given), otherwise
        fresh (untrained) heads of ``num_heads``, ``num_layers``, ``share_lm_head`` and ``head_type``
        (``sequential``, the default: ``medusa.heads.DEFAULT_HEAD_TYPE``, or ``medusa``).
        ``device_map`` (``"auto"``, or accelerate's dict) splits a base model too big for one GPU over
        several; a model object passed in may come split already. Either way the heads go with the lm_head.
        """
        if isinstance(base, PreTrainedModel):
            if device_map is not None:
                raise MedusaError("device_map applies when loading a model from a path; place a model object yourself")
            base_model, name = base, getattr(base.config, "_name_or_path", None)
            if device is not None or dtype is not None:  # asked for, so honoured: the model moves (in place)
                target_device = resolve_device(device) if device is not None else None
                target_dtype = (
                    resolve_dtype(dtype, target_device or model_device(base_model)) if dtype is not None else None
                )
                base_model.to(device=target_device, dtype=target_dtype)
        else:
            base_model, loaded_tokenizer, name = load_base_model(
                base, dtype=dtype, device=device, device_map=device_map
            )
            tokenizer = tokenizer or loaded_tokenizer
        text_config = base_model.config.get_text_config()
        lm_head = base_model.get_output_embeddings()
        if heads is None and base is None:
            heads = default_heads(head_type)
        if heads is None:
            heads = MedusaHeadsConfig(
                hidden_size=text_config.hidden_size,
                vocab_size=lm_head.weight.shape[0],
                num_heads=num_heads,
                num_layers=num_layers,
                share_lm_head=share_lm_head,
                base_model=name,
                head_type=head_type or DEFAULT_HEAD_TYPE,
            )
        if isinstance(heads, MedusaHeadsConfig):
            check_heads_match(heads, base_model)
            heads = MedusaHeads(heads, base_lm_head=lm_head)
        heads_tree, batch_trees, choice = None, {}, None
        if isinstance(heads, (str, Path)):
            directory = Path(heads)
            heads_config = load_heads_config(directory)
            check_heads_match(heads_config, base_model)
            if tree is None:  # the tree tuned for this device, else one chosen for its kind (medusa.tuned_trees)
                choice = choose_tree(directory, model_device(base_model), heads_config.num_heads)
                tree, heads_tree, batch_trees = choice.tree, choice.heads_tree, choice.batch_trees
            heads = load_heads(directory, base_lm_head=lm_head)
        model = cls(base_model, tokenizer, heads, tree=tree, name=name, heads_tree=heads_tree)
        model.batch_trees = {bucket: tree for bucket, tree in batch_trees.items() if bucket > 1}
        model.tree_choice = choice
        return model

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the heads (config and safetensors) and the tree; the base model is referenced, not copied."""
        if self.heads is None:
            raise MedusaError("this model has no heads to save")
        directory = Path(directory)
        self.heads.save_pretrained(directory)
        write_text(directory / TREE_FILE, self.heads_tree.to_json() + "\n")

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
        """Token ids ``[prompt_len]`` on the model's device (``medusa.text.prompt_token_ids``)."""
        vocab = self.base_model.get_input_embeddings().weight.shape[0]
        ids = prompt_token_ids(self.tokenizer, prompt, chat_template, vocab)
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def check_lengths(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse a prompt that, with its new tokens, would not fit the model's context."""
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

    # ----- engines ------------------------------------------------------------------------------

    def engine(
        self,
        options: EngineOptions = EngineOptions(),
        tree: Tree | None = None,
        max_rows: int = 1,
        max_length: int = 0,
        keep: bool = True,
    ) -> DecodingEngine:
        """An engine for these options (kept and reused: it owns a KV cache and, on a GPU, captured steps),
        with room for ``max_rows`` rows of ``max_length`` slots. ``tree`` replaces the model's trees.

        ``keep=False``: a new engine of the caller's own, never handed to another caller (the server's worker
        thread drives one while ``generate`` may run elsewhere)."""
        key = (options, None if tree is None else (tree.paths, tree.topk, tree.lookup))
        engine = self._engines.get(key) if keep else None
        if engine is None or engine.active:
            engine = DecodingEngine(
                self.base_model,
                self.heads,
                self._tree_chooser(options, tree),
                options,
                max_rows=max_rows,
                max_length=max_length,
            )
            if not keep:
                return engine
            self._engines[key] = engine
            while len(self._engines) > 3:
                self._engines.popitem(last=False)
        self._engines.move_to_end(key)
        engine.reserve(max_rows, max_length)
        return engine

    def release_engines(self) -> None:
        """Drop the kept engines, their KV caches and captured graphs (a 7B model's batch cache is gigabytes)."""
        self._engines.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def tree_for(self, options: EngineOptions = EngineOptions(), rows: int = 1) -> Tree:
        """The tree a batch bucket of ``rows`` runs with these options (the root alone without heads)."""
        return self._tree_chooser(options, None)(bucket_for(rows))

    def _tree_chooser(self, options: EngineOptions, tree: Tree | None):
        """Each batch bucket's tree: the heads' tree (``tree``, else the model's), with the options' lookup chain.

        ``lookup=None`` keeps the tree's own chain (the tuned one, for the model's tree); ``lookup=0`` on
        the model's tree takes the tree tuned without a chain. Without heads: the root, and a chain if asked.
        """

        def choose(bucket: int) -> Tree:
            if not options.use_heads or self.heads is None:
                return Tree.from_paths([]).with_lookup(options.lookup or 0)
            chosen = tree
            if chosen is None:
                chosen = self.batch_trees.get(bucket)
                if chosen is None:  # not tuned for this batch size: keep rows x nodes within a budget
                    chosen = (self.heads_tree if options.lookup == 0 else self.tree).first_nodes(
                        self.node_budget // bucket
                    )
            return chosen if options.lookup is None else chosen.with_lookup(options.lookup)

        return choose

    def _generation(self, prompt_ids: torch.Tensor, config: GenerationConfig) -> Generation:
        return Generation(
            prompt_ids=prompt_ids,
            max_new_tokens=config.max_new_tokens,
            acceptance=config.acceptance_scheme(),
            seed=config.seed,
            eos_token_ids=frozenset(self.eos_token_ids()),
            detokenizer=TextTracker(self.tokenizer, config.stop),
            logprobs=config.logprobs,
        )

    def prepare(self, prompt: Prompt, config: GenerationConfig) -> Generation:
        """Encode a prompt, check its length, and make it a ``Generation`` the engine can run."""
        prompt_ids = self.encode_prompt(prompt, config.chat_template)
        self.check_lengths(prompt_ids.numel(), config.max_new_tokens)
        return self._generation(prompt_ids, config)

    @torch.inference_mode()
    def prompt_logprobs(
        self, prompt_ids: torch.Tensor, top: int = 0
    ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        """Each prompt token's log-probability under the base model given the tokens before it, and its ``top``
        alternatives as ``(token id, logprob)``; None for the first token, which has nothing before it.

        One forward pass over the prompt (scoring text, as evaluation harnesses do with ``echo``); the
        log-softmax runs in float32 a chunk of positions at a time, so a long prompt never holds the
        vocabulary's float32 row for every position at once.
        """
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise MedusaError(f"top must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}")
        ids = self.encode_prompt(prompt_ids)  # checks the ids lie in the vocabulary
        context = self.context_length
        if context is not None and ids.numel() > context:
            raise MedusaError(f"the prompt has {ids.numel()} tokens; the model's context is {context} tokens")
        logits = self.base_model(ids[None]).logits[0, :-1]  # position i predicts token i + 1
        logprobs: list[float | None] = [None]
        tops: list[list[tuple[int, float]] | None] = [None]
        for start in range(0, logits.shape[0], PROMPT_LOGPROBS_CHUNK):
            positions = torch.arange(start, min(start + PROMPT_LOGPROBS_CHUNK, logits.shape[0]), device=ids.device)
            chosen, top_ids, top_values = token_logprobs(logits[None], positions[None], ids[None, positions + 1], top)
            logprobs += chosen[0].tolist()
            tops += [list(zip(i, v)) for i, v in zip(top_ids[0].tolist(), top_values[0].tolist())]
        return logprobs, tops

    def _resolve_tree(self, tree: TreeSpec) -> Tree | None:
        if tree is None or self.heads is None:
            return None
        return load_tree(tree, self.heads.config.num_heads)

    # ----- generation ---------------------------------------------------------------------------

    def stream(
        self,
        prompt: Prompt,
        config: GenerationConfig | None = None,
        stats: DecodingStats | None = None,
        tree: TreeSpec = None,
        options: EngineOptions | None = None,
        **overrides,
    ) -> Iterator[GenerationChunk]:
        """Yield text as it is produced. ``stats`` (if given) is filled in as decoding goes.

        Keywords fill the request (``GenerationConfig``) and the engine settings (``EngineOptions``) by name.
        """
        config, options = split_settings(config, options, overrides)
        generation = self.prepare(prompt, config)
        if stats is not None:
            generation.stats = stats
        engine = self.engine(
            options, self._resolve_tree(tree), 1, generation.prompt_ids.numel() + config.max_new_tokens
        )
        for outputs in engine.run([generation]):
            for _, output in outputs:
                yield GenerationChunk(
                    text=output.text,
                    token_ids=output.tokens,
                    accepted=output.accepted,
                    logprobs=output.logprobs,
                    top_logprobs=output.top_logprobs,
                )
        tail = generation.finish_text()
        if tail:
            yield GenerationChunk(text=tail, token_ids=[], accepted=0)

    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        config: GenerationConfig | None = None,
        tree: TreeSpec = None,
        options: EngineOptions | None = None,
        **overrides,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate a whole answer. Keywords fill a ``GenerationConfig`` (max_new_tokens, stop, temperature, ...)
        and ``EngineOptions`` (use_heads, lookup, cuda_graphs, ...) by name.

        A list of prompts (texts, token-id lists, message lists or tensors) is decoded as one batch
        (``generate_batch``) and gives a list of results, in order.
        """
        if is_prompt_batch(prompt):
            return self.generate_batch(prompt, config, tree=tree, options=options, **overrides)
        config, options = split_settings(config, options, overrides)
        generation = self.prepare(prompt, config)
        engine = self.engine(
            options, self._resolve_tree(tree), 1, generation.prompt_ids.numel() + config.max_new_tokens
        )
        for _ in engine.run([generation]):
            pass
        generation.finish_text()
        return generation_result(generation)

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        config: GenerationConfig | Sequence[GenerationConfig] | None = None,
        tree: TreeSpec = None,
        options: EngineOptions | None = None,
        max_batch: int | None = None,
        **overrides,
    ) -> list[GenerationResult]:
        """Decode several prompts together: one forward pass per step verifies every row's tree.

        ``config`` may be one per prompt (each row its own sampling settings and seed). Each row accepts its
        own number of tokens per step and stops at its own EOS, stop string or ``max_new_tokens``; a greedy
        or seeded row's answer is exactly the one ``generate`` gives it alone. At most ``max_batch`` rows run
        at once (default: as many as the largest batch bucket holds); the others join as earlier ones finish.
        See docs/batching.md.
        """
        if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence):
            raise MedusaError(f"generate_batch takes a list of prompts, got {type(prompts).__name__}")
        if not prompts:
            raise MedusaError("no prompts to generate from: the list of prompts is empty")
        configs = list(config) if isinstance(config, Sequence) else None
        if configs is not None and len(configs) != len(prompts):
            raise MedusaError(f"{len(configs)} configs for {len(prompts)} prompts: give one per prompt, or one for all")
        shared, options = split_settings(None if configs is not None else config, options, overrides)
        configs = configs or [shared] * len(prompts)
        generations = []
        for index, (prompt, row_config) in enumerate(zip(prompts, configs)):
            try:
                generations.append(self.prepare(prompt, row_config))
            except MedusaError as error:
                raise MedusaError(f"prompt {index}: {error}") from None
        check_count("max_batch", max_batch, "rows")
        rows = min(len(generations), max_batch or BATCH_BUCKETS[-1], BATCH_BUCKETS[-1])
        longest = max(g.prompt_ids.numel() + g.max_new_tokens for g in generations)
        engine = self.engine(options, self._resolve_tree(tree), rows, longest)
        for _ in engine.run(generations, rows):  # more prompts than rows: each joins as an earlier one finishes
            pass
        for generation in generations:
            generation.finish_text()
        return [generation_result(generation) for generation in generations]


def generation_result(generation: Generation) -> GenerationResult:
    asked = generation.logprobs is not None
    return GenerationResult(
        text=generation.text,
        token_ids=generation.tokens,
        finish_reason=generation.stats.finish_reason,
        stats=generation.stats,
        logprobs=generation.token_logprobs if asked else None,
        top_logprobs=generation.token_top_logprobs if asked else None,
    )


def default_heads(head_type: str | None = None) -> Path | None:
    """The heads shipped for the default model, if there are some and they are of ``head_type`` (None: any type):
    what ``from_pretrained`` loads for the default model when given no heads. Asking for another head type gets
    fresh heads of that type instead."""
    shipped = shipped_heads_directory(DEFAULT_MODEL_NAME)
    if shipped is None or (head_type is not None and load_heads_config(shipped).head_type != head_type):
        return None
    return shipped


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
