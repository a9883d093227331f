"""Acceptance schemes: rejection sampling reproduces the base model's sampling; typical acceptance is greedy
at low temperature and accepts more as the temperature rises; seeds reproduce answers.

The statistical tests compare sample counts with distributions computed exactly from the model's own
probabilities (processed by transformers' warpers, an independent implementation), with Pearson's
chi-square at a 1e-6 significance level and a fixed seed: deterministic, and a correct scheme would
fail only by a one-in-a-million accident of that seed. Deliberately broken rules must exceed the same
threshold, which shows the test has the power to catch them.
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from helpers.decoding import oracle_engine, oracle_generation
from medusa.acceptance import (
    GreedyAcceptance,
    RejectionAcceptance,
    StepKind,
    TypicalAcceptance,
    accept,
    make_acceptance,
    target_tokens,
    verify,
)
from medusa.engine import DecodingEngine, Generation
from medusa.heads import MedusaHeads, MedusaHeadsConfig
from medusa.model import MedusaModel
from medusa.sampling import GREEDY, REJECTION, TYPICAL, RowSampling, SamplingParams, position_gumbel
from medusa.tree import Tree

VOCAB = 16  # small enough to enumerate every pair (and triple) of tokens exactly
HIDDEN = 32
PROMPT = [5, 6, 7, 8]
STAT_TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0], [0, 0, 0], [0, 1, 0]]
Z_1E6 = 4.753  # standard normal quantile for a one-sided 1e-6 significance level
PATH_SCALE = 3.0  # sequential heads' path weights: enough to move some guesses, which then are right less often
SAMPLES = 100_000  # verdicts drawn at once on one tree: a second or so


@cache
def stat_model(seed: int = 0) -> tuple[LlamaForCausalLM, MedusaHeads]:
    """A 16-token model with moderately peaked distributions (entropy about 1.3 nats at temperature 1) and
    heads with random blocks, so the heads' guesses are a mix of likely, unlikely and impossible tokens."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config).eval()
    heads = MedusaHeads(MedusaHeadsConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_heads=3), base_lm_head=base.lm_head)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        base.lm_head.weight.mul_(20)
        for block in heads.blocks:
            block[0].linear.weight.copy_(0.3 * torch.randn(HIDDEN, HIDDEN, generator=generator))
        for projection in heads.projections:
            projection.weight.copy_(base.lm_head.weight)
    return base, heads


@cache
def sequential_stat_heads(seed: int = 0) -> MedusaHeads:
    """Sequential heads over ``stat_model``'s base: each head's first layer also reads its path's embeddings
    (random weights), so a child's guess depends on its parent's token."""
    base, _ = stat_model(seed)
    config = MedusaHeadsConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_heads=3, head_type="sequential")
    heads = MedusaHeads(config, base_lm_head=base.lm_head)
    heads.attach_base_model(base)
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for block, layer in zip(heads.blocks, heads.path_inputs):
            block[0].linear.weight.copy_(0.3 * torch.randn(HIDDEN, HIDDEN, generator=generator))
            path_weight = torch.randn(HIDDEN, layer.weight.shape[1] - HIDDEN, generator=generator)
            layer.weight[:, HIDDEN:].copy_(PATH_SCALE * path_weight)
        for projection in heads.projections:
            projection.weight.copy_(base.lm_head.weight)
    return heads.eval()


def reference_probs(base, sequences: list[list[int]], params: SamplingParams) -> torch.Tensor:
    """``[len(sequences), vocab]``: the next-token distribution after each (equal-length) sequence, processed
    by transformers' own warpers: what ``generate(do_sample=True)`` samples from."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        warpers.append(TopPLogitsWarper(params.top_p))
    ids = torch.tensor(sequences)
    with torch.no_grad():
        logits = base(ids).logits[:, -1].float()
    return warpers(ids, logits).softmax(-1)


def chi_square(samples: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic for integer ``samples`` against probabilities ``expected [cells]``, and its 1e-6
    critical value (Wilson-Hilferty). Cells expecting fewer than 5 samples are pooled; a sample in a cell
    of probability 0 makes the statistic infinite."""
    counts = torch.bincount(samples, minlength=expected.numel()).double()
    expected = expected.double() * samples.numel()
    if bool((counts[expected == 0] > 0).any()):
        return math.inf, 0.0
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().view(1)])
    wanted = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = wanted > 0
    observed, wanted = observed[keep], wanted[keep]
    statistic = float(((observed - wanted) ** 2 / wanted).sum())
    df = observed.numel() - 1
    critical = df * (1 - 2 / (9 * df) + Z_1E6 * math.sqrt(2 / (9 * df))) ** 3
    return statistic, critical


