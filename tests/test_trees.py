"""paper_repro.core.trees: path selection, paths -> Draft builders, rank hits, Medusa heads and drafter (float64)."""
import itertools
import math
import random

import numpy as np
import pytest
import torch

from paper_repro.core.decoding import Draft, generate, reference_decode
from paper_repro.core.lm import LMConfig, TransformerLM
from paper_repro.core.trees import (MedusaDrafter, MedusaHeads, OffsetTreeDrafter, check_rank_accuracy, check_rank_paths,
                                    draft_from_paths, draft_from_rank_paths, prefix_tree, rank_hits, top_paths)
from conftest import tiny_lm

PROMPTS = [[1], [5, 9], [3, 14, 15, 9, 2, 6], list(range(2, 30, 3))]


# --- choosing paths ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_top_paths_are_the_most_probable_paths_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    acc = rng.dirichlet(np.ones(5), size=3) * 0.9
    for depth in (1, 2, 3):
        every = [p for d in range(1, depth + 1) for p in itertools.product(range(5), repeat=d)]
        prob = {p: math.prod(acc[j, r] for j, r in enumerate(p)) for p in every}
        for n in (0, 1, 3, 10, 40, len(every), len(every) + 5):
            got = top_paths(acc, n, depth)
            assert [p for p, _ in got] == sorted(every, key=lambda p: (-prob[p], p))[:n]
            assert all(abs(prob[p] - q) < 1e-15 for p, q in got)
            assert all(p[:-1] in [q for q, _ in got[:i]] for i, (p, _) in enumerate(got) if len(p) > 1)  # parents first
    assert top_paths(acc, 7) == top_paths(acc, 7, max_depth=3)   # default: every row
    assert top_paths(torch.tensor(acc), 7) == top_paths(acc, 7)   # tensors are accepted


