"""paper_repro.decoding.token_recycling: the tree template, BFS drafting, recycling updates, losslessness."""
import random

import pytest
import torch

from paper_repro.core.decoding import Draft, Sampler, generate, reference_decode
from paper_repro.decoding.token_recycling import TokenRecyclingDrafter, TreeTemplate, bench_methods, default_template


# ---------------------------------------------------------------- template

def test_default_template_is_the_official_shape():
    t = default_template()
    assert len(t) == 80 and [t.depths.count(d) for d in range(1, 7)] == [8, 21, 25, 15, 8, 3]
    paths = t.paths()
    assert paths[:8] == [(r,) for r in range(8)]
    # a few nodes named in the official README, and the deepest level in full
    for p in [(0, 7), (7, 0), (5, 0, 0), (3, 0, 0, 0), (1, 0, 0, 0, 0)]: assert p in paths
    assert paths[-3:] == [(0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0)]
    assert TreeTemplate.from_paths(paths) == t


def _check_tree(t: TreeTemplate):
    paths = t.paths()
    assert len(set(paths)) == len(paths)
    assert all(p[:-1] in paths[:i] for i, p in enumerate(paths) if len(p) > 1)  # ancestors come first
    assert t.depths == sorted(t.depths) and t.depths == [len(p) for p in paths]


@pytest.mark.parametrize("n", [1, 5, 20, 40, 63, 80])
def test_pruned_template_is_the_cheapest_valid_subtree(n):
    full = default_template()
    t = full.pruned(n)
    assert len(t) == n
    _check_tree(t)
    cost = lambda p: sum(r + 1 for r in p)
    kept = set(t.paths())
    assert kept <= set(full.paths())
    # brute force: no dropped node is cheaper than a kept one
    dropped = set(full.paths()) - kept
    assert not dropped or min(map(cost, dropped)) >= max(map(cost, kept))


def test_template_bad_inputs():
    with pytest.raises(ValueError, match="parents must come first"): TreeTemplate((0,), (0,))
    with pytest.raises(ValueError, match="repeats child rank"): TreeTemplate((-1, -1), (0, 0))
    with pytest.raises(ValueError, match="ordered by depth"): TreeTemplate((-1, 0, -1), (0, 0, 1))
    with pytest.raises(ValueError, match="comes before its parent"): TreeTemplate.from_paths([[0, 0], [0]])
    with pytest.raises(ValueError, match="appears twice"): TreeTemplate.from_paths([[0], [0]])
    with pytest.raises(ValueError, match="child counts"): TreeTemplate.from_child_counts([(2,), (1,)])
    with pytest.raises(ValueError, match=r"n must be in \[1, 80\]"): default_template(0)
    with pytest.raises(ValueError, match=r"n must be in \[1, 80\]"): default_template(81)


# ---------------------------------------------------------------- drafting and recycling vs brute force

def brute_force_fill(A, root, paths):
    "Walk each node's rank path from the root through the table."
    out = []
    for path in paths:
        t = root
        for r in path: t = int(A[t, r])
        out.append(t)
    return out


@pytest.mark.parametrize("n_nodes", [20, 80])
def test_bfs_fill_matches_path_walking(n_nodes):
    rng = torch.Generator().manual_seed(n_nodes)
    d = TokenRecyclingDrafter(50, k=8, template=default_template(n_nodes))
    d.A.copy_(torch.randint(0, 50, (50, 8), generator=rng))
    paths = d.template.paths()
    for root in [0, 7, 49]:
        for depth in [1, 2, 3, 10]:
            draft = d.propose([3, root], max_tokens=depth)
            keep = [p for p in paths if len(p) <= depth]
            assert draft.tokens == brute_force_fill(d.A, root, keep)
            assert draft.parents == list(d.template.parents[:len(keep)]) and draft.depth == min(depth, max(map(len, paths)))
    assert len(d.propose([1], max_tokens=0)) == 0