# ----- drawing many verdicts at once: one row per sample, each with its own seed ----------------------


def rows_of(samples: int, params: SamplingParams, scheme: int = REJECTION, first_seed: int = 0) -> RowSampling:
    rows = RowSampling.empty(samples, "cpu")
    rows.scheme.fill_(scheme)
    rows.temperature.fill_(params.temperature if params.temperature > 0 else 1.0)
    rows.top_k.fill_(params.top_k)
    rows.top_p.fill_(params.top_p)
    rows.typical_eps.fill_(0.09)
    rows.typical_delta.fill_(0.3)
    rows.seed.copy_(torch.arange(first_seed, first_seed + samples))
    return rows


def draw(
    tree: Tree,
    tree_tokens: torch.Tensor,
    logits: torch.Tensor,
    params: SamplingParams,
    samples: int,
    targets=target_tokens,
    scheme: int = REJECTION,
):
    """``samples`` verdicts on the same tree ``[size]`` tokens and ``[size, vocab]`` logits, each row its own seed:
    ``(paths [samples, depth + 1], accepted [samples], next tokens [samples])``."""
    rows = rows_of(samples, params, scheme)
    positions = (len(PROMPT) + 1 + torch.arange(tree.max_depth + 1)).expand(samples, -1)
    kind = StepKind(sample=True, filtered=params.top_k > 0 or params.top_p < 1, typical=scheme == TYPICAL)
    tokens = tree_tokens.expand(samples, -1)
    expanded = logits.expand(samples, -1, -1)
    if targets is target_tokens:
        verdict = accept(tree, tokens, expanded, rows, positions, kind)
    else:
        verdict = verify(tree, tokens, targets(expanded, rows, positions, tree.depths, kind, tree, tokens))
    return verdict.path, verdict.accepted, verdict.next_token


# ----- deliberately broken rules ------------------------------------------------------------------


def always_first_child(logits, rows, positions, depths, kind, tree, tokens):
    """Broken: every node's target is its first child's token, whatever the base model thinks of it."""
    targets = target_tokens(logits, rows, positions, depths, kind)
    for node in range(1, tree.size):
        parent = int(tree.parents[node])
        if int(tree.sibling_rank[node]) == 0:
            targets[:, parent] = tokens[:, node]
    return targets


def one_noise_for_every_position(logits, rows, positions, depths, kind, tree, tokens):
    """Broken, subtly: every depth reuses the first position's noise, so successive tokens are correlated."""
    return target_tokens(logits, rows, positions[:, :1].expand_as(positions), depths, kind)


def uniform_instead_of_gumbel(logits, rows, positions, depths, kind, tree, tokens):
    """Broken, subtly: uniform noise instead of Gumbel noise: argmax(logits + U) is not a sample of p."""
    noise = position_gumbel(rows.seed, positions, logits.shape[-1])
    uniform = torch.exp(-torch.exp(-noise))  # back to the uniform the Gumbel draw came from
    return (rows.process(logits, kind.filtered) + uniform.index_select(1, depths)).argmax(-1)


