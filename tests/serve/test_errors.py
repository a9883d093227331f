"""Bad requests get the right 4xx, in OpenAI's error shape, with a message naming the problem; the
server answers a normal request right after each."""

from __future__ import annotations

import json

import httpx
import pytest

from helpers.serve import MODEL_NAME

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def chat(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": USER, "max_tokens": 4, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 4, **fields}


# (name, method, path, body: dict or raw bytes, status, words the message must contain, param)
CASES = [
    ("malformed JSON", "POST", CHAT, b'{"model": "tiny", "messages": [', 400, "not valid JSON", None),
    ("empty body", "POST", CHAT, b"", 400, "body is empty", None),
    ("body not an object", "POST", CHAT, b'[{"role": "user"}]', 400, "must be a JSON object", None),
    ("body not UTF-8", "POST", CHAT, b'{"model": "\xff\xfe"}', 400, "not UTF-8", None),
    (
        "missing messages",
        "POST",
        CHAT,
        {"model": MODEL_NAME},
        400,
        "missing required parameter: 'messages'",
        "messages",
    ),
    ("missing model", "POST", CHAT, {"messages": USER}, 400, "'model'", "model"),
    ("empty messages", "POST", CHAT, chat(messages=[]), 400, "at least 1", "messages"),
    ("messages not a list", "POST", CHAT, chat(messages="hi"), 400, "valid list", "messages"),
    (
        "unknown role",
        "POST",
        CHAT,
        chat(messages=[{"role": "wizard", "content": "hi"}]),
        400,
        "'user'",
        "messages[0].role",
    ),
    (
        "tool role",
        "POST",
        CHAT,
        chat(messages=[{"role": "tool", "content": "x"}]),
        400,
        "'assistant'",
        "messages[0].role",
    ),
    (
        "message without content",
        "POST",
        CHAT,
        chat(messages=[{"role": "user"}]),
        400,
        "'messages[0].content'",
        "messages[0].content",
    ),
    (
        "image content",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "'image_url' are not supported",
        "messages[0].content",
    ),
    (
        "content a number",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": 7}]),
        400,
        "content must be a string",
        "messages[0].content",
    ),
    ("negative max_tokens", "POST", CHAT, chat(max_tokens=-5), 400, "greater than or equal to 1", "max_tokens"),
    (
        "zero max_completion_tokens",
        "POST",
        CHAT,
        chat(max_completion_tokens=0),
        400,
        "greater than or equal to 1",
        "max_completion_tokens",
    ),
    ("huge max_tokens", "POST", CHAT, chat(max_tokens=10**6), 400, "limit of 200 tokens", "max_tokens"),
    (
        "huge max_completion_tokens",
        "POST",
        CHAT,
        chat(max_completion_tokens=5000),
        400,
        "limit of 200 tokens",
        "max_completion_tokens",
    ),
    ("max_tokens a string", "POST", CHAT, chat(max_tokens="10"), 400, "valid integer", "max_tokens"),
    ("max_tokens a float", "POST", COMPLETIONS, completion(max_tokens=2.5), 400, "valid integer", "max_tokens"),
    ("temperature too high", "POST", CHAT, chat(temperature=3), 400, "less than or equal to 2", "temperature"),
    ("temperature negative", "POST", CHAT, chat(temperature=-0.1), 400, "greater than or equal to 0", "temperature"),
    ("temperature a word", "POST", CHAT, chat(temperature="hot"), 400, "valid number", "temperature"),
    ("top_p zero", "POST", CHAT, chat(top_p=0), 400, "greater than 0", "top_p"),
    ("top_k negative", "POST", CHAT, chat(top_k=-5), 400, "greater than or equal to -1", "top_k"),
    ("seed a float", "POST", CHAT, chat(seed=1.5), 400, "valid integer", "seed"),
    ("stream not a bool", "POST", CHAT, chat(stream="yes"), 400, "valid boolean", "stream"),
    (
        "stream_options without stream",
        "POST",
        CHAT,
        chat(stream_options={"include_usage": True}),
        400,
        "only allowed when stream is true",
        "stream_options",
    ),
    ("n zero", "POST", CHAT, chat(n=0), 400, "greater than or equal to 1", "n"),
    ("n over the line", "POST", CHAT, chat(n=18), 400, "n is 18, over this server's limit of 17 choices", "n"),
    ("n over the line, completions", "POST", COMPLETIONS, completion(n=1000), 400, "limit of 17 choices", "n"),
    ("logprobs a number on chat", "POST", CHAT, chat(logprobs=3), 400, "valid boolean", "logprobs"),
    (
        "top_logprobs without logprobs",
        "POST",
        CHAT,
        chat(top_logprobs=3),
        400,
        "top_logprobs needs logprobs",
        "top_logprobs",
    ),
    (
        "top_logprobs with logprobs false",
        "POST",
        CHAT,
        chat(logprobs=False, top_logprobs=0),
        400,
        "set logprobs to true",
        "top_logprobs",
    ),
    (
        "top_logprobs 21",
        "POST",
        CHAT,
        chat(logprobs=True, top_logprobs=21),
        400,
        "less than or equal to 20",
        "top_logprobs",
    ),
    (
        "top_logprobs negative",
        "POST",
        CHAT,
        chat(logprobs=True, top_logprobs=-1),
        400,
        "greater than or equal to 0",
        "top_logprobs",
    ),
    (
        "completion logprobs 21",
        "POST",
        COMPLETIONS,
        completion(logprobs=21),
        400,
        "less than or equal to 20",
        "logprobs",
    ),
    ("completion logprobs true", "POST", COMPLETIONS, completion(logprobs=True), 400, "valid integer", "logprobs"),
    ("max_tokens 0 without echo", "POST", COMPLETIONS, completion(max_tokens=0), 400, "only with echo", "max_tokens"),
    ("max_tokens 0 on chat", "POST", CHAT, chat(max_tokens=0), 400, "greater than or equal to 1", "max_tokens"),
    ("tools", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "tools"),
    ("tool_choice", "POST", CHAT, chat(tool_choice="required"), 400, "tool_choice", "tool_choice"),
    ("functions", "POST", CHAT, chat(functions=[{"name": "f"}]), 400, "functions", "functions"),
    (
        "JSON mode",
        "POST",
        CHAT,
        chat(response_format={"type": "json_object"}),
        400,
        "'json_object' is not supported",
        "response_format",
    ),
    ("logit_bias", "POST", CHAT, chat(logit_bias={"5": 10}), 400, "logit_bias is not supported", "logit_bias"),
    ("presence_penalty", "POST", CHAT, chat(presence_penalty=0.5), 400, "presence_penalty", "presence_penalty"),
    ("frequency_penalty", "POST", CHAT, chat(frequency_penalty=-1), 400, "frequency_penalty", "frequency_penalty"),
    ("five stop strings", "POST", CHAT, chat(stop=list("abcde")), 400, "at most 4 strings", "stop"),
    ("empty stop string", "POST", CHAT, chat(stop=[""]), 400, "must not be empty", "stop"),
    ("stop a number", "POST", CHAT, chat(stop=5), 400, "string or a list of strings", "stop"),
    ("unknown field", "POST", CHAT, chat(foo=1), 400, "unrecognized request argument supplied: 'foo'", "foo"),
    ("unknown model", "POST", CHAT, chat(model="gpt-4"), 404, "'gpt-4' does not exist", "model"),
    (
        "prompt over the context",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": "x" * 300}]),
        400,
        "over the model's context length of 256",
        "messages",
    ),
    (
        "prompt plus max_tokens over the context",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": "x" * 200}], max_tokens=150),
        400,
        "ask for at most",
        "max_tokens",
    ),
    ("best_of", "POST", COMPLETIONS, completion(best_of=3), 400, "best_of=3 is not supported", "best_of"),
    ("suffix", "POST", COMPLETIONS, completion(suffix="end"), 400, "suffix", "suffix"),
    ("batched prompts", "POST", COMPLETIONS, completion(prompt=["a", "b"]), 400, "batch of 2", "prompt"),
    ("empty prompt", "POST", COMPLETIONS, completion(prompt=""), 400, "the prompt is empty", "prompt"),
    ("token id out of range", "POST", COMPLETIONS, completion(prompt=[5, 999]), 400, "lie in [0, 256)", "prompt"),
    ("prompt an object", "POST", COMPLETIONS, completion(prompt={"text": "hi"}), 400, "prompt must be", "prompt"),
    (
        "completion prompt over the context",
        "POST",
        COMPLETIONS,
        completion(prompt="y" * 400),
        400,
        "context length of 256",
        "prompt",
    ),
    ("wrong method", "GET", CHAT, None, 405, "not allowed", None),
    ("unknown endpoint", "POST", "/v1/embeddings", completion(), 404, "no such endpoint", None),
    (
        "body too large",
        "POST",
        COMPLETIONS,
        b"{" + b" " * (4 * 1024 * 1024) + b"}",
        413,
        "over this server's limit",
        None,
    ),
]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.mark.parametrize("name, method, path, body, status, words, param", CASES, ids=[case[0] for case in CASES])
def test_bad_request_is_refused_with_a_clear_error(http, name, method, path, body, status, words, param):
    if isinstance(body, bytes):
        response = http.request(method, path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.request(method, path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    # ... and the server is fine: a normal request right after succeeds.
    ok = http.post(COMPLETIONS, json=completion(max_tokens=2))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_there_are_many_kinds_of_bad_request():
    assert len({case[0] for case in CASES}) >= 20


def test_form_encoded_json_is_still_read(http):
    """``curl -d`` sends a form content type; the body is JSON all the same."""
    body = json.dumps(completion(max_tokens=3)).encode()
    response = http.post(COMPLETIONS, content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


def test_messages_echoed_back_from_a_response_are_accepted(http):
    """Clients append the response's message, with its null extras, to the next request."""
    first = http.post(CHAT, json=chat()).json()["choices"][0]["message"]
    echoed = dict(first, refusal=None, annotations=None, audio=None, function_call=None, tool_calls=None)
    response = http.post(CHAT, json=chat(messages=USER + [echoed, {"role": "user", "content": "more"}]))
    assert response.status_code == 200, response.text


def test_content_parts_and_developer_role(http):
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    as_parts = http.post(
        CHAT, json=chat(messages=[{"role": "developer", "content": "sys"}, {"role": "user", "content": parts}])
    )
    as_text = http.post(
        CHAT, json=chat(messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}])
    )
    assert as_parts.status_code == 200
    assert as_parts.json()["choices"][0]["message"] == as_text.json()["choices"][0]["message"]