def test_recycling_update_matches_brute_force():
    V, k = 30, 4
    rng = random.Random(0)
    for trial in range(20):
        d = TokenRecyclingDrafter(V, k=k, template=TreeTemplate.from_child_counts([(3,), (3, 2, 0), (1, 1, 0, 1, 1)]))
        d.A.copy_(torch.randint(0, 6, (V, k), generator=torch.Generator().manual_seed(trial)))  # many duplicates
        before = d.A.clone()
        root = rng.randrange(V)
        draft = d.propose([root], max_tokens=5)
        logits = torch.randn(1 + len(draft), V, generator=torch.Generator().manual_seed(100 + trial))
        d.observe([root], draft, 0, logits=logits)
        expected = before.clone()
        for row, t in enumerate([root] + draft.tokens):  # sequential writes: the last occurrence wins
            expected[t] = logits[row].topk(k).indices
        assert torch.equal(d.A, expected)


def test_observe_uses_the_logits_generate_passes(target):
    "The rows generate hands to observe are the target's own logits at [root] + nodes (checked without a cache)."
    prompt = [5, 9, 2, 7, 7, 1]
    d = TokenRecyclingDrafter(40, template=default_template(20))
    generate(target, prompt, 12, drafter=d)  # fill the table a little
    seen = []

    class Spy(TokenRecyclingDrafter):
        def observe(self, context, draft, accepted, logits):
            seen.append((list(context), draft, accepted, logits.clone(), self._root))
            super().observe(context, draft, accepted, logits)
    spy = Spy(40, template=default_template(20))
    spy.A.copy_(d.A)
    res = generate(target, prompt, 12, drafter=spy)
    context, draft, accepted, logits, root = seen[0]
    assert root == prompt[-1] and logits.shape == (1 + len(draft), 40) and len(draft) == 20
    # recompute each node's logits from scratch: prompt, then the node's path
    with torch.no_grad():
        for node in [-1, 0, 7, len(draft) - 1]:
            seq = prompt + [draft.tokens[i] for i in draft.path_to(node)]
            full = target(torch.tensor([seq]))[0, -1]
            assert torch.allclose(full, logits[node + 1], atol=1e-9)
    assert res.tokens == reference_decode(target, prompt, 12)


# ---------------------------------------------------------------- losslessness

PROMPTS = [[11], [3, 14, 15, 9, 2, 6], [1, 2, 3, 4, 5, 6] * 4, [7, 3, 9, 7, 3, 9, 7, 3], [0, 0, 0], [39, 38, 37, 36]]


@pytest.mark.parametrize("n_nodes", [5, 20, 80])
def test_lossless_cold_and_hot(target, n_nodes):
    hot = TokenRecyclingDrafter(40, template=default_template(n_nodes))
    for prompt in PROMPTS:
        ref = reference_decode(target, prompt, 40)
        cold = TokenRecyclingDrafter(40, template=default_template(n_nodes))
        for d in (cold, hot):
            res = generate(target, prompt, 40, drafter=d)
            assert res.tokens == ref
            assert res.new_tokens == sum(s.accepted + s.bonus for s in res.steps)
            assert res.target_calls == len(res.steps) + (len(prompt) > 1)
            assert all(s.tree_size <= n_nodes for s in res.steps)


@pytest.mark.parametrize("max_new", [1, 2, 3, 4, 7])
def test_lossless_at_max_new_tokens_boundaries(target, max_new):
    d = TokenRecyclingDrafter(40)
    for prompt in PROMPTS[:3] * 2:  # the second round is hot
        res = generate(target, prompt, max_new, drafter=d)
        assert res.tokens == reference_decode(target, prompt, max_new) and res.new_tokens == max_new


def test_lossless_with_eos_inside_accepted_drafts(target):
    prompt = [3, 1, 4, 1, 5]
    ref = reference_decode(target, prompt, 120)
    eos = ref[60]  # a token of the model's greedy loop
    d = TokenRecyclingDrafter(40)
    generate(target, prompt, 120, drafter=d)  # hot table: eos tokens get drafted and accepted
    res = generate(target, prompt, 120, drafter=d, eos_id=eos)
    assert res.tokens == reference_decode(target, prompt, 120, eos_id=eos) and res.stopped_by_eos
    assert res.steps[-1].bonus == 0 and res.steps[-1].accepted > 0  # the EOS was an accepted draft token, cut there