def test_top_paths_ties_prefer_the_smaller_path():
    assert [p for p, _ in top_paths([[0.5, 0.5], [0.5, 0.5]], 6)] == [(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]


def test_top_paths_rejects_bad_input():
    with pytest.raises(ValueError, match="max_depth must be in"): top_paths([[0.5]], 3, 2)
    with pytest.raises(ValueError, match="rows summing"): top_paths([[0.8, 0.5]], 3)
    with pytest.raises(ValueError, match="rows summing"): top_paths([[-0.1, 0.5]], 3)
    with pytest.raises(ValueError, match="rows summing"): top_paths([[float("nan"), 0.5]], 3)
    with pytest.raises(ValueError, match="rows summing"): check_rank_accuracy(np.zeros(3))
    with pytest.raises(ValueError, match="n \\(paths\\) must be a non-negative int"): top_paths([[0.5]], -1)


# --- paths -> drafts: against the four builders this one replaced ------------------------------------------------------

def old_paths_to_draft(paths, max_depth, max_nodes=None):
    "ADED's builder before the core one (token paths merged into a prefix tree)."
    tokens, parents, node_of = [], [], {}
    limit = max_nodes if max_nodes is not None else float("inf")
    for path in paths:
        parent = -1
        for t in list(path)[:max_depth]:
            node = node_of.get((parent, int(t)))
            if node is None:
                if len(tokens) >= limit: return tokens, parents
                node = node_of[(parent, int(t))] = len(tokens)
                tokens.append(int(t)); parents.append(parent)
            parent = node
    return tokens, parents


def old_tree_draft(candidates, paths, max_depth):
    "Hidden transfer's builder before the core one (rank paths, breadth-first)."
    index, tokens, parents = {}, [], []
    for path in sorted((p for p in paths if len(p) <= max_depth), key=len):
        parent = index[path[:-1]] if len(path) > 1 else -1
        index[path] = len(tokens)
        tokens.append(int(candidates[len(path) - 1][path[-1]])); parents.append(parent)
    return tokens, parents


def old_template_from_paths(paths):
    "Token Recycling's TreeTemplate.from_paths before the core builder: (parents, ranks)."
    index, parents, ranks = {}, [], []
    for i, path in enumerate(map(tuple, paths)):
        index[path] = i; parents.append(index[path[:-1]] if path[:-1] else -1); ranks.append(path[-1])
    return parents, ranks


@pytest.mark.parametrize("seed", range(20))
def test_token_path_drafts_equal_the_old_builder(seed):
    rng = random.Random(seed)
    paths = [[rng.randrange(4) for _ in range(rng.randint(0, 6))] for _ in range(rng.randint(0, 12))]
    for max_depth in (1, 2, 4, 8):
        for max_nodes in (None, 1, 5, 20):
            d = draft_from_paths(paths, max_depth, max_nodes, source="s")
            assert (d.tokens, d.parents) == old_paths_to_draft(paths, max_depth, max_nodes) and d.source == "s"
            # a prefix tree: every node's path is a prefix of an input path, and no two nodes have the same path
            spelled = [tuple(d.tokens[j] for j in d.path_to(i)) for i in range(len(d))]
            assert len(set(spelled)) == len(spelled)
            assert all(any(list(s) == p[:len(s)] for p in paths) for s in spelled)


def test_token_path_drafts_are_the_distinct_prefixes_in_priority_order():
    rng = random.Random(0)
    for trial in range(200):
        paths = [[rng.randrange(4) for _ in range(rng.randrange(0, 6))] for _ in range(rng.randrange(0, 8))]
        max_depth, max_nodes = rng.randrange(0, 6), rng.choice([None, 1, 3, 7])
        d = draft_from_paths(paths, max_depth, max_nodes)
        prefixes = []                                            # brute force: distinct prefixes in priority order
        for p in paths:
            for k in range(1, min(len(p), max_depth) + 1):
                if tuple(p[:k]) not in prefixes: prefixes.append(tuple(p[:k]))
        if max_nodes is not None: prefixes = prefixes[:max_nodes]
        got = [tuple(d.tokens[i] for i in d.path_to(n)) for n in range(len(d))]
        assert got == prefixes
        assert d.depth <= max_depth


@pytest.mark.parametrize("seed", range(10))
def test_rank_path_drafts_equal_the_old_builders(seed):
    rng = np.random.default_rng(seed)
    acc = rng.dirichlet(np.ones(4), size=3) * 0.9
    paths = [p for p, _ in top_paths(acc, int(rng.integers(1, 30)))]   # best-first, prefix-closed
    cands = rng.integers(0, 100, size=(3, 4)).tolist()
    for max_depth in (0, 1, 2, 3):
        d = draft_from_rank_paths(cands, sorted(paths, key=len), max_depth, source="m", draft_calls=2)
        assert (d.tokens, d.parents) == old_tree_draft(cands, paths, max_depth)
        assert d.source == "m" and d.draft_calls == 2
    values, parents = prefix_tree(paths, strict=True)
    assert (parents, values) == old_template_from_paths(paths)


def test_prefix_tree_rejects_bad_rank_trees():
    with pytest.raises(ValueError, match="tree path \\(0, 1\\) comes before its parent"): prefix_tree([(0, 1)], strict=True)
    with pytest.raises(ValueError, match="appears twice"): prefix_tree([(0,), (0,)], strict=True)
    with pytest.raises(ValueError, match="tree path 1 is empty"): prefix_tree([(0,), ()], strict=True)
    assert prefix_tree([(0, 1)]) == ([0, 1], [-1, 0])   # not strict: missing prefixes become nodes
    with pytest.raises(ValueError, match="needs more depths/ranks"): draft_from_rank_paths([[1, 2]], [(5,)], 3)
    with pytest.raises(ValueError, match="needs more depths/ranks"): draft_from_rank_paths([[1, 2]], [(0,), (0, 0)], 3)


# --- rank hits -----------------------------------------------------------------------------------------------------

def test_rank_hits_match_a_direct_count():
    g = torch.Generator().manual_seed(0)
    logits, truth = torch.randn(5, 3, 11, generator=g), torch.randint(0, 11, (5, 3), generator=g)
    hits = rank_hits(logits, truth, 4)
    assert hits.shape == (5, 3, 4) and hits.dtype == torch.float32
    for b, j in itertools.product(range(5), range(3)):
        order = sorted(range(11), key=lambda v: -float(logits[b, j, v]))
        want = [float(order[r] == int(truth[b, j])) for r in range(4)]
        assert hits[b, j].tolist() == want
    with pytest.raises(ValueError, match="width must be an int in \\[1, 11\\]"): rank_hits(logits, truth, 12)
    with pytest.raises(ValueError, match="truth has shape"): rank_hits(logits, truth[:, :2], 2)


# --- Medusa heads and the offset-tree drafter ------------------------------------------------------------------------

def noisy_heads(target, own=True, k=3, seed=0):
    torch.manual_seed(seed)
    h = MedusaHeads(32, 40, k, target.lm_head, own_lm_head=own).double()
    with torch.no_grad(): h.weight.normal_(0, 0.3)
    return h


PATHS = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (2,)]


