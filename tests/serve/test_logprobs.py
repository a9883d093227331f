"""logprobs, echo and n through the official ``openai`` client, checked against the base model's own
log-softmax over the same tokens and against single requests."""

from __future__ import annotations

import openai
import pytest
import torch

from helpers.serve import MODEL_NAME

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
PROMPT = "The sky is"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """The base model's log-softmax at every position of prompt + completion ``[positions, vocab]``."""
    with torch.no_grad():
        logits = model.base_model(torch.tensor([prompt_ids + completion_ids])).logits[0]
    return logits.float().log_softmax(-1)


def check_chat_token(model, item, expected: torch.Tensor, token_id: int, top: int) -> None:
    """One entry of chat's ``logprobs.content`` against the reference row that predicted it."""
    table = model.tokenizer
    assert item.token == table.decode([token_id]) and item.bytes == list(item.token.encode())
    assert item.logprob == pytest.approx(expected[token_id].item(), abs=1e-4)
    values, ids = expected.topk(top)
    assert [table.convert_tokens_to_ids(t.token) for t in item.top_logprobs] == ids.tolist()
    assert [t.logprob for t in item.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=11)], ids=["greedy", "sampled"])
def test_chat_logprobs_are_the_base_models_own(client, serve_model, sampling):
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=20, logprobs=True, top_logprobs=3, **sampling
    )
    # A seeded request gives the same tokens alone in the library as in the server's batch.
    tokens = serve_model.generate(MESSAGES, max_new_tokens=20, **sampling).token_ids
    content = response.choices[0].logprobs.content
    assert len(content) == len(tokens) == response.usage.completion_tokens
    prompt = serve_model.encode_prompt(MESSAGES).tolist()
    expected = reference(serve_model, prompt, tokens)
    for i, (item, token) in enumerate(zip(content, tokens)):
        check_chat_token(serve_model, item, expected[len(prompt) - 1 + i], token, 3)
    if sampling["temperature"] == 0:  # greedy picks the top token every time
        assert all(item.token == item.top_logprobs[0].token for item in content)
    else:
        assert any(item.logprob < item.top_logprobs[0].logprob for item in content)  # it really sampled


@pytest.mark.parametrize("top", [0, 1, 20])
def test_top_logprobs_come_best_first_and_as_many_as_asked(client, top):
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=3, logprobs=True, top_logprobs=top
    )
    for item in response.choices[0].logprobs.content:
        values = [t.logprob for t in item.top_logprobs]
        assert len(values) == top and values == sorted(values, reverse=True)
        assert len({t.token for t in item.top_logprobs}) == top
        if top:
            assert item.logprob <= values[0] + 1e-6


def test_logprobs_are_absent_unless_asked(client):
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4)
    assert response.choices[0].logprobs is None
    completion = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4)
    assert completion.choices[0].logprobs is None


def test_streamed_chat_logprobs_concatenate_to_the_whole(client):
    options = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=30, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**options).choices[0].logprobs.content
    chunks = [c for c in client.chat.completions.create(stream=True, **options) if c.choices]
    streamed = [item for c in chunks if c.choices[0].logprobs for item in c.choices[0].logprobs.content]

    def flat(items) -> tuple[list, list[float]]:
        names = [(i.token, i.bytes, [(t.token, t.bytes) for t in i.top_logprobs]) for i in items]
        return names, [v for i in items for v in (i.logprob, *(t.logprob for t in i.top_logprobs))]

    assert flat(streamed)[0] == flat(whole)[0] and len(whole) == 30
    assert flat(streamed)[1] == pytest.approx(flat(whole)[1], abs=1e-5)
    assert sum(1 for c in chunks if c.choices[0].logprobs) > 1  # spread over the chunks


def test_completion_logprobs_without_echo(client, serve_model):
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2)
    prompt = serve_model.tokenizer(PROMPT)["input_ids"]
    tokens = serve_model.generate(PROMPT, max_new_tokens=10, chat_template=False).token_ids
    logprobs = response.choices[0].logprobs
    expected = reference(serve_model, prompt, tokens)
    assert logprobs.tokens == [serve_model.tokenizer.decode([t]) for t in tokens]
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert logprobs.text_offset == list(range(len(tokens)))
    for i, (token, logprob, top) in enumerate(zip(tokens, logprobs.token_logprobs, logprobs.top_logprobs)):
        row = expected[len(prompt) - 1 + i]
        assert logprob == pytest.approx(row[token].item(), abs=1e-4)
        values, ids = row.topk(2)
        best = {serve_model.tokenizer.decode([t]): v for t, v in zip(ids.tolist(), values.tolist())}
        assert top == pytest.approx(best, abs=1e-4)  # greedy: the chosen token is among the top two


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_completion_echo_scores_the_prompt(client, serve_model, max_tokens):
    """What evaluation harnesses (lm-eval) send to score a text: echo, logprobs, max_tokens 0 or 1."""
    response = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=max_tokens, temperature=0, echo=True, logprobs=3
    )
    prompt = serve_model.tokenizer(PROMPT)["input_ids"]
    generated = serve_model.generate(PROMPT, max_new_tokens=1, chat_template=False).token_ids[:max_tokens]
    choice = response.choices[0]
    assert choice.text.startswith(PROMPT) and len(choice.text) == len(PROMPT) + max_tokens
    logprobs = choice.logprobs
    ids = prompt + generated
    assert logprobs.tokens == [serve_model.tokenizer.decode([t]) for t in ids]
    assert logprobs.text_offset == list(range(len(ids)))
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = reference(serve_model, prompt, generated)
    for i in range(1, len(ids)):
        assert logprobs.token_logprobs[i] == pytest.approx(expected[i - 1, ids[i]].item(), abs=1e-4)
        values, top_ids = expected[i - 1].topk(3)
        alternatives = {serve_model.tokenizer.decode([t]): v for t, v in zip(top_ids.tolist(), values.tolist())}
        alternatives.setdefault(logprobs.tokens[i], expected[i - 1, ids[i]].item())  # the token itself is always there
        assert logprobs.top_logprobs[i] == pytest.approx(alternatives, abs=1e-4)
    assert response.usage.prompt_tokens == len(prompt) and response.usage.completion_tokens == max_tokens


