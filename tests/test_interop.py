"""Interoperability: the original Medusa layout in and out, vLLM's layout out, and split base models.

The original-layout fixtures are written here from the documented names and shapes (FasterDecoding/Medusa
saves ``medusa_head.state_dict()`` of ``ModuleList[Sequential(ResBlock * L, Linear(H, V, bias=False))]``);
nothing is downloaded. vLLM itself is not run here: its test checks the exact names, shapes and config
fields that vLLM 0.32.0's ``Medusa.load_weights`` and ``MedusaConfig`` read, and that those tensors,
run the way vLLM's ``ResidualBlock`` runs them, give our heads' logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from helpers.models import EOS_ID, TINY_HIDDEN, TINY_VOCAB, make_tiny_model
from medusa.cli import main
from medusa.errors import MedusaError
from medusa.heads import MedusaHeads, MedusaHeadsConfig
from medusa.interop import (
    OFFICIAL_PICKLE,
    OFFICIAL_SAFETENSORS,
    VLLM_WEIGHTS,
    export_heads,
    foreign_layout,
    load_heads,
    load_heads_config,
    read_pickled_weights,
)
from medusa.model import GenerationConfig, MedusaModel, heads_device

PROMPT = [5, 17, 42, 99, 7, 64, 23]
NEW_TOKENS = 24


# ----- helpers ------------------------------------------------------------------------------------


def random_heads(num_heads: int = 3, num_layers: int = 1, share_lm_head: bool = False, seed: int = 0, base=None):
    """Heads near the base lm_head with random blocks: their proposals differ from head to head."""
    base = base if base is not None else make_tiny_model("llama")
    config = MedusaHeadsConfig(
        hidden_size=TINY_HIDDEN,
        vocab_size=TINY_VOCAB,
        num_heads=num_heads,
        num_layers=num_layers,
        share_lm_head=share_lm_head,
        base_model="tiny-llama",
    )
    heads = MedusaHeads(config, base_lm_head=base.get_output_embeddings())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in heads.named_parameters():
            scale = 0.02 if name.startswith("projections") else 0.2
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return base, heads


def official_fixture(directory: Path, num_heads: int, num_layers: int, seed: int = 1, pickle: bool = False) -> dict:
    """An original-layout checkpoint built by hand from the documented key names and shapes."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(num_heads):
        for j in range(num_layers):
            state[f"{i}.{j}.linear.weight"] = 0.2 * torch.randn(TINY_HIDDEN, TINY_HIDDEN, generator=generator)
            state[f"{i}.{j}.linear.bias"] = 0.2 * torch.randn(TINY_HIDDEN, generator=generator)
        state[f"{i}.{num_layers}.weight"] = 0.5 * torch.randn(TINY_VOCAB, TINY_HIDDEN, generator=generator)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"medusa_num_heads": num_heads, "medusa_num_layers": num_layers, "base_model_name_or_path": "tiny-llama"}
    (directory / "config.json").write_text(json.dumps(config))
    if pickle:
        torch.save(state, directory / OFFICIAL_PICKLE)
    else:
        save_file(state, str(directory / OFFICIAL_SAFETENSORS))
    return state


def original_head_logits(state: dict, num_heads: int, num_layers: int, hidden: torch.Tensor) -> torch.Tensor:
    """The original project's forward for head i: ResBlocks ``x + SiLU(W x + b)``, then the projection."""
    out = []
    for i in range(num_heads):
        x = hidden
        for j in range(num_layers):
            x = x + torch.nn.functional.silu(x @ state[f"{i}.{j}.linear.weight"].T + state[f"{i}.{j}.linear.bias"])
        out.append(x @ state[f"{i}.{num_layers}.weight"].T)
    return torch.stack(out)


def vllm_head_logits(state: dict, config: dict, hidden: torch.Tensor) -> torch.Tensor:
    """vLLM's ``Medusa``: per head, ``x = x + act(layer(x))`` over its layers, then its lm_head (or the shared one)."""
    out = []
    for i in range(config["num_heads"]):
        x = hidden
        for j in range(config["num_hidden_layers"]):
            bias = state[f"blocks.{i}.layers.{j}.bias"] if config["medusa_fc_bias"] else 0
            x = x + torch.nn.functional.silu(x @ state[f"blocks.{i}.layers.{j}.weight"].T + bias)
        projection = state["lm_head.weight"] if config.get("original_lm_head") else state[f"lm_heads.{i}.weight"]
        out.append(x @ projection.T)
    return torch.stack(out)


