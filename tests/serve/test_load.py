"""Under load and faults: 32 clients at once, clients that leave mid-stream, requests past the time limit."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from helpers.serve import MODEL_NAME, make_slow_model, running_server

CLIENTS = 32
PROMPT = "Tell me a story."


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def streamed_text(response: httpx.Response) -> str:
    text = ""
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            text += json.loads(line[6:])["choices"][0]["text"]
    return text


def test_32_clients_at_once_each_complete_or_get_429(serve_model):
    expected = serve_model.generate(PROMPT, max_new_tokens=16, chat_template=False).text
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    results: list[tuple[int, str] | Exception] = [None] * CLIENTS
    with (
        running_server(serve_model, max_waiting=6) as server,
        httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=CLIENTS)) as http,
    ):  # one pool, one connection per client thread (a client each would cost seconds of TLS setup)
        barrier = threading.Barrier(CLIENTS)

        def client(index: int) -> None:
            try:
                barrier.wait(timeout=30)
                if index % 2:  # half stream
                    with http.stream("POST", "/v1/completions", json=dict(body, stream=True)) as response:
                        text = streamed_text(response) if response.status_code == 200 else response.read().decode()
                        results[index] = (response.status_code, text)
                else:
                    response = http.post("/v1/completions", json=body)
                    ok = response.status_code == 200
                    results[index] = (
                        response.status_code,
                        response.json()["choices"][0]["text"] if ok else response.text,
                    )
                    if response.status_code == 429:
                        assert int(response.headers["retry-after"]) >= 1
            except Exception as error:  # noqa: BLE001  (reported below)
                results[index] = error

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(1.0, 90 - (time.monotonic() - started)))
        assert not any(thread.is_alive() for thread in threads), "a client hung"
        assert not [r for r in results if isinstance(r, Exception)], results
        statuses = [status for status, _ in results]
        assert set(statuses) <= {200, 429}, statuses
        assert all(text == expected for status, text in results if status == 200)
        assert all("the server is busy" in text for status, text in results if status == 429)
        assert statuses.count(200) >= 7  # one running + six waiting were always admitted
        assert statuses.count(429) >= 1  # 32 at once do not fit in a line of 6
        # The server is still up and idle.
        after = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert after.status_code == 200 and after.json()["choices"][0]["text"] == expected
        assert metric(server.url, "medusa_queue_waiting") == 0
        assert metric(server.url, "medusa_generation_running") == 0


@pytest.fixture(scope="module")
def slow_server(one_thread):
    """Each forward pass takes 40 ms or more: 200 tokens take several seconds."""
    with running_server(make_slow_model(0.04), max_tokens_cap=200, max_waiting=4, request_timeout=30) as server:
        yield server


def quick_request_seconds(url: str) -> float:
    started = time.monotonic()
    response = httpx.post(
        url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}, timeout=30
    )
    assert response.status_code == 200
    return time.monotonic() - started


def test_a_client_leaving_mid_stream_frees_the_model(slow_server):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "stream": True}
    with httpx.Client(base_url=slow_server.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk
            assert '"content"' in next(line for line in lines if line)  # generation is under way
        # leaving the block closes the connection mid-stream
    assert quick_request_seconds(slow_server.url) < 2.0  # not the seconds the 200 tokens would take
    deadline = time.monotonic() + 5
    while metric(slow_server.url, 'medusa_generations_total{finish_reason="cancelled"}') < 1:
        assert time.monotonic() < deadline, "the abandoned stream was not cancelled"
        time.sleep(0.05)


def test_a_client_dropping_the_socket_frees_the_model(slow_server):
    """The rudest disconnect: a raw socket closed while the answer streams."""
    body = json.dumps({"model": MODEL_NAME, "prompt": "go", "max_tokens": 200, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", slow_server.port), timeout=10) as raw:
        raw.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert b"200 OK" in raw.recv(4096)
        time.sleep(0.3)
    assert quick_request_seconds(slow_server.url) < 2.0


def test_a_waiting_non_streamed_client_that_gives_up_frees_the_model(slow_server):
    body = {"model": MODEL_NAME, "prompt": "go", "max_tokens": 200}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.url + "/v1/completions", json=body, timeout=0.5)
    assert quick_request_seconds(slow_server.url) < 2.0


def test_requests_past_the_time_limit_get_an_error(one_thread):
    with running_server(make_slow_model(0.04), max_tokens_cap=200, request_timeout=0.6) as server:
        body = {"model": MODEL_NAME, "prompt": "go", "max_tokens": 200}
        response = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert response.status_code == 504
        assert "limit of 0.6 seconds" in response.json()["error"]["message"]
        with httpx.stream("POST", server.url + "/v1/completions", json=dict(body, stream=True), timeout=30) as response:
            events = [line for line in response.iter_lines() if line]
        assert "limit of 0.6 seconds" in events[-2] and '"error"' in events[-2]
        assert events[-1] == "data: [DONE]"
        assert quick_request_seconds(server.url) < 2.0


def wait_until_idle(server, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while server.engine.running or server.engine.waiting:
        assert time.monotonic() < deadline, "the abandoned choices were not cancelled"
        time.sleep(0.05)


def test_n_choices_that_do_not_fit_the_line_get_429_and_all_leave_with_their_client(slow_server):
    """The slow server's line holds 5 (a batch of 1 plus 4 waiting): n=5 fits an idle line but not one with a
    generation running; the 5 jobs go in together or not at all, and all of them leave when the client does."""
    body = {"model": MODEL_NAME, "prompt": "go", "max_tokens": 200, "stream": True}
    with httpx.Client(base_url=slow_server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert '"text"' in next(line for line in response.iter_lines() if line)  # running now
            refused = http.post("/v1/completions", json=dict(body, n=5, stream=False))
            assert refused.status_code == 429 and "this request needs 5 places" in refused.json()["error"]["message"]
            assert slow_server.engine.waiting == 0  # none of the five went in
        wait_until_idle(slow_server)
        with http.stream("POST", "/v1/completions", json=dict(body, n=5)) as response:
            lines = response.iter_lines()
            assert '"text"' in next(line for line in lines if line)
            assert slow_server.engine.running + slow_server.engine.waiting == 5
        # leaving the block closes the connection mid-stream: every choice is cancelled, running or waiting
        wait_until_idle(slow_server)
    assert quick_request_seconds(slow_server.url) < 2.0


def test_a_non_streamed_client_giving_up_cancels_all_its_choices(slow_server):
    body = {"model": MODEL_NAME, "prompt": "go", "max_tokens": 200, "n": 3}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.url + "/v1/completions", json=body, timeout=0.5)
    wait_until_idle(slow_server)