def test_exact_under_per_position_sampling(target):
    s = Sampler(temperature=1.0, seed=5)
    d = TokenRecyclingDrafter(40)
    for prompt in PROMPTS[:4]:
        assert generate(target, prompt, 30, drafter=d, sampler=s).tokens == \
            reference_decode(target, prompt, 30, sampler=s)


# ---------------------------------------------------------------- the mechanism pays off

def test_recycled_candidates_are_accepted_and_hot_start_helps(target):
    """The tiny greedy model falls into a loop: a cold table learns it within the prompt (MAT > 1), and a hot table that
    has seen the loop before accepts more per call than the cold one."""
    prompt = [3, 1, 4, 1, 5]
    d = TokenRecyclingDrafter(40)
    cold = generate(target, prompt, 120, drafter=d)
    hot = generate(target, prompt, 120, drafter=d)
    assert cold.tokens == hot.tokens == reference_decode(target, prompt, 120)
    assert cold.mean_accepted > 1.5 and hot.mean_accepted > cold.mean_accepted
    assert hot.steps[0].accepted > 0  # the hot table drafts correctly from the first step on
    d.reset()
    again = generate(target, prompt, 120, drafter=d)
    assert [s.accepted for s in again.steps] == [s.accepted for s in cold.steps]  # reset == cold start


def test_zero_table_drafts_token_zero():
    d = TokenRecyclingDrafter(10, k=2, template=TreeTemplate.from_paths([[0], [1], [0, 0]]))
    assert d.propose([4, 5], 5).tokens == [0, 0, 0]


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs(target):
    with pytest.raises(ValueError, match="vocab_size must be a positive int"): TokenRecyclingDrafter(0)
    with pytest.raises(ValueError, match="k must be an int"): TokenRecyclingDrafter(40, k=0)
    with pytest.raises(ValueError, match="uses candidate rank 7 but k=4"): TokenRecyclingDrafter(40, k=4)
    d = TokenRecyclingDrafter(40)
    with pytest.raises(ValueError, match="outside the drafter's vocabulary"): d.propose([1, 40], 3)
    with pytest.raises(ValueError, match="call propose first"): d.observe([1, 2], Draft.empty(), 0, torch.zeros(1, 40))
    draft = d.propose([1, 2], 3)
    with pytest.raises(ValueError, match=r"logits must be \[1 \+ len\(draft\), V\]"):
        d.observe([1, 2, 3], draft, 0, torch.zeros(3, 40))
    with pytest.raises(ValueError, match=r"logits must be"): d.observe([1, 2, 3], draft, 0, torch.zeros(1, 1 + len(draft), 40))


def test_storage_matches_the_paper():
    assert TokenRecyclingDrafter(1024).storage_bytes == 1024 * 8 * 8
    assert round(TokenRecyclingDrafter(32000).storage_bytes / 2**20, 2) == 1.95
    d = TokenRecyclingDrafter(8, k=2, template=TreeTemplate.from_paths([[0], [1]]))
    d.A[3, 1] = 5  # the NumPy view used for drafting is the table itself
    assert d.propose([3], 1).tokens == [0, 5]


def test_bench_factories_cold_fresh_hot_shared(target, monkeypatch):
    import paper_repro.decoding.token_recycling as tr
    # the dev prompts come from the training split through the tokenizer; the toy target gets toy prompts
    monkeypatch.setattr(tr, "function_prompts", lambda tok, n, k, split: [dict(ids=[1, 2, 3, 1, 2]), dict(ids=[5, 6])][:n])
    class Models: pass
    models = Models(); models.target = target; models.tokenizer = None
    f = {e.name: e.method.make for e in bench_methods(models)}
    cold, hot = f["Token Recycling (cold)"], f["Token Recycling (hot)"]
    assert cold() is not cold() and hot() is hot() and hot().vocab_size == 40
    assert generate(target, [1, 2, 3], 10, drafter=hot()).tokens == reference_decode(target, [1, 2, 3], 10)
    sized = [m for name, m in f.items() if "sized for the device" in name]
    assert len(sized) == 1 and sized[0]() is sized[0]() and len(sized[0]().template) in tr.TREE_SIZES
    assert generate(target, [1, 2, 3], 10, drafter=sized[0]()).tokens == reference_decode(target, [1, 2, 3], 10)
