"""Sequential (Hydra-style) heads: each head reads the tokens on its candidate path, so each child in a tree is
guessed for its own parent. The decoder grows the tree depth by depth; these tests check it against a node-by-node
reference, and the head type through config, save, load and export."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.heads import sequential_heads
from helpers.models import TINY_HIDDEN, TINY_VOCAB, make_tiny_model
from medusa.acceptance import GreedyAcceptance
from medusa.engine import EngineOptions
from medusa.errors import MedusaError
from medusa.heads import CONFIG_NAME, MedusaHeads, MedusaHeadsConfig
from medusa.interop import export_heads, load_heads
from medusa.model import MedusaModel
from medusa.tree import Tree


def test_a_fresh_sequential_head_returns_the_base_logits():
    base = make_tiny_model("llama")
    config = MedusaHeadsConfig(hidden_size=TINY_HIDDEN, vocab_size=TINY_VOCAB, num_heads=3, head_type="sequential")
    heads = MedusaHeads(config, base_lm_head=base.get_output_embeddings())
    heads.attach_base_model(base)
    hidden, path = torch.randn(2, 5, TINY_HIDDEN), torch.randint(TINY_VOCAB, (2, 5, 3))
    with torch.no_grad():
        logits = heads(hidden, path)
        expected = base.get_output_embeddings()(hidden)
    assert logits.shape == (3, 2, 5, TINY_VOCAB)
    for k in range(3):
        torch.testing.assert_close(logits[k], expected)


def test_a_sequential_head_depends_on_its_path_and_only_on_the_tokens_it_reads():
    base = make_tiny_model("llama")
    heads = sequential_heads(base)
    hidden = torch.randn(4, TINY_HIDDEN)
    path = torch.randint(TINY_VOCAB, (4, 3))
    other_last = path.clone()
    other_last[:, 2] = (other_last[:, 2] + 1) % TINY_VOCAB
    with torch.no_grad():
        logits, changed = heads(hidden, path), heads(hidden, other_last)
    assert torch.equal(logits[:2], changed[:2])  # heads 0 and 1 never read the third token
    assert not torch.allclose(logits[2], changed[2])


def test_sequential_heads_need_their_path_and_the_base_embeddings():
    base = make_tiny_model("llama")
    config = MedusaHeadsConfig(hidden_size=TINY_HIDDEN, vocab_size=TINY_VOCAB, num_heads=2, head_type="sequential")
    heads = MedusaHeads(config, base_lm_head=base.get_output_embeddings())
    with pytest.raises(MedusaError, match="input embeddings"):
        heads.head_logits(0, torch.randn(TINY_HIDDEN), torch.tensor([1]))
    heads.attach_base_model(base)
    with pytest.raises(MedusaError, match="candidate path"):
        heads(torch.randn(TINY_HIDDEN))
    with pytest.raises(MedusaError, match="reads 2 path tokens, got 1"):
        heads.head_logits(1, torch.randn(TINY_HIDDEN), torch.tensor([1]))


def test_own_guesses_feed_each_head_the_argmax_of_the_heads_before_it():
    base = make_tiny_model("llama")
    heads = sequential_heads(base)
    hidden, first = torch.randn(6, TINY_HIDDEN), torch.randint(TINY_VOCAB, (6,))
    with torch.no_grad():
        chained = heads.own_guesses(hidden, first)
        path = first[:, None]
        for k in range(3):
            expected = heads.head_logits(k, hidden, path)
            torch.testing.assert_close(chained[k], expected)
            path = torch.cat([path, expected.argmax(-1, keepdim=True)], dim=-1)


def test_the_expansion_lists_each_depths_parents_and_where_each_child_comes_from():
    tree = Tree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], topk=2)
    first, second, third = tree.expansion()
    assert first.ancestors.tolist() == [[0]]
    assert first.children.tolist() == [1, 2] and first.source.tolist() == [0, 1]
    assert second.ancestors.tolist() == [[0, 1], [0, 2]]  # nodes [0] and [1]
    assert second.children.tolist() == [3, 4, 5] and second.source.tolist() == [0, 1, 2]
    assert third.ancestors.tolist() == [[0, 1, 3]]
    assert third.children.tolist() == [6] and third.source.tolist() == [0]


@pytest.mark.parametrize("lookup", [0, 3])
@pytest.mark.parametrize("rows", [1, 4])
def test_the_decoder_grows_every_node_from_its_own_parents_path(lookup, rows):
    base = make_tiny_model("llama")
    heads = sequential_heads(base, seed=rows)
    model = MedusaModel(base, None, heads, tree="16")
    tree = model.tree.with_lookup(lookup)
    engine = model.engine(EngineOptions(lookup=lookup, lookup_ngram=1), tree=tree, max_rows=rows, max_length=64)
    decoder = engine.decoder
    prompts = [torch.randint(1, TINY_VOCAB, (5 + row,)) for row in range(rows)]
    for prompt in prompts:  # repeat a token so the lookup branch finds something
        prompt[-1] = prompt[1]
    decoder.prefill(list(range(rows)), prompts, [GreedyAcceptance()] * rows, [0] * rows)
    with torch.no_grad():
        tokens = decoder.propose(rows, decoder.tree_for(rows))
    paths = decoder.tree_for(rows).paths
    node_of = {(): 0} | {path: i + 1 for i, path in enumerate(paths)}
    for row in range(rows):
        assert tokens[row, 0] == decoder.root_token[row]
        for path in paths:
            ancestors = torch.tensor([tokens[row, node_of[path[:cut]]] for cut in range(len(path))])
            with torch.no_grad():
                logits = heads.head_logits(len(path) - 1, decoder.last_hidden[row], ancestors)
            assert tokens[row, node_of[path]] == logits.topk(tree.topk).indices[path[-1]], (row, path)
    if lookup:
        chain = tokens[:, len(paths) + 1 :]
        assert chain.shape == (rows, lookup)


def test_the_head_type_round_trips_and_an_unknown_one_is_refused(tmp_path):
    base = make_tiny_model("llama")
    heads = sequential_heads(base)
    heads.save_pretrained(tmp_path / "heads")
    assert json.loads((tmp_path / "heads" / CONFIG_NAME).read_text())["head_type"] == "sequential"
    again = load_heads(tmp_path / "heads")
    again.attach_base_model(base)
    hidden, path = torch.randn(3, TINY_HIDDEN), torch.randint(TINY_VOCAB, (3, 3))
    with torch.no_grad():
        assert torch.equal(again(hidden, path), heads(hidden, path))
    config = json.loads((tmp_path / "heads" / CONFIG_NAME).read_text())
    (tmp_path / "heads" / CONFIG_NAME).write_text(json.dumps(config | {"head_type": "eagle"}))
    with pytest.raises(MedusaError, match=r"head type 'eagle' is not known; this version of medusa reads medusa"):
        load_heads(tmp_path / "heads")


def test_sequential_heads_are_not_exported_to_engines_that_cannot_run_them(tmp_path):
    base = make_tiny_model("llama")
    model = MedusaModel(base, None, sequential_heads(base), tree="8")
    for format in ("medusa", "vllm"):
        with pytest.raises(MedusaError, match="sequential heads cannot be exported"):
            export_heads(model, tmp_path / format, format=format)
        assert not (tmp_path / format).exists()
