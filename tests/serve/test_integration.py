"""The default model (SmolLM2-135M-Instruct) behind the real server: one short answer through the openai client."""

from __future__ import annotations

import openai
import pytest

from helpers.serve import RunningServer
from medusa.serve import EngineConfig, ServeSettings


@pytest.mark.integration
def test_default_model_answers_through_the_server(default_model):
    with RunningServer(default_model, ServeSettings(model_name="smollm2"), EngineConfig()) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        response = client.chat.completions.create(model="smollm2", messages=question, max_tokens=8, temperature=0)
    assert "Paris" in response.choices[0].message.content
    assert response.choices[0].message.content == default_model.generate(question, max_new_tokens=8).text
