"""Grouped-query attention without repeating K/V (``medusa.attention``): transformers' sdpa results, by folding."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import medusa.attention as attention
from helpers.decoding import oracle_engine, oracle_generation, random_prompts, reference
from helpers.models import ARCHITECTURES, EOS_ID, make_tiny_model
from medusa.attention import GROUPED_SDPA, RAGGED_KEYWORD, RaggedRows, grouped_sdpa_attention_forward, use_grouped_sdpa
from medusa.cache import attention_mask_for, tree_visibility
from medusa.engine import EngineOptions
from medusa.model import MedusaModel
from medusa.tree import default_tree

BATCH, KV_HEADS, GROUPS, SPAN, HEAD_DIM = 2, 3, 3, 11, 16


class AttentionModule(nn.Module):
    """What the attention functions read from a model's attention layer."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def qkv(length: int, groups: int = GROUPS, value_dim: int = HEAD_DIM, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    # The query comes as transformers makes it: [B, L, H, D] viewed as [B, H, L, D] (not contiguous).
    query = torch.randn(BATCH, length, KV_HEADS * groups, HEAD_DIM, generator=generator).transpose(1, 2)
    key = torch.randn(BATCH, KV_HEADS, SPAN, HEAD_DIM, generator=generator)
    value = torch.randn(BATCH, KV_HEADS, SPAN, value_dim, generator=generator)
    return query, key, value


def visibility(length: int, batch: int = BATCH, seed: int = 1) -> torch.Tensor:
    """A random bool mask ``[batch, 1, L, S]`` in which every query sees at least one slot."""
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.rand(batch, 1, length, SPAN, generator=generator) < 0.6
    allowed[..., 0] = True
    return allowed


def additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.fixture
def fallback_calls(monkeypatch) -> list[bool]:
    """Records each call ``grouped_sdpa_attention_forward`` hands to transformers' own sdpa function."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(True)
        return sdpa_attention_forward(*args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    return calls


MASKS = {
    "bool": lambda length: visibility(length),
    "float": lambda length: additive(visibility(length)),
    "float-one-for-the-batch": lambda length: additive(visibility(length, batch=1)),
    "bool-expanded-over-heads": lambda length: visibility(length).expand(-1, KV_HEADS * GROUPS, -1, -1),
}


@pytest.mark.parametrize("length", [1, 5], ids=["one-query", "five-queries"])
@pytest.mark.parametrize("mask", list(MASKS.values()), ids=list(MASKS))
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_a_mask_folds_the_groups_and_matches_transformers_sdpa(fallback_calls, length, mask, scaling):
    module = AttentionModule(GROUPS)
    query, key, value = qkv(length)
    attention_mask = mask(length)
    expected, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)
    output, weights = grouped_sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)
    assert not fallback_calls  # folded, not handed on
    assert weights is None
    assert output.shape == (BATCH, length, KV_HEADS * GROUPS, HEAD_DIM) and output.is_contiguous()
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_a_value_head_size_unlike_the_querys_folds_too(fallback_calls):
    module = AttentionModule(GROUPS)
    query, key, value = qkv(4, value_dim=8)
    mask = visibility(4)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask)
    output, _ = grouped_sdpa_attention_forward(module, query, key, value, mask)
    assert not fallback_calls and output.shape == (BATCH, 4, KV_HEADS * GROUPS, 8)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_each_query_head_uses_the_kv_head_repeat_kv_gives_it(fallback_calls):
    """Zeroing one K/V head's values changes exactly the query heads of its group."""
    module = AttentionModule(GROUPS)
    query, key, value = qkv(3)
    mask = visibility(3)
    before, _ = grouped_sdpa_attention_forward(module, query, key, value, mask)
    value = value.clone()
    value[:, 1] = 0
    after, _ = grouped_sdpa_attention_forward(module, query, key, value, mask)
    changed = [head for head in range(KV_HEADS * GROUPS) if not torch.equal(before[:, :, head], after[:, :, head])]
    assert changed == [GROUPS, GROUPS + 1, GROUPS + 2]


