"""The GGUF cache: one dequantised copy per file content (not per path), in the dtype used; listed and cleared."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.models import make_tiny_model
from helpers.text_model import make_tokenizer
from medusa.cli import main
from medusa.diskcache import cache_entries, gguf_key
from medusa.loading import load_base_model


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """Two copies of one "GGUF" file in two virtual environments (other mtimes); transformers' GGUF reader replaced
    by a tiny model, counting how often it dequantises."""
    monkeypatch.setenv("MEDUSA_CACHE_DIR", str(tmp_path / "cache"))
    content = os.urandom(1 << 16)
    copies = []
    for number, venv in enumerate(("venv-a", "venv-b")):
        path = tmp_path / venv / "site-packages" / "model.Q4.gguf"
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
        os.utime(path, (1_000_000 + number, 1_000_000 + number))
        copies.append(path)
    dequantised = []
    real_model, real_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def model_from_pretrained(source, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_model(source, *args, **kwargs)
        dequantised.append(gguf_file)
        return make_tiny_model("llama")

    def tokenizer_from_pretrained(source, *args, gguf_file=None, **kwargs):
        return make_tokenizer() if gguf_file is not None else real_tokenizer(source, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer_from_pretrained)
    return copies, dequantised


def test_one_copy_per_content_in_the_dtype_used(fake_gguf, tmp_path):
    (first, second), dequantised = fake_gguf
    model, _, _ = load_base_model(first, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    load_base_model(second, dtype="bfloat16", device="cpu")  # another venv, same file: the same entry
    assert len(dequantised) == 1
    (entry,) = cache_entries()
    assert entry.kind == "gguf" and entry.name.endswith("-bfloat16") and str(first) in entry.detail
    with safe_open(str(entry.path / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(name).get_dtype() for name in handle.keys()} == {"BF16"}
    second.write_bytes(os.urandom(1 << 16))  # other content: another key
    assert gguf_key(second) != gguf_key(first)


def test_cache_list_and_clear(fake_gguf, capsys):
    (first, _), _ = fake_gguf
    load_base_model(first, dtype="float32", device="cpu")
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    (entry,) = cache_entries()
    assert entry.name in out and "float32" in out and "1 entry," in out
    assert main(["cache", "clear", "nope"]) == 2
    assert "no cache entry named 'nope'" in capsys.readouterr().err
    assert main(["cache", "clear"]) == 0
    assert f"removed {entry.path}" in capsys.readouterr().out
    assert cache_entries() == [] and not entry.path.exists()