@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("warm", [True, False])
def test_medusa_drafter_is_lossless(target, own, warm):
    heads = noisy_heads(target, own)
    for prompt in PROMPTS:
        for max_new in (1, 2, 7, 33):
            res = generate(target, prompt, max_new, MedusaDrafter(heads, PATHS, warm_start=warm))
            assert res.tokens == reference_decode(target, prompt, max_new)
            assert res.new_tokens == sum(s.accepted + s.bonus for s in res.steps)
            assert all(s.drafted <= len(PATHS) and s.source == "medusa" for s in res.steps)
            assert (res.steps[0].drafted > 0) == (warm and len(prompt) > 1 and max_new > 1)


def test_medusa_heads_read_the_final_hidden_state_of_the_accepted_node(target):
    "The candidates the drafter proposes are the heads' top ranks on the hidden state of the token before the root."
    heads = noisy_heads(target)
    prompt = PROMPTS[2]
    proposed = []

    class Spy(MedusaDrafter):
        def propose(self, context, max_tokens):
            d = super().propose(context, max_tokens)
            proposed.append((list(context), d))
            return d
    generate(target, prompt, 12, Spy(heads, [(0,), (1,), (0, 0)]))
    with torch.no_grad():
        for context, d in proposed:
            if not len(d): continue
            h = target.hidden_states(torch.tensor([context[:-1]]))[0, -1]
            top = heads(h).topk(2, dim=-1).indices.tolist()
            assert d.tokens == [top[0][0], top[0][1], top[1][0]][:len(d)] and d.parents[:3] == [-1, -1, 0][:len(d)]


class OracleOffsets(OffsetTreeDrafter):
    "Per-depth guesses that are the true continuation: every tree path of rank 0 is accepted."
    def __init__(self, paths, k, continuation, prompt_len):
        super().__init__(paths, k)
        self.cont, self.n0 = continuation, prompt_len
    def keep_row(self, hidden, row): return None
    def offset_logits(self, kept):
        done = self._for[0] - self.n0   # tokens emitted so far, the next root included
        logits = torch.zeros(self.k, 40, dtype=torch.float64)
        for i in range(self.k):
            if done + i < len(self.cont): logits[i, self.cont[done + i]] = 1.0
        return logits


def test_oracle_guesses_accept_full_depth(target):
    prompt = PROMPTS[3]
    ref = reference_decode(target, prompt, 40)
    res = generate(target, prompt, 40, OracleOffsets(PATHS, 3, ref, len(prompt)))
    assert res.tokens == ref
    assert all(s.accepted == 3 for s in res.steps[:-2]) and res.mean_accepted > 3.3


def test_drafter_never_uses_a_stale_row(target):
    d = MedusaDrafter(noisy_heads(target), PATHS)
    assert len(d.propose([1, 2, 3], 5)) == 0     # nothing observed yet
    for prompt in ([3, 1, 4, 1, 5], [9], [2, 7], [9]):
        res = generate(target, prompt, 20, d)
        assert res.tokens == reference_decode(target, prompt, 20)
        if len(prompt) == 1: assert res.steps[0].drafted == 0


def test_medusa_drafter_rejects_bad_input(target):
    heads = noisy_heads(target)
    with pytest.raises(TypeError, match="heads must be MedusaHeads"): MedusaDrafter(torch.nn.Linear(2, 2), PATHS)
    with pytest.raises(ValueError, match="paths is empty"): MedusaDrafter(heads, [])
    with pytest.raises(ValueError, match="bad tree path"): MedusaDrafter(heads, [(0,), (0, 0, 0, 0)])   # deeper than k
    with pytest.raises(ValueError, match="bad tree path"): MedusaDrafter(heads, [(0, 1)])
    with pytest.raises(ValueError, match="bad tree path"): MedusaDrafter(heads, [(-1,)])
    with pytest.raises(ValueError, match="repeat a rank path"): MedusaDrafter(heads, [(0,), (0,)])
    assert check_rank_paths([(0,), (0, 0), (1,)], 2) == [(0,), (1,), (0, 0)]   # breadth-first, stable