def tree_setup(params: SamplingParams, lookup: int = 0):
    """The real decoder's tree after the prompt: its tokens, and the exact base logits at every node.

    With ``lookup`` nodes, the lookup chain's tokens are set to the likeliest continuation that starts
    with a token none of the heads proposes at the root, so the lookup branch is the one that wins when
    that token is sampled (the prompt alone would rarely give such a useful guess).
    """
    base, heads = stat_model()
    tree = Tree.from_paths(STAT_TREE, lookup=lookup)
    engine = DecodingEngine(base, heads, lambda bucket: tree, max_length=32)
    engine.add([Generation(torch.tensor(PROMPT), 4, RejectionAcceptance(params), seed=0)])
    with torch.inference_mode():
        tree_tokens = engine.decoder.propose(1, engine.decoder.trees[1])[0]
    if lookup:
        tree_tokens = tree_tokens.clone()
        chain = PROMPT + [int(tree_tokens[0])]
        heads_at_root = {
            int(tree_tokens[node])
            for node in range(1, tree.size)
            if int(tree.parents[node]) == 0 and node < tree.size - lookup
        }
        for node in range(tree.size - lookup, tree.size):
            probs = reference_probs(base, [chain], params)[0]
            if node == tree.size - lookup:
                probs[list(heads_at_root)] = -1
            chain.append(int(probs.argmax()))
            tree_tokens[node] = chain[-1]
    node_tokens = []
    for node in range(tree.size):
        chain = []
        while node >= 0:
            chain.append(int(tree_tokens[node]))
            node = int(tree.parents[node])
        node_tokens.append(PROMPT + chain[::-1])
    with torch.no_grad():
        logits = torch.stack([base(torch.tensor([ids])).logits[0, -1] for ids in node_tokens])
    return base, tree, tree_tokens, logits