def test_gradients_match_transformers_sdpa():
    module = AttentionModule(GROUPS)
    mask = visibility(5)
    gradients = []
    for function in (sdpa_attention_forward, grouped_sdpa_attention_forward):
        tensors = [t.detach().requires_grad_() for t in qkv(5)]
        output, _ = function(module, *tensors, mask)
        output.square().sum().backward()
        gradients.append([t.grad for t in tensors])
    for ours, theirs in zip(gradients[1], gradients[0]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


UNFOLDED = {
    "no-mask-causal": dict(length=5, mask=None),
    "no-mask-one-query": dict(length=1, mask=None),
    "a-mask-per-head": dict(length=5, mask=lambda: additive(torch.rand(BATCH, KV_HEADS * GROUPS, 5, SPAN) < 0.6)),
    "no-grouping": dict(length=5, mask=lambda: visibility(5), groups=1),
    # 3 x 120 x 11 mask entries per row outnumber the 9 x 11 x 32 entries repeat_kv makes.
    "a-mask-larger-than-the-kv": dict(length=120, mask=lambda: visibility(120)),
    "position-bias": dict(length=5, mask=lambda: visibility(5), position_bias=torch.randn(1, 9, 5, SPAN)),
}


@pytest.mark.parametrize("case", list(UNFOLDED.values()), ids=list(UNFOLDED))
def test_what_cannot_fold_goes_to_transformers_sdpa(fallback_calls, case):
    case = dict(case)
    groups = case.pop("groups", GROUPS)
    length, make_mask = case.pop("length"), case.pop("mask")
    module = AttentionModule(groups)
    query, key, value = qkv(length, groups=groups)
    mask = make_mask() if make_mask else None
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, **case)
    output, _ = grouped_sdpa_attention_forward(module, query, key, value, mask, **case)
    assert fallback_calls == [True]
    torch.testing.assert_close(output, expected, atol=1e-6, rtol=1e-6)


# ----- switching models -----------------------------------------------------------------------------


def test_grouped_query_models_on_sdpa_are_switched_and_others_are_left_alone():
    for architecture in ARCHITECTURES:  # tiny models: 4 query heads, 2 K/V heads
        model = make_tiny_model(architecture)
        assert model.config._attn_implementation == "sdpa"
        assert use_grouped_sdpa(model)
        assert model.config._attn_implementation == GROUPED_SDPA == model.model.config._attn_implementation
    config_class, model_class, _ = ARCHITECTURES["llama"]
    settings = make_tiny_model("llama").config.to_dict()
    no_gqa = model_class(config_class(**{**settings, "num_key_value_heads": 4}))
    assert not use_grouped_sdpa(no_gqa) and no_gqa.config._attn_implementation == "sdpa"
    eager = model_class(config_class(**settings, attn_implementation="eager"))
    assert not use_grouped_sdpa(eager) and eager.config._attn_implementation == "eager"
    assert MedusaModel(no_gqa, None, None).base_model.config._attn_implementation == "sdpa"
    assert MedusaModel(eager, None, None).base_model.config._attn_implementation == "eager"


@pytest.mark.parametrize("architecture", ["llama", "mistral"])
def test_a_padded_batch_through_a_switched_model_gives_sdpas_logits(architecture):
    """A 2-D padding mask still becomes a 4-D mask (sdpa's mask function is registered under the new name)."""
    plain, switched = make_tiny_model(architecture), make_tiny_model(architecture)
    use_grouped_sdpa(switched)
    ids = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask).logits
        logits = switched(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[0, 3:], expected[0, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], expected[1], atol=1e-5, rtol=1e-5)


@pytest.fixture
def folds(monkeypatch) -> list[bool]:
    """Records each attention call the grouped function folds."""
    calls = []
    foldable = attention._foldable

    def spy(*args):
        calls.append(foldable(*args))
        return calls[-1]

    monkeypatch.setattr(attention, "_foldable", spy)
    return calls


@pytest.mark.parametrize("architecture", ["llama", "mistral"])
def test_medusa_model_decodes_the_same_tokens_with_and_without_folding(folds, architecture):
    model = MedusaModel.from_pretrained(make_tiny_model(architecture), tree="64")
    assert model.base_model.config._attn_implementation == GROUPED_SDPA
    prompts = random_prompts(3, seed=5)
    folded = [r.token_ids for r in model.generate(prompts, max_new_tokens=12)]
    assert any(folds)  # the tree steps went through the folded path
    model.base_model.set_attn_implementation("sdpa")
    model.release_engines()
    plain = [r.token_ids for r in model.generate(prompts, max_new_tokens=12)]
    assert folded == plain
    assert folded == [list(reference(architecture, tuple(p), 12)) for p in prompts]