def test_streamed_echo_with_max_tokens_0(client):
    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    chunks = list(
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == PROMPT
    streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.choices[0].logprobs.token_logprobs)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


def test_echo_without_logprobs_puts_the_prompt_first(client, serve_model):
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    expected = serve_model.generate(PROMPT, max_new_tokens=5, chat_template=False).text
    assert response.choices[0].text == PROMPT + expected and response.choices[0].logprobs is None


def test_n_choices_with_a_seed_are_the_single_requests_of_seed_plus_i(client, serve_model):
    def single(seed: int) -> tuple[str, int]:
        response = client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=seed
        )
        return response.choices[0].message.content, response.usage.completion_tokens

    response = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=41, n=3
    )
    singles = [single(seed) for seed in (41, 42, 43)]
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.message.content for c in response.choices] == [text for text, _ in singles]
    assert len({text for text, _ in singles}) > 1  # the choices really differ
    assert response.usage.completion_tokens == sum(tokens for _, tokens in singles)
    assert response.usage.prompt_tokens == serve_model.encode_prompt(MESSAGES).numel()  # counted once
    streamed = ["", "", ""]
    finishes = {}
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            max_tokens=16,
            temperature=1.0,
            seed=41,
            n=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert streamed == [text for text, _ in singles]
    assert sorted(finishes) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens


def test_n_completions_greedy_are_the_same_and_echo_each(client, serve_model):
    response = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, n=2, echo=True, logprobs=0
    )
    expected = serve_model.generate(PROMPT, max_new_tokens=6, chat_template=False).text
    assert [c.text for c in response.choices] == [PROMPT + expected] * 2
    assert response.choices[0].logprobs.token_logprobs == response.choices[1].logprobs.token_logprobs
    assert response.usage.completion_tokens == 12
    assert response.usage.prompt_tokens == len(serve_model.tokenizer(PROMPT)["input_ids"])


def test_byte_level_tokens_show_their_exact_bytes():
    """GPT-2 style vocabularies: a token's bytes are its own, and a token that is part of a character is named
    by its bytes (as OpenAI's are); text offsets count whole characters."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from medusa.serve.logprobs import TokenScores, TokenTable

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    vocab[byte_chars[ord(" ")] + "the"] = 256
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.ByteLevel()
    table = TokenTable(PreTrainedTokenizerFast(tokenizer_object=backend), 257)
    assert (table.strings[256], table.bytes[256]) == (" the", b" the")
    assert (table.strings[0xE2], table.bytes[0xE2]) == ("bytes:\\xe2", b"\xe2")
    euro = list("€".encode())  # three tokens, one character
    body, offset = table.completion_logprobs(TokenScores([256, *euro, ord("a")], [-1.0] * 5, [[]] * 5), 0, 0)
    assert body["tokens"] == [" the", "bytes:\\xe2", "bytes:\\x82", "bytes:\\xac", "a"]
    assert body["text_offset"] == [0, 4, 5, 5, 5] and offset == 6
    content = table.chat_content(TokenScores(euro, [-1.0] * 3, [[(256, -0.5)]] * 3))
    assert [bytes(item["bytes"]) for item in content] == [b"\xe2", b"\x82", b"\xac"]
    assert content[0]["top_logprobs"] == [{"token": " the", "logprob": -0.5, "bytes": list(b" the")}]


def test_n_choices_decoded_as_rows_of_one_batch_keep_their_seeds_and_logprobs(serve_model):
    """With --max-batch 4 the three choices decode together; each is still its seed's answer, and its
    logprobs are still the base model's own."""
    from helpers.serve import running_server

    with running_server(serve_model, max_batch=4) as batched:
        client = openai.OpenAI(base_url=batched.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        response = client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            max_tokens=16,
            temperature=1.0,
            seed=7,
            n=3,
            logprobs=True,
            top_logprobs=2,
        )
        steps = batched.engine.metrics.batch_size
        assert steps.sum > steps.count  # more than one row per step: the choices ran together
    prompt = serve_model.encode_prompt(MESSAGES).tolist()
    for index, choice in enumerate(response.choices):
        tokens = serve_model.generate(MESSAGES, max_new_tokens=16, temperature=1.0, seed=7 + index).token_ids
        assert choice.message.content == serve_model.tokenizer.decode(tokens, skip_special_tokens=True)
        expected = reference(serve_model, prompt, tokens)
        assert len(choice.logprobs.content) == len(tokens)
        for i, (item, token) in enumerate(zip(choice.logprobs.content, tokens)):
            check_chat_token(serve_model, item, expected[len(prompt) - 1 + i], token, 2)