def first_two_tokens(
    targets, params: SamplingParams, samples: int, lookup: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``samples`` verdicts at once; return the two tokens after the root as one cell index
    ``t1 * vocab + t2``, the exact distribution of that pair, and the accepted lengths.

    When a verdict stops at t1 (nothing accepted), t2 is completed from the exact conditional: under a
    correct scheme the pair then follows p(t1) p(t2 | t1) exactly.
    """
    base, tree, tree_tokens, logits = tree_setup(params, lookup)
    root = int(tree_tokens[0])
    first = reference_probs(base, [PROMPT + [root]], params)[0]  # [vocab]
    second = reference_probs(base, [PROMPT + [root, t] for t in range(VOCAB)], params)  # [vocab, vocab]
    paths, accepted, next_token = draw(tree, tree_tokens, logits, params, samples, targets)
    along = tree_tokens[paths]  # [samples, depth + 1]
    t1 = torch.where(accepted >= 1, along[:, 1], next_token)
    completion = torch.multinomial(second[t1], 1, generator=torch.Generator().manual_seed(99))[:, 0]
    t2 = torch.where(accepted >= 2, along[:, 2], torch.where(accepted == 1, next_token, completion))
    return t1 * VOCAB + t2, (first[:, None] * second).flatten(), accepted, paths


PARAMS = {
    "t1": SamplingParams(temperature=1.0),
    "t0.7-topk8-topp0.9": SamplingParams(temperature=0.7, top_k=8, top_p=0.9),
}


@pytest.mark.parametrize("params", list(PARAMS.values()), ids=list(PARAMS))
def test_rejection_matches_base_sampling_on_the_tree(params):
    pairs, exact, accepted, _ = first_two_tokens(target_tokens, params, samples=SAMPLES)
    statistic, critical = chi_square(pairs, exact)
    assert statistic < critical, (statistic, critical)
    # The heads must be right and wrong often enough for the tree to be exercised.
    shares = [float((accepted == 0).float().mean()), float((accepted >= 2).float().mean())]
    assert all(share > 0.05 for share in shares), shares
    observed = torch.bincount(pairs, minlength=exact.numel()).double() / pairs.numel()
    assert 0.5 * float((observed - exact.double()).abs().sum()) < 0.02  # total variation


BROKEN = {
    "always-first": always_first_child,
    "one-noise": one_noise_for_every_position,
    "uniform-noise": uniform_instead_of_gumbel,
}


@pytest.mark.parametrize("broken", list(BROKEN.values()), ids=list(BROKEN))
def test_broken_rules_fail_the_same_test(broken):
    params = PARAMS["t1"]
    pairs, exact, _, _ = first_two_tokens(broken, params, samples=SAMPLES)
    statistic, critical = chi_square(pairs, exact)
    assert statistic > 1.5 * critical, (statistic, critical)


@pytest.mark.parametrize("params", list(PARAMS.values()), ids=list(PARAMS))
def test_rejection_with_a_lookup_branch_matches_base_sampling(params):
    """The lookup chain is one more sibling at the root, tried after the heads' guesses: still lossless."""
    pairs, exact, accepted, paths = first_two_tokens(target_tokens, params, samples=SAMPLES, lookup=2)
    statistic, critical = chi_square(pairs, exact)
    assert statistic < critical, (statistic, critical)
    lookup_nodes = len(STAT_TREE) + 1  # the first lookup node follows the heads' nodes
    through_lookup = (paths[:, 1] == lookup_nodes) & (accepted >= 1)
    assert float(through_lookup.float().mean()) > 0.05
    assert float((through_lookup & (accepted == 2)).float().mean()) > 0.02  # the whole chain, sometimes


@pytest.mark.parametrize("head_type", ["medusa", "sequential"])
def test_rejection_through_the_engine_matches_base_sampling(head_type):
    """End to end on the real engine: prefill samples the root, one step accepts guesses and samples the next
    token, each generation its own seed, eight rows at a time. The first three tokens (completed exactly where
    the step stopped short) are compared with p(t1) p(t2 | t1) p(t3 | t1, t2). Sequential heads grow the tree
    from each node's own parent; the law must not change."""
    base, heads = stat_model()
    if head_type == "sequential":
        heads = sequential_stat_heads()
        with torch.no_grad():  # head 1's guess depends on its parent's token
            hidden = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(3))
            parents = torch.tensor([[PROMPT[-1], token] for token in range(VOCAB)])
            guesses = heads.head_logits(1, hidden.expand(VOCAB, -1), parents).argmax(-1)
        assert guesses.unique().numel() > 1, guesses
    params = PARAMS["t1"]
    first = reference_probs(base, [PROMPT], params)[0]
    second = reference_probs(base, [PROMPT + [a] for a in range(VOCAB)], params)
    third = reference_probs(base, [PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)], params)
    exact = (first[:, None, None] * second[:, :, None] * third.view(VOCAB, VOCAB, VOCAB)).flatten()
    tree = Tree.from_paths(STAT_TREE)
    engine = DecodingEngine(base, heads, lambda bucket: tree, max_rows=8, max_length=32)
    completion = torch.Generator().manual_seed(7)
    cells, counts = [], []
    for start in range(0, 600, 8):
        generations = [
            Generation(torch.tensor(PROMPT), 8, RejectionAcceptance(params), seed=seed)
            for seed in range(start, start + 8)
        ]
        engine.add(generations)
        for generation, output in engine.step():
            tokens = output.tokens + [int(engine.decoder.root_token[generation.row])]
            if len(tokens) < 3:
                tokens.append(int(torch.multinomial(third[tokens[0] * VOCAB + tokens[1]], 1, generator=completion)))
            cells.append(tokens[0] * VOCAB**2 + tokens[1] * VOCAB + tokens[2])
            counts.append(output.accepted)
        engine.finish(generations)
    statistic, critical = chi_square(torch.tensor(cells), exact)
    assert statistic < critical, (statistic, critical)
    least = 25 if head_type == "medusa" else 5  # random path weights make the deep guesses right less often
    assert min(counts.count(k) for k in (1, 2, 3)) > least, [counts.count(k) for k in range(1, 5)]


# ----- the rule on hand-made trees ----------------------------------------------------------------