@pytest.mark.parametrize("ragged", [False, True], ids=["span", "ragged"])
@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2"])
def test_accepted_paths_move_kv_and_stay_lossless_when_folded(ragged_calls, architecture, ragged):
    """The oracle makes long, varied paths accepted, so the compacted cache is attended through folding; with
    ragged attention each step's tree is read right after the compacted K/V, over spans of 16 slots."""
    base = make_tiny_model(architecture)
    assert use_grouped_sdpa(base)
    prompts = random_prompts(3, seed=41)
    truths = [list(reference(architecture, tuple(p), 30)) for p in prompts]
    span_step = 16 if ragged else None
    engine = oracle_engine(base, default_tree(64), max_rows=4, max_length=64, span_step=span_step, ragged=ragged)
    generations = [oracle_generation(engine, p, t, 24, {EOS_ID}) for p, t in zip(prompts, truths)]
    for _ in engine.run(generations):
        pass
    for generation, truth in zip(generations, truths):
        expected = truth[:24]
        if EOS_ID in expected:
            expected = expected[: expected.index(EOS_ID) + 1]
        assert generation.tokens == expected
    assert max(a for g in generations for a in g.stats.accepted_per_step) == 5
    assert bool(ragged_calls) == ragged


def test_a_prefill_on_cuda_leaves_cudnn_attention_out_and_restores_it():
    """cuDNN's SDPA builds a plan for every new shape: a prefill (a new shape for most prompts) runs without it;
    the steps after it keep every backend, and the CPU is left alone."""
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        with attention.prefill_attention(torch.device("cuda")):
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.cudnn_sdp_enabled()
        with attention.prefill_attention(torch.device("cpu")):
            assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def test_the_decoder_prefills_under_the_prefill_backends(monkeypatch):
    """The decoder's prefill enters ``prefill_attention`` for its device (and a step does not)."""
    entered = []

    def recording(device):
        entered.append(device.type)
        return attention.prefill_attention(device)

    monkeypatch.setattr("medusa.decoding.prefill_attention", recording)
    model = MedusaModel.from_pretrained(make_tiny_model("llama"), tree="8")
    model.generate([5, 6, 7], max_new_tokens=3)
    assert entered == ["cpu"]


# ----- ragged attention: each row's own slots ---------------------------------------------------------------


def ragged_case(nodes: int, groups: int, dtype=torch.float32, device="cpu", seed: int = 3):
    """Query, key/value views of a larger cache (as a step's span is), the rows' lengths and a tree mask."""
    generator = torch.Generator().manual_seed(seed)
    rows, span, head_dim = 4, 96, 16
    tree = default_tree(nodes) if nodes > 1 else None
    tree_mask = tree.attention_mask if tree else torch.ones(1, 1, dtype=torch.bool)
    depths = tree.depths if tree else torch.zeros(1, dtype=torch.long)
    lengths = torch.tensor([1, 7, 30, span - nodes])
    cache = torch.randn(2, rows + 1, KV_HEADS, span + 20, head_dim, generator=generator)
    query = torch.randn(rows, nodes, KV_HEADS * groups, head_dim, generator=generator).transpose(1, 2)
    query, cache = query.to(device, dtype), cache.to(device, dtype)
    key, value = cache[0, :rows, :, :span], cache[1, :rows, :, :span]
    allowed, query_positions, key_positions = tree_visibility(lengths, tree_mask, depths, span)
    mask = attention_mask_for(LlamaConfig(), allowed, query_positions, key_positions, dtype).to(device)
    rows_ = RaggedRows(lengths.to(device), tree_mask.to(device), flash=device == "cuda")
    return query, key, value, mask, rows_


@pytest.mark.parametrize("groups", [1, GROUPS], ids=["one-query-head-a-kv-head", "grouped"])
@pytest.mark.parametrize("nodes", [1, 8, 64], ids=["one-node", "8-nodes", "64-nodes"])
def test_ragged_attention_gives_what_the_mask_over_the_span_gives(nodes, groups):
    query, key, value, mask, rows = ragged_case(nodes, groups)
    module = AttentionModule(groups)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    output, _ = grouped_sdpa_attention_forward(module, query, key, value, mask, scaling=0.3, **{RAGGED_KEYWORD: rows})
    assert output.shape == expected.shape and output.is_contiguous()
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_ragged_attention_reads_nothing_past_a_rows_tree():
    """Huge values in every slot past each row's tree change nothing."""
    query, key, value, mask, rows = ragged_case(8, GROUPS)
    before = attention.ragged_attention(query, key, value, rows, 0.3)
    for buffer in (key, value):
        for row, length in enumerate(rows.committed.tolist()):
            buffer[row, :, length + 8 :] = 1e4
    torch.testing.assert_close(attention.ragged_attention(query, key, value, rows, 0.3), before)


