"""``MedusaModel`` around the loop: prompts, text out, streaming, stop strings, stats, and bad input."""

from __future__ import annotations

import pytest
import torch

from helpers.models import make_tiny_model
from helpers.text_model import make_tokenizer
from medusa.decoding import DecodingStats
from medusa.engine import EngineOptions
from medusa.errors import MedusaError
from medusa.heads import HEAD_TYPES
from medusa.interop import load_heads_config
from medusa.model import GenerationConfig, MedusaModel, default_heads
from medusa.text import TextTracker
from medusa.treeopt.profile import HeadProfile, heads_fingerprint
from medusa.tuned_trees import read_tuned_trees

PROMPT = "Tell me a story."


@pytest.fixture(scope="module")
def model() -> MedusaModel:
    return MedusaModel.from_pretrained(make_tiny_model("llama", seed=1), tokenizer=make_tokenizer(), tree="16")


def plain_greedy(model: MedusaModel, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.base_model.generate(
            ids[None],
            attention_mask=torch.ones_like(ids[None]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, ids.numel() :].tolist()


# ----- prompts ------------------------------------------------------------------------------------


def test_text_goes_through_the_chat_template(model):
    ids = model.encode_prompt(PROMPT)
    expected = model.tokenizer("<s>user: Tell me a story.\nassistant: ", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == expected
    assert model.encode_prompt(PROMPT, chat_template=False).tolist() == model.tokenizer(PROMPT)["input_ids"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    templated = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert model.encode_prompt(messages).tolist() == model.tokenizer(templated, add_special_tokens=False)["input_ids"]
    assert model.encode_prompt([5, 6, 7]).tolist() == [5, 6, 7]
    assert model.encode_prompt(torch.tensor([[5, 6, 7]])).tolist() == [5, 6, 7]


# ----- text out, streaming and stats --------------------------------------------------------------


@pytest.fixture(scope="module")
def answer(model):
    return model.generate(PROMPT, max_new_tokens=48)


def test_generate_returns_the_base_models_greedy_tokens_and_their_text(model, answer):
    ids = model.encode_prompt(PROMPT)
    assert answer.token_ids == plain_greedy(model, ids, 48)
    assert answer.text == model.tokenizer.decode(answer.token_ids, skip_special_tokens=True)
    assert answer.finish_reason == "length" and len(answer.token_ids) == 48
    stats = answer.stats
    assert stats.prompt_tokens == ids.numel() and stats.new_tokens == 48
    assert stats.steps == len(stats.accepted_per_step) and sum(stats.accepted_per_step) >= 48
    assert answer.mean_accepted >= 1 and answer.tokens_per_second > 0


def test_stream_chunks_concatenate_to_the_generated_text(model, answer):
    stats = DecodingStats()
    chunks = list(model.stream(PROMPT, GenerationConfig(max_new_tokens=48), stats=stats))
    assert "".join(chunk.text for chunk in chunks) == answer.text
    assert [token for chunk in chunks for token in chunk.token_ids] == answer.token_ids
    assert len(chunks) >= stats.steps and stats.new_tokens == 48
    assert [chunk.accepted for chunk in chunks if chunk.token_ids] == stats.accepted_per_step


def test_plain_decoding_gives_the_same_text(model, answer):
    plain = model.generate(PROMPT, GenerationConfig(max_new_tokens=48), options=EngineOptions(use_heads=False))
    assert plain.text == answer.text and plain.token_ids == answer.token_ids
    assert plain.stats.accepted_per_step == [1] * 48


def test_one_new_token(model, answer):
    result = model.generate(PROMPT, max_new_tokens=1)
    assert result.token_ids == answer.token_ids[:1] and result.finish_reason == "length"


# ----- stop strings -------------------------------------------------------------------------------


def a_stop_string(text: str) -> str:
    """Two characters from the middle of the answer: a stop string it is sure to contain."""
    return text[len(text) // 2 : len(text) // 2 + 2]


def test_stop_string_cuts_the_text_before_it(model, answer):
    stop = a_stop_string(answer.text)
    first = answer.text.find(stop)
    result = model.generate(PROMPT, max_new_tokens=48, stop=stop)
    assert result.text == answer.text[:first]
    assert result.finish_reason == "stop"
    # The tokens kept are those that complete the stop string, and no more.
    assert result.token_ids == answer.token_ids[: len(result.token_ids)]
    decoded = model.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert decoded.endswith(stop) and stop not in decoded[:-1]


def test_streamed_stop_never_shows_the_stop_string(model, answer):
    stop = a_stop_string(answer.text)
    chunks = [chunk.text for chunk in model.stream(PROMPT, GenerationConfig(max_new_tokens=48, stop=(stop,)))]
    assert "".join(chunks) == answer.text[: answer.text.find(stop)]


def test_earliest_of_several_stop_strings_wins(model, answer):
    late, early = answer.text[30:32], answer.text[10:12]
    cut = min(answer.text.find(late), answer.text.find(early))
    for stops in ((late, early), (early, late)):
        result = model.generate(PROMPT, max_new_tokens=48, stop=stops)
        assert result.text == answer.text[:cut] and result.finish_reason == "stop"


def test_stop_string_that_never_comes(model, answer):
    result = model.generate(PROMPT, max_new_tokens=48, stop=["\u263a never \u263a"])
    assert result.text == answer.text and result.finish_reason == "length"


class ByteTokenizer:
    """Each id is one byte; decoding replaces unfinished UTF-8 with U+FFFD, like real byte-level tokenizers."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def byte_ids(text: str) -> list[int]:
    return list(text.encode())


def test_tracker_holds_back_an_unfinished_character():
    tracker = TextTracker(ByteTokenizer(), stop=())
    e_acute = byte_ids("é")
    assert tracker.add(byte_ids("caf") + e_acute[:1]) == ("caf", 4, False)
    assert tracker.add(e_acute[1:]) == ("é", 1, False)
    assert tracker.flush() == ""


def test_tracker_holds_back_a_possible_stop_string_across_steps():
    tracker = TextTracker(ByteTokenizer(), stop=("END",))
    assert tracker.add(byte_ids("abc E")) == ("abc ", 5, False)  # "E" may start "END"
    assert tracker.add(byte_ids("N")) == ("", 1, False)
    assert tracker.add(byte_ids("D and more")) == ("", 1, True)  # only the token completing "END" is kept
    assert tracker.flush() == ""


def test_tracker_releases_text_that_did_not_become_a_stop_string():
    tracker = TextTracker(ByteTokenizer(), stop=("END",))
    assert tracker.add(byte_ids("x EN")) == ("x ", 4, False)
    assert tracker.add(byte_ids("Dx")[1:]) == ("ENx", 1, False)
    assert tracker.add(byte_ids("E")) == ("", 1, False)
    assert tracker.flush() == "E"


def test_tracker_stops_at_the_earliest_stop_string_of_a_step():
    for stops in (("STOP", "END"), ("END", "STOP")):
        tracker = TextTracker(ByteTokenizer(), stop=stops)
        assert tracker.add(byte_ids("a END b STOP c")) == ("a ", 5, True)


class CountingTokenizer:
    """Counts the ids each ``decode`` call is given: the work detokenization does."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoded_ids = 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded_ids += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def byte_level_tokenizer():
    """A GPT-2-style byte-level BPE with no merges: every UTF-8 byte is a token, so characters split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(["<|endoftext|>"] + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


SPLIT_UNICODE = "Caf\u00e9 \u2713 na\u00efve \U0001f600 \u4e2d\u6587 \U0001f469\u200d\U0001f52c end. "


def tracked_text(tracker, steps) -> str:
    return "".join(tracker.add(step)[0] for step in steps) + tracker.flush()


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), byte_level_tokenizer()], ids=["bytes", "byte-level-bpe"])
def test_tracker_text_equals_decoding_the_whole_output(tokenizer):
    """Chunks of 1 to 4 tokens, cutting characters of 2, 3 and 4 bytes (and a special token) anywhere."""
    generator = torch.Generator().manual_seed(0)
    ids = (
        tokenizer(SPLIT_UNICODE * 6)["input_ids"]
        if hasattr(tokenizer, "convert_ids_to_tokens")
        else byte_ids(SPLIT_UNICODE * 6)
    )
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        ids = ids[:40] + [tokenizer.eos_token_id] + ids[40:]  # skipped, as whole-output decoding skips it
    steps, start = [], 0
    while start < len(ids):
        size = int(torch.randint(1, 5, (1,), generator=generator))
        steps.append(ids[start : start + size])
        start += size
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert tracked_text(TextTracker(tokenizer, stop=()), steps) == expected
    assert tracked_text(TextTracker(tokenizer, stop=("never there",)), steps) == expected
    stopped = TextTracker(tokenizer, stop=("\u4e2d",))  # a stop string made of split characters
    texts = []
    for step in steps:
        text, _, done = stopped.add(step)
        texts.append(text)
        if done:
            break
    assert done and "".join(texts) == expected[: expected.index("\u4e2d")]


def test_tracker_decodes_a_bounded_window_per_step():
    """Each step decodes a few tokens around the new ones, not the whole output (quadratic before)."""
    counting = CountingTokenizer(ByteTokenizer())
    ids = byte_ids(SPLIT_UNICODE * 40)  # about 1,700 tokens, one per step
    text = tracked_text(TextTracker(counting, stop=("never there",)), [[token] for token in ids])
    assert text == SPLIT_UNICODE * 40
    assert counting.decoded_ids < 20 * len(ids)


def test_tracker_without_a_tokenizer_only_counts_tokens():
    tracker = TextTracker(None, stop=("x",))
    assert tracker.add([1, 2, 3]) == ("", 3, False)


# ----- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt", ["", "   \n", [], torch.tensor([], dtype=torch.long)], ids=["empty", "blank", "no-ids", "empty-tensor"]
)
def test_empty_prompt(model, prompt):
    with pytest.raises(MedusaError, match="the prompt is empty"):
        model.generate(prompt, max_new_tokens=4)


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "8"])
def test_max_new_tokens_must_be_positive(model, value):
    with pytest.raises(MedusaError, match=f"max_new_tokens must be a positive integer, got {value!r}"):
        model.generate(PROMPT, max_new_tokens=value)


def test_prompt_longer_than_the_context():
    short = MedusaModel.from_pretrained(
        make_tiny_model("qwen2", max_positions=32), tokenizer=make_tokenizer(), tree="8"
    )
    with pytest.raises(MedusaError, match="the prompt has 40 tokens; the model's context is 32 tokens"):
        short.generate([7] * 40, max_new_tokens=1)
    with pytest.raises(MedusaError, match="the prompt has 32 tokens; the model's context is 32 tokens"):
        short.generate([7] * 32, max_new_tokens=1)
    with pytest.raises(
        MedusaError,
        match=r"the prompt \(20 tokens\) plus max_new_tokens \(20\) exceeds the model's "
        r"context of 32 tokens; lower max_new_tokens to at most 12",
    ):
        short.generate([7] * 20, max_new_tokens=20)
    with pytest.raises(MedusaError, match="the prompt has 39 tokens"):
        short.generate("x" * 20, max_new_tokens=4)  # the chat template adds 19 tokens
    assert len(short.generate([7] * 20, max_new_tokens=12).token_ids) == 12  # exactly fills the context


def test_token_ids_outside_the_vocabulary(model):
    with pytest.raises(MedusaError, match=r"prompt token ids must lie in \[0, 256\), got 5..300"):
        model.generate([5, 300], max_new_tokens=4)
    with pytest.raises(MedusaError, match=r"got -1..5"):
        model.generate([5, -1], max_new_tokens=4)


def test_text_without_a_tokenizer():
    bare = MedusaModel.from_pretrained(make_tiny_model("llama"), tree="8")
    with pytest.raises(MedusaError, match="this model has no tokenizer: pass token ids"):
        bare.generate("hello", max_new_tokens=4)
    assert len(bare.generate([5, 6], max_new_tokens=4).token_ids) == 4


def test_messages_without_a_chat_template():
    plain = MedusaModel.from_pretrained(
        make_tiny_model("llama"), tokenizer=make_tokenizer(chat_template=False), tree="8"
    )
    with pytest.raises(MedusaError, match="messages were given, but the tokenizer has no chat template"):
        plain.generate([{"role": "user", "content": "hi"}], max_new_tokens=4)
    # Text is then tokenised as it is.
    assert plain.encode_prompt("hi").tolist() == plain.tokenizer("hi")["input_ids"]


@pytest.mark.parametrize("prompt", [3.5, None, [1, "a"], [True]])
def test_prompt_of_the_wrong_type(model, prompt):
    with pytest.raises(MedusaError, match="a prompt is text, a list of chat messages or a list of token ids, got"):
        model.generate(prompt, max_new_tokens=4)


@pytest.mark.parametrize("stop", ["", ["ok", ""], [3]])
def test_bad_stop_strings(model, stop):
    with pytest.raises(MedusaError, match="stop strings must be non-empty strings"):
        model.generate(PROMPT, max_new_tokens=4, stop=stop)


@pytest.mark.parametrize(
    "tree, message",
    [
        ("12", "no default tree of 12 nodes"),
        ("[[0], [1, 1]]", r"needs its prefix \[1\]"),
        ("[[0]", "is not valid JSON"),
    ],
)
def test_bad_tree(model, tree, message):
    with pytest.raises(MedusaError, match=message):
        model.generate(PROMPT, max_new_tokens=4, tree=tree)
    with pytest.raises(MedusaError, match=message):
        MedusaModel.from_pretrained(make_tiny_model("llama"), tree=tree)


def test_tree_override_per_call_stays_lossless(model, answer):
    result = model.generate(PROMPT, max_new_tokens=48, tree="[[0], [1], [0, 0], [0, 0, 0]]")
    assert result.token_ids == answer.token_ids


def test_missing_base_model(tmp_path):
    with pytest.raises(MedusaError, match=f"base model {tmp_path / 'nope'} does not exist"):
        MedusaModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(MedusaError, match="is a file but not a .gguf file"):
        MedusaModel.from_pretrained(tmp_path / "weights.bin")
    with pytest.raises(MedusaError, match="has no config.json"):
        MedusaModel.from_pretrained(tmp_path)


def test_save_without_heads_is_refused(model, tmp_path):
    bare = MedusaModel(model.base_model, model.tokenizer, heads=None)
    with pytest.raises(MedusaError, match="this model has no heads to save"):
        bare.save_pretrained(tmp_path)


def test_cache_length_sets_the_least_cache_an_engine_gets(model):
    prompt = model.encode_prompt(PROMPT)
    needed = prompt.numel() + 8
    rounded = -(-needed // 256) * 256
    engine = model.engine(EngineOptions(), max_length=needed)
    assert engine.decoder.max_length == rounded + model.tree.size
    engine = model.engine(EngineOptions(cache_length=300), max_length=needed)
    assert engine.decoder.max_length == 512 + model.tree.size
    # "at least": a generation that needs more still gets what it needs, and decodes the same tokens
    engine = model.engine(EngineOptions(cache_length=10), max_length=needed)
    assert engine.decoder.max_length == rounded + model.tree.size
    long_cache = model.generate(PROMPT, max_new_tokens=24, cache_length=400)
    assert long_cache.token_ids == model.generate(PROMPT, max_new_tokens=24).token_ids


@pytest.mark.parametrize("value", [0, -5, True, 2.5, "512"])
def test_cache_length_must_be_a_positive_integer(value):
    with pytest.raises(MedusaError, match=f"cache_length must be a positive number of slots or None, got {value!r}"):
        EngineOptions(cache_length=value)


@pytest.mark.parametrize("value", [0, -128, False, 64.0])
def test_attention_span_step_must_be_a_positive_integer_or_none(value):
    with pytest.raises(
        MedusaError, match=f"attention_span_step must be a positive number of slots or None, got {value!r}"
    ):
        EngineOptions(attention_span_step=value)


def test_the_attention_span_step_sets_the_engines_spans_and_keeps_the_tokens(model):
    spans = {}
    for step in (64, None):
        spans[step] = model.engine(EngineOptions(cache_length=300, attention_span_step=step), max_length=8).spans
    size = model.tree.size
    assert spans[64] == (64 * -(-size // 64), *range(64 * -(-size // 64) + 64, 512 + size, 64), 512 + size)
    assert spans[None] == (512 + size,)
    outputs = [
        model.generate(PROMPT, max_new_tokens=24, cache_length=300, attention_span_step=step).token_ids
        for step in (64, None)
    ]
    assert outputs[0] == outputs[1]


def test_logprobs_are_the_base_models_own(model, answer):
    """Greedy and sampled: each token's log-probability and top alternatives equal the base model's log-softmax."""
    for config in (
        GenerationConfig(max_new_tokens=12, logprobs=3),
        GenerationConfig(max_new_tokens=12, logprobs=2, temperature=0.9, seed=4),
    ):
        result = model.generate(PROMPT, config)
        prompt = model.encode_prompt(PROMPT).tolist()
        with torch.no_grad():
            logits = model.base_model(torch.tensor([prompt + result.token_ids])).logits[0].log_softmax(-1)
        expected = [logits[len(prompt) - 1 + i, token].item() for i, token in enumerate(result.token_ids)]
        assert result.logprobs == pytest.approx(expected, abs=1e-4)
        for i, top in enumerate(result.top_logprobs):
            values, ids = logits[len(prompt) - 1 + i].topk(config.logprobs)
            assert [t for t, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
    assert model.generate(PROMPT, max_new_tokens=4).logprobs is None


def test_prompt_logprobs_are_the_base_models_own(model):
    """Each prompt token's log-probability given those before it (None for the first) and its top alternatives,
    in chunks of positions that together give what one log-softmax over the whole prompt gives."""
    import medusa.model as model_module

    prompt = model.encode_prompt(PROMPT)
    with torch.no_grad():
        reference = model.base_model(prompt[None]).logits[0].float().log_softmax(-1)
    for chunk in (512, 3):
        previous, model_module.PROMPT_LOGPROBS_CHUNK = model_module.PROMPT_LOGPROBS_CHUNK, chunk
        try:
            logprobs, tops = model.prompt_logprobs(prompt, top=4)
        finally:
            model_module.PROMPT_LOGPROBS_CHUNK = previous
        assert logprobs[0] is None and tops[0] is None and len(logprobs) == len(tops) == prompt.numel()
        expected = [reference[i - 1, token].item() for i, token in enumerate(prompt.tolist()) if i > 0]
        assert logprobs[1:] == pytest.approx(expected, abs=1e-4)
        for i, top in enumerate(tops[1:]):
            values, ids = reference[i].topk(4)
            assert [t for t, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
    assert model.prompt_logprobs(prompt[:1], top=0) == ([None], [None])
    with pytest.raises(MedusaError, match="top must be an integer from 0 to 20"):
        model.prompt_logprobs(prompt, top=21)


@pytest.mark.parametrize("value", [-1, 21, True, 2.5])
def test_logprobs_must_be_none_or_0_to_20(value):
    with pytest.raises(MedusaError, match="logprobs must be None or an integer from 0 to 20"):
        GenerationConfig(logprobs=value)


def test_a_model_object_moves_to_the_dtype_and_device_asked_for():
    base = make_tiny_model("llama", seed=3)
    model = MedusaModel.from_pretrained(base, dtype="bfloat16", device="cpu", tree="8")
    assert model.base_model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert {p.dtype for p in model.heads.parameters()} == {torch.bfloat16}
    assert len(model.generate([5, 6, 7], max_new_tokens=4, chat_template=False).token_ids) == 4
    with pytest.raises(MedusaError, match="device_map applies when loading a model from a path"):
        MedusaModel.from_pretrained(base, device_map="auto")


@pytest.mark.parametrize("tree", [16, "16"])
def test_a_tree_size_is_taken_as_a_number_or_as_text(tree):
    """The Python API takes the forms --tree takes: ``tree=16`` is the 16-node default tree, as ``--tree 16`` is."""
    model = MedusaModel.from_pretrained(make_tiny_model("llama"), tree=tree)
    assert model.tree.size == 16 and model.heads_tree.size == 16
    assert model.generate([5, 6, 7], max_new_tokens=4, tree=tree).token_ids


def test_heads_without_a_tuned_tree_get_a_small_tree_on_the_cpu(model, tmp_path):
    """Untuned heads with a 64-node tree.json decode with the small CPU default tree, and say so and how to tune."""
    MedusaModel(model.base_model, model.tokenizer, model.heads, tree="64").save_pretrained(tmp_path / "heads")
    loaded = MedusaModel.from_pretrained(model.base_model, heads=tmp_path / "heads", tokenizer=model.tokenizer)
    assert loaded.tree.size == 8 and loaded.heads_tree.size == 8
    assert not loaded.tree_choice.tuned
    assert "8-node default tree for the CPU" in loaded.tree_choice.origin
    assert "medusa tree tune --heads" in loaded.tree_choice.origin
    small = tmp_path / "small"
    MedusaModel(model.base_model, model.tokenizer, model.heads, tree="[[0], [0, 0]]").save_pretrained(small)
    assert MedusaModel.from_pretrained(model.base_model, heads=small).tree.size == 3  # the heads' own, small enough


def test_the_shipped_heads_stand_in_for_no_heads_only_when_of_the_head_type_asked_for():
    shipped = default_heads()
    if shipped is None:
        pytest.skip("no heads shipped for the default model")
    shipped_type = load_heads_config(shipped).head_type
    other = next(head_type for head_type in HEAD_TYPES if head_type != shipped_type)
    assert default_heads(shipped_type) == shipped
    assert default_heads(other) is None  # from_pretrained makes fresh heads of that type instead


SHIPPED_HEADS_BUDGET_BYTES = 20 * 10**6  # what the package may spend on the default model's heads


def test_the_shipped_heads_fit_their_budget_and_their_profile_and_trees_name_their_weights():
    """Heads swapped for others (or re-saved in another dtype) must come with their own profile and tuned trees:
    `medusa tree tune` refuses a profile of other weights, and tuned trees would describe other heads."""
    shipped = default_heads()
    if shipped is None:
        pytest.skip("no heads shipped for the default model")
    assert sum(path.stat().st_size for path in shipped.iterdir()) < SHIPPED_HEADS_BUDGET_BYTES
    fingerprint = heads_fingerprint(shipped)
    assert HeadProfile.load(shipped / "tree_profile.json").heads_fingerprint == fingerprint
    entries = read_tuned_trees(shipped)
    assert entries and {entry.heads_fingerprint for entry in entries.values()} == {fingerprint}