def test_rejection_keeps_certain_guesses_and_never_impossible_ones():
    """p one-hot on the first child's token: accepted every time; a guess of probability 0 never is."""
    tree = Tree.from_paths([[0], [1], [0, 0]])  # nodes 1=[0], 2=[1], 3=[0,0]
    tokens = torch.tensor([0, 3, 4, 5])
    logits = torch.full((4, 8), -1e9)
    logits[0, 3] = 0.0  # the root's distribution is certain of token 3 (node 1)
    logits[1, [5, 6]] = 0.0  # after it, tokens 5 (node 3) and 6 are equally likely
    logits[2:, 1] = 0.0
    paths, accepted, next_token = draw(tree, tokens, logits, SamplingParams(temperature=1.0), 4000)
    assert bool((paths[:, 1] == 1).all())
    took_5 = accepted == 2
    assert abs(float(took_5.float().mean()) - 0.5) < 0.04
    assert bool((next_token[took_5] == 1).all())  # p at node 3
    assert bool((next_token[~took_5] == 6).all())  # 5 was rejected: only 6 is left


def test_rejection_on_a_one_node_tree_is_plain_sampling():
    tree = Tree.from_paths([])
    logits = torch.tensor([[0.0, 1.0, 2.0, -math.inf]])
    paths, accepted, next_token = draw(tree, torch.tensor([2]), logits, SamplingParams(temperature=1.0), 20_000)
    assert paths.shape == (20_000, 1) and not bool(accepted.any())
    statistic, critical = chi_square(next_token, logits[0].softmax(-1))
    assert statistic < critical


def test_greedy_rows_ignore_the_noise_beside_sampled_rows():
    """One step over rows of every scheme: the greedy rows' verdicts are exactly the greedy rule's."""
    tree = Tree.from_paths(STAT_TREE)
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (6, tree.size), generator=generator)
    logits = torch.randn(6, tree.size, VOCAB, generator=generator)
    rows = rows_of(6, SamplingParams(1.0))
    rows.scheme.copy_(torch.tensor([GREEDY, REJECTION, TYPICAL, GREEDY, TYPICAL, REJECTION]))
    positions = 10 + torch.arange(tree.max_depth + 1).expand(6, -1)
    verdict = accept(tree, tokens, logits, rows, positions, StepKind(sample=True, typical=True))
    greedy = verify(tree, tokens, logits.argmax(-1))
    for row in (0, 3):
        assert verdict.path[row].tolist() == greedy.path[row].tolist()
        assert int(verdict.next_token[row]) == int(greedy.next_token[row])
    assert verdict.path.shape == (6, tree.max_depth + 1) and verdict.accepted.shape == (6,)
    assert bool((verdict.path[:, 0] == 0).all())
    # past a row's accepted guesses its path is padded with the root
    for row in range(6):
        assert verdict.path[row, int(verdict.accepted[row]) + 1 :].tolist() == [0] * (
            tree.max_depth - int(verdict.accepted[row])
        )


# ----- typical acceptance -------------------------------------------------------------------------


def test_typical_threshold_by_hand():
    """Root distribution (0.5, 0.3, 0.2, 0, ...): H = 1.0297, delta e^-H = 0.1071, threshold min(0.09, .) = 0.09:
    a child of probability 0.2 passes; with eps 0.25 the threshold is 0.1071 and still passes; with
    delta 1 and eps 0.25 it is 0.25 and fails."""
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0])
    logits = probs.clamp_min(1e-30).log().expand(2, -1).clone()
    tree = Tree.from_paths([[0]])
    tokens = torch.tensor([0, 2])
    params = SamplingParams(temperature=1.0)

    def accepted(eps: float, delta: float) -> int:
        rows = rows_of(1, params, TYPICAL)
        rows.typical_eps.fill_(eps)
        rows.typical_delta.fill_(delta)
        positions = torch.tensor([[5, 6]])
        kind = StepKind(sample=True, typical=True)
        return int(accept(tree, tokens[None], logits[None], rows, positions, kind).accepted[0])

    assert accepted(0.09, 0.3) == 1
    assert accepted(0.25, 0.3) == 1
    assert accepted(0.25, 1.0) == 0