def test_a_window_shorter_than_the_span_keeps_the_mask():
    query, key, value, mask, rows = ragged_case(8, GROUPS)
    module = AttentionModule(GROUPS)
    module.sliding_window = 16  # the mask holds the window; the ragged path would read past it
    calls = []
    original = attention.ragged_attention
    try:
        attention.ragged_attention = lambda *args: calls.append(args) or original(*args)
        grouped_sdpa_attention_forward(module, query, key, value, mask, **{RAGGED_KEYWORD: rows})
        module.sliding_window = 4096
        grouped_sdpa_attention_forward(module, query, key, value, mask, **{RAGGED_KEYWORD: rows})
    finally:
        attention.ragged_attention = original
    assert len(calls) == 1


@pytest.fixture
def ragged_calls(monkeypatch) -> list[int]:
    """Records the tree size of each attention call that takes the ragged path."""
    calls = []
    original = attention.ragged_attention

    def spy(query, *args):
        calls.append(query.shape[2])
        return original(query, *args)

    monkeypatch.setattr(attention, "ragged_attention", spy)
    return calls


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_ragged_steps_decode_the_base_models_greedy_tokens(ragged_calls, architecture):
    """Through the engine, batched, with Medusa trees and without heads: the base model's own greedy tokens."""
    model = MedusaModel.from_pretrained(make_tiny_model(architecture), tree="64")
    prompts = random_prompts(3, seed=7)
    expected = [list(reference(architecture, tuple(p), 16)) for p in prompts]
    for use_heads in (True, False):
        options = EngineOptions(use_heads=use_heads, ragged_attention=True)
        results = model.generate_batch(prompts, max_new_tokens=16, chat_template=False, options=options)
        assert [r.token_ids for r in results] == [e[: len(r.token_ids)] for r, e in zip(results, expected)]
    if model.base_model.config._attn_implementation == GROUPED_SDPA:
        assert 64 in ragged_calls and 1 in ragged_calls
    else:  # not a grouped-query model: its attention function never reads the rows
        assert not ragged_calls


def test_ragged_attention_is_off_unless_asked_and_auto_only_where_flash_runs():
    model = MedusaModel.from_pretrained(make_tiny_model("llama"), tree="8")
    assert not model.engine(EngineOptions()).decoder.ragged_attention
    assert not model.engine(EngineOptions(ragged_attention=None)).decoder.ragged_attention  # the CPU
    asked = model.engine(EngineOptions(ragged_attention=True)).decoder
    assert asked.ragged_attention and not asked.flash_attention  # the CPU reads the span under a mask


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention's kernel needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("groups", [1, GROUPS], ids=["one-query-head-a-kv-head", "grouped"])
@pytest.mark.parametrize("nodes", [1, 8, 64], ids=["one-node", "8-nodes", "64-nodes"])
def test_flash_reads_each_rows_slots_as_the_masked_product_does(nodes, groups, dtype):
    query, key, value, mask, rows = ragged_case(nodes, groups, dtype, "cuda")
    assert attention.flash_runs(query.device, dtype) and attention.flash_reads(query, key, value) and rows.flash
    lengths = rows.committed + 1
    got, got_lse = attention._flash_committed(query, key, value, lengths, 0.3)
    want, want_lse = attention._masked_committed(query, key, value, lengths, 0.3)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_lse, want_lse, atol=2e-2, rtol=2e-2)
    module = AttentionModule(groups)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    output, _ = grouped_sdpa_attention_forward(module, query, key, value, mask, scaling=0.3, **{RAGGED_KEYWORD: rows})
    torch.testing.assert_close(output.float(), expected.float(), atol=3e-2, rtol=3e-2)


@cuda
def test_captured_ragged_steps_replay_what_eager_ragged_steps_decode(ragged_calls):
    """bf16 on CUDA, where "auto" turns it on: graphs and eager steps give the same tokens."""
    model = MedusaModel.from_pretrained(make_tiny_model("llama", seed=2), device="cuda", dtype="bfloat16", tree="16")
    decoder = model.engine(EngineOptions(ragged_attention=None)).decoder
    assert decoder.ragged_attention and decoder.flash_attention  # the kernel's probe ran and agreed
    prompts = random_prompts(5, seed=3)
    for use_heads in (True, False):
        runs = [
            [
                r.token_ids
                for r in model.generate_batch(
                    prompts,
                    max_new_tokens=40,
                    chat_template=False,
                    options=EngineOptions(use_heads=use_heads, cuda_graphs=graphs, ragged_attention=True),
                )
            ]
            for graphs in (True, False)
        ]
        assert runs[0] == runs[1]
    assert ragged_calls