def behaviour(model: MedusaModel) -> tuple:
    """What a user sees and what the heads decide: tokens, tokens accepted per step, first proposal, head logits."""
    result = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, chat_template=False)
    engine = model.engine(max_length=len(PROMPT) + NEW_TOKENS)
    generation = model.prepare(PROMPT, GenerationConfig(max_new_tokens=NEW_TOKENS, chat_template=False))
    engine.add([generation])
    with torch.inference_mode():
        proposal = engine.decoder.propose(1, engine.decoder.trees[1]).tolist()
        logits = model.heads(engine.decoder.last_hidden[:1])
    engine.finish([generation])
    return result.token_ids, result.stats.accepted_per_step, proposal, logits


def assert_same_behaviour(a: MedusaModel, b: MedusaModel) -> None:
    tokens_a, accepted_a, proposal_a, logits_a = behaviour(a)
    tokens_b, accepted_b, proposal_b, logits_b = behaviour(b)
    assert tokens_a == tokens_b
    assert accepted_a == accepted_b
    assert proposal_a == proposal_b
    # Heads sharing the lm_head project all heads in one matmul, per-head projections one by one: equal to rounding.
    torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=1e-5)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Enough of a tokenizer for a saved tiny model directory to load (export never tokenizes)."""
    specials = ["<pad>", "<s>", "<unk>", "</s>"]
    vocab = {token: index for index, token in enumerate(specials + [f"w{i}" for i in range(TINY_VOCAB - 4)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tokenizer.eos_token_id == EOS_ID
    return tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models decode fastest on one thread, and much faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_model("llama")
    model.generation_config.eos_token_id = EOS_ID
    model.save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return directory


# ----- the original layout in ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pickle", "num_layers"), [(False, 0), (False, 1), (True, 2)], ids=["safetensors-0", "safetensors-1", "pt-2"]
)
def test_official_checkpoint_loads_and_matches_our_format(tmp_path, num_layers, pickle):
    base = make_tiny_model("llama")
    state = official_fixture(tmp_path / "official", num_heads=3, num_layers=num_layers, pickle=pickle)
    assert foreign_layout(tmp_path / "official") == "medusa"
    official = MedusaModel.from_pretrained(base, heads=tmp_path / "official")
    assert official.heads.config.num_heads == 3 and official.heads.config.num_layers == num_layers
    assert official.heads.config.base_model == "tiny-llama"

    hidden = torch.randn(5, TINY_HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(official.heads(hidden), original_head_logits(state, 3, num_layers, hidden))

    # The same tensors put into our own layout by hand, saved and loaded: the same behaviour throughout.
    config = MedusaHeadsConfig(hidden_size=TINY_HIDDEN, vocab_size=TINY_VOCAB, num_heads=3, num_layers=num_layers)
    ours = MedusaHeads(config)
    with torch.no_grad():
        for i in range(3):
            for j in range(num_layers):
                ours.blocks[i][j].linear.weight.copy_(state[f"{i}.{j}.linear.weight"])
                ours.blocks[i][j].linear.bias.copy_(state[f"{i}.{j}.linear.bias"])
            ours.projections[i].weight.copy_(state[f"{i}.{num_layers}.weight"])
    ours.save_pretrained(tmp_path / "ours")
    assert_same_behaviour(official, MedusaModel.from_pretrained(base, heads=tmp_path / "ours"))


def test_load_heads_reads_the_official_layout(tmp_path):
    state = official_fixture(tmp_path, num_heads=2, num_layers=1)
    heads = load_heads(tmp_path)
    assert torch.equal(heads.blocks[1][0].linear.bias, state["1.0.linear.bias"])
    assert torch.equal(heads.projections[0].weight, state["0.1.weight"])
    assert load_heads_config(tmp_path) == heads.config


def test_medusa_heads_reads_only_our_layout_and_names_the_loader_for_the_others(tmp_path):
    official_fixture(tmp_path, num_heads=2, num_layers=1)
    with pytest.raises(MedusaError, match="original Medusa project's layout.*medusa.interop.load_heads"):
        MedusaHeads.from_pretrained(tmp_path)
    with pytest.raises(MedusaError, match="original Medusa project's layout.*medusa.interop.load_heads"):
        MedusaHeadsConfig.load(tmp_path)


def test_safetensors_wins_over_pt_when_both_are_there(tmp_path):
    state = official_fixture(tmp_path, num_heads=2, num_layers=1)
    torch.save({name: torch.zeros_like(tensor) for name, tensor in state.items()}, tmp_path / OFFICIAL_PICKLE)
    heads = load_heads(tmp_path)
    assert torch.equal(heads.projections[1].weight, state["1.1.weight"])


def test_heads_beyond_the_config_are_ignored(tmp_path):
    """Published configs can name fewer heads than the file holds; TensorRT-LLM and vLLM follow the config."""
    official_fixture(tmp_path, num_heads=4, num_layers=1)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "medusa_num_heads": 2}))
    assert load_heads(tmp_path).config.num_heads == 2


class RunsCode:
    """Unpickling this would create the marker file: a stand-in for a checkpoint that carries code."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("payload", ["object", "function"])