def test_typical_prefers_the_longest_then_likeliest_path():
    tree = Tree.from_paths([[0], [1], [0, 0], [1, 0]])  # nodes 1=[0] 2=[1] 3=[0,0] 4=[1,0]
    tokens = torch.tensor([0, 1, 2, 3, 3])
    logits = torch.full((5, 4), -1e9)
    logits[0, [1, 2]] = torch.tensor([0.0, 0.5])  # token 2 (node 2) is likelier than token 1 (node 1)
    logits[1:, 3] = 0.0  # both depth-1 nodes are sure of token 3
    rows = rows_of(1, SamplingParams(1.0), TYPICAL)
    positions = torch.tensor([[5, 6, 7]])
    verdict = accept(tree, tokens[None], logits[None], rows, positions, StepKind(sample=True, typical=True))
    assert int(verdict.accepted[0]) == 2
    assert verdict.path[0].tolist() == [0, 2, 4]


def seeded_generations(model, prompts, **config):
    return [model.generate(prompt, max_new_tokens=24, **config) for prompt in prompts]


PROMPTS = [PROMPT, [9, 3, 11], [4, 4, 12, 13, 14, 6]]


def test_typical_at_very_low_temperature_is_greedy():
    """Same proposals, same tokens, same accepted lengths: typical at temperature 1e-4 is greedy decoding."""
    base, heads = stat_model()
    tree = Tree.from_paths(STAT_TREE)
    accepted = []
    for prompt in PROMPTS:
        with torch.no_grad():
            ids = torch.tensor([prompt])
            greedy = base.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False, pad_token_id=0
            )
        truth = greedy[0, len(prompt) :].tolist()
        runs = []
        for scheme in (GreedyAcceptance(), TypicalAcceptance(SamplingParams(temperature=1e-4))):
            engine = oracle_engine(base, tree, max_length=len(prompt) + 40, heads=heads)
            generation = oracle_generation(engine, prompt, truth, 30, set())
            generation.acceptance, generation.seed = scheme, 0
            for _ in engine.run([generation]):
                pass
            runs.append((generation.tokens, generation.stats.accepted_per_step))
        assert runs[0][0] == truth[:30]
        assert runs[1] == runs[0]
        accepted += runs[0][1]
    assert sum(accepted) / len(accepted) > 2  # long paths were accepted, so the schemes were really compared


def test_typical_accepts_more_as_temperature_rises():
    """The paper (section 2.3.1): a flatter distribution lowers the entropy-scaled threshold, so more
    candidates pass. Measured on the tiny model over three prompts: mean tokens per step, per temperature."""
    base, heads = stat_model()
    model = MedusaModel.from_pretrained(base, heads=heads, tree=STAT_TREE)
    means = []
    for temperature in (1e-4, 0.7, 1.5, 3.0):
        results = seeded_generations(model, PROMPTS, temperature=temperature, acceptance="typical", seed=1)
        steps = [a for r in results for a in r.stats.accepted_per_step]
        means.append(sum(steps) / len(steps))
    assert means == sorted(means) and means[-1] > means[0] + 0.5, means


# ----- seeds ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("acceptance", ["rejection", "typical"])
def test_seeds_reproduce_sampling(acceptance):
    base, heads = stat_model()
    model = MedusaModel.from_pretrained(base, heads=heads, tree=STAT_TREE)

    def run(seed: int) -> list[int]:
        return model.generate(PROMPT, max_new_tokens=24, temperature=1.0, acceptance=acceptance, seed=seed).token_ids

    assert run(5) == run(5)
    assert len({tuple(run(seed)) for seed in range(4)}) >= 3


def test_make_acceptance_defaults():
    assert isinstance(make_acceptance(), GreedyAcceptance)
    assert isinstance(make_acceptance("auto", SamplingParams(temperature=0.7)), RejectionAcceptance)
    assert isinstance(make_acceptance("typical", SamplingParams(temperature=0.7)), TypicalAcceptance)
    # Temperature 0 is greedy for every scheme: it is the limit of both sampling rules.
    assert isinstance(make_acceptance("rejection", SamplingParams(temperature=0.0)), GreedyAcceptance)
    assert isinstance(make_acceptance("typical", SamplingParams(temperature=0.0)), GreedyAcceptance)
