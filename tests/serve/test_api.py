"""The real server on loopback, called with the official ``openai`` client."""

from __future__ import annotations

import httpx
import openai
import pytest

from helpers.serve import MODEL_NAME, running_server

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_chat_completion_matches_the_library(client, serve_model):
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=24, temperature=0)
    expected = serve_model.generate(MESSAGES, max_new_tokens=24)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == MODEL_NAME
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason == "length"
    prompt_len = serve_model.encode_prompt(MESSAGES).numel()
    assert response.usage.prompt_tokens == prompt_len
    assert response.usage.completion_tokens == len(expected.token_ids) == 24
    assert response.usage.total_tokens == prompt_len + 24


def test_streamed_chat_reassembles_to_the_same_text(client):
    whole = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=40, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=40,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(text) > 0
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done_and_no_usage_unless_asked(server):
    body = {"model": MODEL_NAME, "prompt": "abc", "max_tokens": 8, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(event.startswith("data: ") for event in events)
    assert not any('"usage"' in event for event in events)


def test_completion(client, serve_model):
    response = client.completions.create(model=MODEL_NAME, prompt="The sky is", max_tokens=12, temperature=0)
    expected = serve_model.generate("The sky is", max_new_tokens=12, chat_template=False)
    assert response.object == "text_completion"
    assert response.choices[0].text == expected.text
    assert response.usage.completion_tokens == 12
    assert response.usage.prompt_tokens == len(serve_model.tokenizer("The sky is")["input_ids"])


def test_streamed_completion_and_token_prompt(client):
    ids = [40, 41, 42, 43]
    whole = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=20, temperature=0)
    streamed = client.completions.create(model=MODEL_NAME, prompt=[ids], max_tokens=20, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == whole.choices[0].text
    assert whole.usage.prompt_tokens == 4


def test_models_list_and_card(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_stop_strings_cut_the_answer(client, serve_model):
    full = client.completions.create(model=MODEL_NAME, prompt="The sky is", max_tokens=30, temperature=0)
    text = full.choices[0].text
    at = next(i for i in range(3, len(text) - 1) if text.find(text[i : i + 2]) == i)  # a stop first seen late
    stop = text[at : at + 2]
    cut = client.completions.create(
        model=MODEL_NAME, prompt="The sky is", max_tokens=30, temperature=0, stop=["zz", stop]
    )
    assert cut.choices[0].text == text[:at]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens


def test_without_max_tokens_a_chat_answer_may_fill_the_context(client, serve_model):
    messages = [{"role": "user", "content": "x" * 200}]
    prompt_len = serve_model.encode_prompt(messages).numel()
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages)
    assert response.usage.prompt_tokens == prompt_len
    assert response.usage.completion_tokens == serve_model.context_length - prompt_len
    assert response.choices[0].finish_reason == "length"


def test_health_and_metrics(server, client):
    client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=5)
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics", timeout=10).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['medusa_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert samples["medusa_generated_tokens_total"] >= 5
    assert samples["medusa_decoding_steps_total"] >= 1
    assert samples["medusa_accepted_tokens_total"] >= samples["medusa_decoding_steps_total"]
    assert samples["medusa_time_to_first_token_seconds_count"] >= 1
    assert (
        samples['medusa_request_latency_seconds_bucket{le="+Inf"}'] == samples["medusa_request_latency_seconds_count"]
    )
    assert samples["medusa_generation_running"] == 0
    # Every admitted request waited in line some time, and joined in a prefill of one or more.
    assert samples["medusa_request_queue_seconds_count"] >= samples["medusa_prefill_batch_size_count"] >= 1
    assert samples["medusa_prefill_batch_size_sum"] == samples["medusa_request_queue_seconds_count"]
    # Where the worker's time went: the prefill, the steps and the hand-over of chunks each took some.
    phases = {
        phase: samples[f'medusa_worker_seconds_total{{phase="{phase}"}}'] for phase in ("admit", "step", "events")
    }
    assert all(seconds > 0 for seconds in phases.values()), phases


def test_api_key(serve_model):
    with running_server(serve_model, api_key="sekret") as keyed:
        good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sekret", max_retries=0, timeout=30)
        assert good.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).usage.completion_tokens == 2
        bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            bad.models.list()
        missing = httpx.get(keyed.url + "/v1/models", timeout=10)
        assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]["message"]
        assert httpx.get(keyed.url + "/health", timeout=10).status_code == 200  # probes need no key


def test_sampling_with_a_seed_is_reproducible(client):
    def answer(seed: int, **options) -> str:
        response = client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=24, temperature=1.0, seed=seed, **options
        )
        return response.choices[0].message.content

    first = answer(7)
    assert answer(7) == first
    assert len({answer(seed) for seed in (1, 2, 3)} | {first}) > 1  # sampling really samples
    greedy = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=24, temperature=0)
    assert answer(5, top_p=1e-6) == greedy.choices[0].message.content  # top-p that keeps one token is greedy