def test_pt_with_pickled_code_is_refused(tmp_path, payload):
    directory = tmp_path / "heads"
    state = official_fixture(directory, num_heads=2, num_layers=1, pickle=True)
    marker = tmp_path / "code-ran"
    evil = RunsCode()
    evil.marker = marker
    state["extra"] = evil if payload == "object" else os.system
    torch.save(state, directory / OFFICIAL_PICKLE)
    with pytest.raises(MedusaError, match="refused .*medusa_lm_head.pt: it pickles `.+`"):
        MedusaModel.from_pretrained(make_tiny_model("llama"), heads=directory)
    with pytest.raises(MedusaError, match="weights_only=True"):
        read_pickled_weights(directory / OFFICIAL_PICKLE)
    assert not marker.exists()


def test_pt_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / OFFICIAL_PICKLE
    torch.save([torch.zeros(2)], path)
    with pytest.raises(MedusaError, match="not hold a state dict"):
        read_pickled_weights(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(MedusaError, match="could not read"):
        read_pickled_weights(path)


def test_missing_and_misshapen_official_tensors_are_named(tmp_path):
    state = official_fixture(tmp_path, num_heads=2, num_layers=1)
    del state["1.0.linear.bias"]
    save_file(state, str(tmp_path / OFFICIAL_SAFETENSORS))
    with pytest.raises(MedusaError, match=r"lacks tensor '1.0.linear.bias' \(expected shape \[64\]\)"):
        load_heads(tmp_path)
    state["1.0.linear.bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / OFFICIAL_SAFETENSORS))
    with pytest.raises(MedusaError, match=r"'1.0.linear.bias' has shape \[3\], expected \[64\]"):
        load_heads(tmp_path)


def test_official_config_without_weights_names_both_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    with pytest.raises(MedusaError, match="neither medusa_lm_head.safetensors nor medusa_lm_head.pt"):
        MedusaModel.from_pretrained(make_tiny_model("llama"), heads=tmp_path)


def test_official_heads_for_another_model_are_rejected(tmp_path):
    official_fixture(tmp_path, num_heads=2, num_layers=1)
    base = make_tiny_model("llama")
    base.resize_token_embeddings(TINY_VOCAB + 64)
    with pytest.raises(
        MedusaError, match=f"heads vocabulary {TINY_VOCAB} does not match the base model's {TINY_VOCAB + 64}"
    ):
        MedusaModel.from_pretrained(base, heads=tmp_path)


# ----- the original layout out, and back ----------------------------------------------------------


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("share_lm_head", [False, True], ids=["own-projections", "shared-lm-head"])
def test_round_trip_ours_official_ours(tmp_path, num_layers, share_lm_head):
    base, heads = random_heads(num_heads=3, num_layers=num_layers, share_lm_head=share_lm_head)
    ours = MedusaModel(base, None, heads, tree="16")
    export_heads(ours, tmp_path / "official", format="medusa", allow_lossy=num_layers > 1)

    written = load_file(str(tmp_path / "official" / OFFICIAL_SAFETENSORS))
    expected_names = {f"{i}.{j}.linear.{p}" for i in range(3) for j in range(num_layers) for p in ("weight", "bias")}
    expected_names |= {f"{i}.{num_layers}.weight" for i in range(3)}
    assert set(written) == expected_names
    config = json.loads((tmp_path / "official" / "config.json").read_text())
    assert config["medusa_num_heads"] == 3 and config["medusa_num_layers"] == num_layers
    assert config["base_model_name_or_path"] == "tiny-llama"
    pickled = torch.load(tmp_path / "official" / OFFICIAL_PICKLE, weights_only=True)  # the same tensors
    assert pickled.keys() == written.keys() and all(torch.equal(pickled[k], written[k]) for k in written)

    # The exported tree.json, read explicitly: untuned heads on a CPU decode with a small tree (choose_tree).
    back = MedusaModel.from_pretrained(base, heads=tmp_path / "official", tree=tmp_path / "official" / "tree.json")
    assert back.tree.paths == ours.tree.paths
    for name, tensor in ours.heads.state_dict().items():
        assert torch.equal(back.heads.state_dict()[name], tensor)
    lm_weight = base.get_output_embeddings().weight
    for i in range(3):
        projection = lm_weight if share_lm_head else ours.heads.projections[i].weight
        assert torch.equal(back.heads.projections[i].weight, projection)
    assert_same_behaviour(ours, back)


class OriginalResBlock(torch.nn.Module):
    """FasterDecoding/Medusa's ``ResBlock``: ``x + SiLU(linear(x))``."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, hidden_size)
        self.act = torch.nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


def original_loader(directory: Path, hidden: int, vocab: int) -> torch.nn.ModuleList:
    """What the original ``MedusaModel`` does with a heads directory: build ``medusa_head`` from the config
    (one ``ResBlock`` repeated ``medusa_num_layers`` times per head) and load ``medusa_lm_head.pt`` into it."""
    config = json.loads((directory / "config.json").read_text())
    heads, layers = config["medusa_num_heads"], config["medusa_num_layers"]
    medusa_head = torch.nn.ModuleList(
        [
            torch.nn.Sequential(*([OriginalResBlock(hidden)] * layers), torch.nn.Linear(hidden, vocab, bias=False))
            for _ in range(heads)
        ]
    )
    medusa_head.load_state_dict(torch.load(directory / OFFICIAL_PICKLE, map_location="cpu"), strict=True)
    return medusa_head


@pytest.mark.parametrize("share_lm_head", [False, True], ids=["own-projections", "shared-lm-head"])
def test_the_original_loader_reads_our_export_exactly(tmp_path, share_lm_head):
    base, heads = random_heads(num_heads=3, num_layers=1, share_lm_head=share_lm_head)
    export_heads(MedusaModel(base, None, heads), tmp_path, format="medusa")
    medusa_head = original_loader(tmp_path, TINY_HIDDEN, TINY_VOCAB)
    hidden = torch.randn(2, 5, TINY_HIDDEN)
    with torch.no_grad():
        theirs = torch.stack([head(hidden) for head in medusa_head])
        torch.testing.assert_close(theirs, heads(hidden), rtol=0, atol=1e-5)


def test_heads_the_original_code_cannot_hold_are_refused_unless_allowed_then_warned(tmp_path):
    base, heads = random_heads(num_heads=2, num_layers=2)
    model = MedusaModel(base, None, heads)
    with pytest.raises(MedusaError, match="2 layers each.*shares one block.*--allow-lossy"):
        export_heads(model, tmp_path / "refused", format="medusa")
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    with pytest.warns(UserWarning, match="only each head's last block"):
        export_heads(model, tmp_path / "lossy", format="medusa", allow_lossy=True)
    medusa_head = original_loader(tmp_path / "lossy", TINY_HIDDEN, TINY_VOCAB)  # loads, but not our heads:
    hidden = torch.randn(2, 5, TINY_HIDDEN)
    with torch.no_grad():
        assert not torch.allclose(torch.stack([head(hidden) for head in medusa_head]), heads(hidden), atol=1e-3)
    export_heads(model, tmp_path / "vllm", format="vllm")  # vLLM's layout holds every layer: no question asked


def test_exported_projections_do_not_alias_the_base_weight(tmp_path):
    base, heads = random_heads(num_heads=2, share_lm_head=True)
    export_heads(MedusaModel(base, None, heads), tmp_path, format="medusa")
    back = MedusaModel.from_pretrained(base, heads=tmp_path)
    with torch.no_grad():
        back.heads.projections[0].weight.add_(1.0)
    assert not torch.equal(back.heads.projections[0].weight, base.get_output_embeddings().weight)


def test_export_writes_the_tree_without_its_lookup_chain(tmp_path):
    from medusa.tree import Tree

    base, heads = random_heads(num_heads=2)
    chained = Tree.from_paths([[0], [0, 0]], lookup=5)
    plain = Tree.from_paths([[0], [1], [0, 0]])
    export_heads(MedusaModel(base, None, heads, tree=chained, heads_tree=plain), tmp_path, format="medusa")
    assert json.loads((tmp_path / "tree.json").read_text())["paths"] == [[0], [1], [0, 0]]


def test_export_casts_to_the_requested_dtype(tmp_path):
    base, heads = random_heads(num_heads=2)
    export_heads(MedusaModel(base, None, heads), tmp_path, format="vllm", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(str(tmp_path / VLLM_WEIGHTS)).values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


# ----- vLLM's layout out --------------------------------------------------------------------------


@pytest.mark.parametrize("num_layers", [0, 1, 2])
@pytest.mark.parametrize("share_lm_head", [False, True], ids=["own-projections", "shared-lm-head"])
def test_vllm_export_has_exactly_what_vllm_reads(tmp_path, num_layers, share_lm_head):
    base, heads = random_heads(num_heads=3, num_layers=num_layers, share_lm_head=share_lm_head)
    model = MedusaModel(base, None, heads)
    export_heads(model, tmp_path, format="vllm")

    config = json.loads((tmp_path / "config.json").read_text())
    read_by_vllm = {
        "model_type": "medusa",  # AutoConfig -> vLLM's MedusaConfig; the draft method is detected from it
        "architectures": ["MedusaModel"],  # registry: MedusaModel -> vllm.model_executor.models.medusa.Medusa
        "hidden_size": TINY_HIDDEN,
        "vocab_size": TINY_VOCAB,
        "truncated_vocab_size": TINY_VOCAB,  # no token_map: the full vocabulary
        "num_heads": 3,
        "num_hidden_layers": num_layers,
        "medusa_fc_bias": True,  # without it vLLM builds bias-free layers and drops our biases
        "original_lm_head": share_lm_head,
    }
    assert {key: config[key] for key in read_by_vllm} == read_by_vllm
    # vLLM's MedusaConfig.from_pretrained renames any key with "num" and "heads"/"layers" in it.
    assert [k for k in config if "num" in k and ("heads" in k or "layers" in k)] == ["num_heads", "num_hidden_layers"]

    state = load_file(str(tmp_path / VLLM_WEIGHTS))
    expected = {
        f"blocks.{i}.layers.{j}.weight": (TINY_HIDDEN, TINY_HIDDEN) for i in range(3) for j in range(num_layers)
    }
    expected |= {f"blocks.{i}.layers.{j}.bias": (TINY_HIDDEN,) for i in range(3) for j in range(num_layers)}
    if share_lm_head:
        expected["lm_head.weight"] = (TINY_VOCAB, TINY_HIDDEN)
    else:
        expected |= {f"lm_heads.{i}.weight": (TINY_VOCAB, TINY_HIDDEN) for i in range(3)}
    assert {name: tuple(tensor.shape) for name, tensor in state.items()} == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", VLLM_WEIGHTS, "tree.json"]

    hidden = torch.randn(4, TINY_HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(vllm_head_logits(state, config, hidden), model.heads(hidden))


@pytest.mark.parametrize("share_lm_head", [False, True], ids=["own-projections", "shared-lm-head"])
def test_vllm_export_loads_back_with_the_same_behaviour(tmp_path, share_lm_head):
    base, heads = random_heads(num_heads=3, num_layers=1, share_lm_head=share_lm_head, seed=3)
    ours = MedusaModel(base, None, heads)
    export_heads(ours, tmp_path, format="vllm")
    assert foreign_layout(tmp_path) == "vllm"
    assert_same_behaviour(ours, MedusaModel.from_pretrained(base, heads=tmp_path, tree=tmp_path / "tree.json"))


def test_official_export_maps_onto_vllm_names(tmp_path):
    """vLLM 0.32 also serves the original layout (method "medusa"): its key remap must land on its own names."""
    base, heads = random_heads(num_heads=2, num_layers=2)
    model = MedusaModel(base, None, heads)
    export_heads(model, tmp_path / "official", format="medusa", allow_lossy=True)  # lossy for the original code only
    export_heads(model, tmp_path / "vllm", format="vllm")

    def remap(name: str) -> str:  # vLLM's documented rule for old FasterDecoding keys
        head, layer, *rest = name.split(".")
        return f"blocks.{head}.layers.{layer}.{rest[1]}" if rest[0] == "linear" else f"lm_heads.{head}.{rest[0]}"

    official = {remap(n): t for n, t in load_file(str(tmp_path / "official" / OFFICIAL_SAFETENSORS)).items()}
    vllm = load_file(str(tmp_path / "vllm" / VLLM_WEIGHTS))
    assert official.keys() == vllm.keys()
    assert all(torch.equal(official[name], vllm[name]) for name in vllm)
    config = json.loads((tmp_path / "official" / "config.json").read_text())
    assert (config["hidden_size"], config["vocab_size"], config["medusa_fc_bias"]) == (TINY_HIDDEN, TINY_VOCAB, True)


def test_unknown_format_is_named(tmp_path):
    base, heads = random_heads()
    with pytest.raises(MedusaError, match="unknown export format 'trt'; choose one of medusa, vllm"):
        export_heads(MedusaModel(base, None, heads), tmp_path, format="trt")


# ----- the CLI ------------------------------------------------------------------------------------


def test_cli_export_round_trip(tmp_path, tiny_dir, capsys):
    _, heads = random_heads(num_heads=2, share_lm_head=True)  # the same tiny llama as the saved one
    heads.save_pretrained(tmp_path / "ours")
    for fmt in ("medusa", "vllm"):
        code = main(
            [
                "export",
                "--heads",
                str(tmp_path / "ours"),
                "--model",
                str(tiny_dir),
                "--format",
                fmt,
                "--output",
                str(tmp_path / fmt),
            ]
        )
        assert code == 0
        assert "wrote 2 heads" in capsys.readouterr().out
    assert (tmp_path / "medusa" / OFFICIAL_SAFETENSORS).is_file() and (tmp_path / "vllm" / VLLM_WEIGHTS).is_file()
    ours = MedusaModel.from_pretrained(tiny_dir, heads=tmp_path / "ours", device="cpu")
    assert_same_behaviour(ours, MedusaModel.from_pretrained(tiny_dir, heads=tmp_path / "medusa", device="cpu"))

    # A second export into the same directory must be asked for.
    args = ["export", "--heads", str(tmp_path / "ours"), "--model", str(tiny_dir), "--output", str(tmp_path / "medusa")]
    assert main(args) == 2
    assert "already holds files; pass --force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0


def test_cli_export_of_deep_heads_needs_allow_lossy_and_warns(tmp_path, tiny_dir, capsys):
    _, heads = random_heads(num_heads=2, num_layers=2, share_lm_head=True)
    heads.save_pretrained(tmp_path / "ours")
    args = ["export", "--heads", str(tmp_path / "ours"), "--model", str(tiny_dir), "--output", str(tmp_path / "out")]
    assert main(args) == 2
    assert "--allow-lossy" in capsys.readouterr().err
    assert main(args + ["--allow-lossy"]) == 0
    assert "warning: exporting in the original Medusa layout" in capsys.readouterr().err
    assert (tmp_path / "out" / OFFICIAL_PICKLE).is_file()


def test_cli_export_names_a_missing_heads_directory(tmp_path, tiny_dir, capsys):
    code = main(
        ["export", "--heads", str(tmp_path / "nope"), "--model", str(tiny_dir), "--output", str(tmp_path / "o")]
    )
    assert code == 2
    assert f"heads directory {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


# ----- base models split over devices -------------------------------------------------------------


def test_device_map_auto_loads_and_decodes_losslessly(tiny_dir):
    _, heads = random_heads(num_heads=3, seed=5)
    model = MedusaModel.from_pretrained(tiny_dir, heads=heads, device_map="auto")  # all on the CPU here
    assert model.heads.device == model.base_model.get_output_embeddings().weight.device
    plain = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, chat_template=False, use_heads=False)
    medusa = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, chat_template=False)
    assert medusa.token_ids == plain.token_ids


def test_heads_go_to_the_lm_head_device_not_the_first_parameter():
    base = make_tiny_model("llama")
    base.lm_head.to("meta")  # stands in for a last GPU: only the lm_head moved
    assert heads_device(base) == torch.device("meta")
    assert next(base.parameters()).device == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (run on nvidia-h200-x2)")
@pytest.mark.parametrize("share_lm_head", [False, True], ids=["own-projections", "shared-lm-head"])
def test_split_over_two_gpus_is_lossless(tiny_dir, share_lm_head):
    device_map = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": 1,
        "model.norm": 1,
        "lm_head": 1,
    }
    _, heads = random_heads(num_heads=3, share_lm_head=share_lm_head, seed=7)
    model = MedusaModel.from_pretrained(tiny_dir, heads=heads, device_map=device_map, dtype="float32")
    assert {p.device.index for p in model.base_model.parameters()} == {0, 1}
    assert model.heads.device == torch.device("cuda", 1)
    for cuda_graphs in (True, False):  # graphs are turned off for split models either way
        plain = model.generate(PROMPT, max_new_tokens=64, chat_template=False, use_heads=False, cuda_graphs=cuda_graphs)
        medusa = model.generate(PROMPT, max_new_tokens=64, chat_template=False, cuda_graphs=cuda_graphs)
        assert medusa.token_ids == plain.token_ids
        # Some guesses were right, so accepted paths were compacted in a cache that spans both devices.
        assert medusa.stats.mean_accepted > 1
    reference = make_tiny_model("llama").to("cuda:0")
    ids = torch.tensor([PROMPT], device="cuda:0")
    expected = reference.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False, pad_token_id=0
    )[0, len(PROMPT) :].tolist()
    assert plain.token_ids == expected[: len(plain.token_ids)]


@pytest.mark.parametrize("fmt", ["medusa", "vllm"])
def test_export_keeps_the_heads_own_trees_not_this_devices_choice(tmp_path, tiny_dir, fmt):
    """Heads with a 64-node tree.json and a tuned tree for another device, exported on a CPU: the exported
    heads carry the source's tree.json and tuned_trees.json, and load the same tree as the source anywhere."""
    from medusa.tuned_trees import TUNED_FILE, TunedTree, read_tuned_trees, write_tuned_tree

    _, heads = random_heads(num_heads=2)
    source = tmp_path / "ours"
    MedusaModel(make_tiny_model("llama"), None, heads, tree="64").save_pretrained(source)
    write_tuned_tree(source, "Fancy GPU", TunedTree(nodes=3, topk=2, paths=[[0], [1]], num_heads=2))
    write_tuned_tree(source, "cpu", TunedTree(nodes=1, topk=1, paths=[], num_heads=2))
    assert (
        main(
            [
                "export",
                "--heads",
                str(source),
                "--model",
                str(tiny_dir),
                "--format",
                fmt,
                "--output",
                str(tmp_path / fmt),
            ]
        )
        == 0
    )
    exported = tmp_path / fmt
    assert (exported / "tree.json").read_text() == (source / "tree.json").read_text()
    assert read_tuned_trees(exported) == read_tuned_trees(source) and (exported / TUNED_FILE).is_file()
    (source / TUNED_FILE).unlink()
    (exported / TUNED_FILE).unlink()  # without tuned trees, both fall back alike (here: to their own 64-node tree)
    for device_tree in ("cpu",):
        ours = MedusaModel.from_pretrained(tiny_dir, heads=source, device=device_tree)
        theirs = MedusaModel.from_pretrained(tiny_dir, heads=exported, device=device_tree)
        assert ours.tree.paths == theirs.tree.paths
