"""``medusa chat``: history, /reset and /exit, the system prompt, scripted and interactive use."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from helpers.tiny_chat import make_chat_model
from medusa import cli
from medusa.commands import chat as chat_command
from medusa.errors import MedusaError
from medusa.model import GenerationConfig


@pytest.fixture(scope="module")
def model():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_chat_model()
    torch.set_num_threads(previous)


@pytest.fixture
def prompts(model, monkeypatch) -> list:
    """The conversations the model was asked to continue (the tiny model's answers barely depend on them)."""
    seen, stream = [], model.stream

    def spy(prompt, config=None, **options):
        seen.append(copy.deepcopy(prompt))
        return stream(prompt, config, **options)

    monkeypatch.setattr(model, "stream", spy)
    return seen


@pytest.fixture
def run_chat(model, prompts, monkeypatch, capsys):
    def run(stdin: str, *flags: str, tty: bool = False) -> tuple[int, str, str]:
        monkeypatch.setattr(chat_command, "load_model", lambda args: model)
        stream = io.StringIO(stdin)
        stream.isatty = lambda: tty
        monkeypatch.setattr("sys.stdin", stream)
        code = cli.main(["chat", "--max-new-tokens", "12", *flags])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def answer(model, messages: list[dict]) -> str:
    return model.generate(messages, max_new_tokens=12).text


def test_scripted_chat_keeps_history_and_resets(run_chat, model, prompts):
    code, out, err = run_chat("hello\n\nhow are you\n/reset\nhello\n/exit\nnever answered\n")
    hello = [{"role": "user", "content": "hello"}]
    first = answer(model, hello)
    second_prompt = hello + [{"role": "assistant", "content": first}, {"role": "user", "content": "how are you"}]
    assert prompts[:3] == [hello, second_prompt, hello]  # the third is a fresh conversation
    second = answer(model, second_prompt)
    assert code == 0
    assert out == f"{first}\n{second}\n{first}\n"  # the answers only
    assert err.count("tokens/s") == 3 and "accepted tokens per step" in err and "(conversation reset)" in err


def test_system_prompt_is_kept_across_reset(run_chat, model, prompts):
    code, out, _ = run_chat("hi\n/reset\nhi\n", "--system", "You are terse.")
    conversation = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]
    assert prompts == [conversation, conversation]
    expected = answer(model, conversation)
    assert code == 0 and out == f"{expected}\n{expected}\n"


def test_a_turn_over_the_context_is_reported_and_the_chat_goes_on(run_chat, model, prompts):
    code, out, err = run_chat("x" * 300 + "\nhello\n")
    assert code == 2
    assert "context" in err and "medusa chat: error:" in err
    assert prompts[1] == [{"role": "user", "content": "hello"}]  # the failed turn left no trace
    assert out == answer(model, prompts[1]) + "\n"


def test_sampling_flags_reach_the_model(run_chat):
    runs = [run_chat("hello\n", "--temperature", "1", "--seed", str(seed))[1] for seed in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_interactive_chat_streams_with_a_status_line(run_chat, model):
    code, out, _ = run_chat("hello\n/help\n/exit\n", tty=True)
    assert code == 0
    assert answer(model, [{"role": "user", "content": "hello"}]) in out
    assert "tokens/s" in out and "accepted tokens per step" in out
    assert "unknown command /help" in out


def test_a_tokenizer_without_chat_template_is_refused(model):
    template, model.tokenizer.chat_template = model.tokenizer.chat_template, None
    try:
        with pytest.raises(MedusaError, match="chat template"):
            chat_command.ChatSession(model, GenerationConfig())
    finally:
        model.tokenizer.chat_template = template
