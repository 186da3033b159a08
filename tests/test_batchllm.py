"""paper_repro.decoding.batchllm: prefix tree, one-level grouping DP, batching, LRU simulation, losslessness."""
import random

import pytest

from paper_repro.core.decoding import reference_decode
from paper_repro.decoding.batchllm import (Call, PrefixGroup, PrefixTree, batchllm_schedule, block_keys, check_schedule,
                                           group_requests, group_saving, ideal_saving, kv_slots, lru_realised,
                                           make_call, naive_schedule, one_level_groups, order_groups, pack_by_count,
                                           pack_by_memory, run_schedule, simulate_lru_cache)


def lcp(keys):
    n = 0
    while all(len(k) > n for k in keys) and len({k[n] for k in keys}) == 1: n += 1
    return n


def partitions(items):
    "Every set partition of `items` (brute force for small lists)."
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in partitions(rest):
        yield [[first]] + part
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]


def random_prompts(rng, n, vocab=3, max_shared=6, max_own=4):
    "Prompts cut from three nested stems (so the tree has sharing at several levels), some duplicates, one-token prompts."
    base = [rng.randrange(vocab) for _ in range(rng.randint(0, max_shared))]
    stems = [base] + [base[:rng.randint(0, len(base))] + [rng.randrange(vocab) for _ in range(rng.randint(0, max_shared))]
                      for _ in range(2)]
    out = []
    for _ in range(n):
        p = rng.choice(stems)[:rng.randint(0, max_shared + 3)] + [rng.randrange(vocab) for _ in range(rng.randint(0, max_own))]
        out.append(p or [rng.randrange(vocab)])
    return out


# ---------------------------------------------------------------- the prefix tree

@pytest.mark.parametrize("seed", range(6))
def test_tree_matches_brute_force(seed):
    rng = random.Random(seed)
    keys = [tuple(rng.randrange(3) for _ in range(rng.randint(0, 8))) for _ in range(30)]
    tree = PrefixTree(keys)
    distinct = {k[:i] for k in keys for i in range(1, len(k) + 1)}
    assert tree.unique_tokens == len(distinct) and tree.n_keys == len(keys) == tree.root.count
    stack = [(tree.root, ())]
    while stack:  # every node: its path, who ends there, how many pass through
        node, path = stack.pop()
        assert node.depth == len(path)
        assert sorted(node.ends) == [i for i, k in enumerate(keys) if k == path]
        assert node.count == sum(k[:len(path)] == path for k in keys)
        assert node is tree.root or len(node.children) != 1 or node.ends  # radix: no single-child chains
        stack.extend((c, path + c.label) for c in node.children.values())


def test_ideal_saving_matches_brute_force():
    rng = random.Random(1)
    for _ in range(20):
        prompts = random_prompts(rng, 12)
        distinct = {tuple(p[:i]) for p in prompts for i in range(1, len(p))}
        assert ideal_saving(prompts) == sum(map(len, prompts)) - len(distinct) - len(prompts)


# ---------------------------------------------------------------- one-level grouping

@pytest.mark.parametrize("seed", range(40))
def test_grouping_is_optimal_over_all_partitions(seed):
    rng = random.Random(seed)
    prompts = random_prompts(rng, rng.randint(1, 8), vocab=2 + seed % 3)
    keys = [p[:-1] for p in prompts]
    groups = group_requests(prompts)
    assert sorted(m for g in groups for m in g.members) == list(range(len(prompts)))
    for g in groups:
        assert g.prefix_len <= lcp([keys[m] for m in g.members])  # the prefix is really shared, one token left
    brute = max(sum((len(g) - 1) * lcp([keys[m] for m in g]) for g in part) for part in partitions(list(range(len(prompts)))))
    assert group_saving(groups) == brute


def test_grouping_may_split_a_subtree():
    """Requests 0 and 1 share 11 tokens; request 2 only 5 with them. The optimum puts 0, 1 in a deep group and lets 2
    join the header group of 3-5 (11 + 3*4 = 23); choosing whole subtrees only reaches 20 (all six on the header)."""
    H = [0, 0, 0, 0]
    prompts = [H + [1] + [2] * 6 + [7, 9], H + [1] + [2] * 6 + [8, 9], H + [1, 3, 9]] + [H + [5, 10 + i, 9] for i in range(3)]
    groups = {tuple(g.members): g.prefix_len for g in group_requests(prompts)}
    assert groups == {(0, 1): 11, (2, 3, 4, 5): 4}
    assert group_saving(group_requests(prompts)) == 23


def test_grouping_prefers_long_documents_and_pools_the_rest():
    header, doc_a, doc_b = [9, 9], [1, 2, 3, 4, 5], [6, 7, 8, 1, 2]
    prompts = [header + doc_a + [10 + i, 0] for i in range(3)] + [header + doc_b + [20 + i, 0] for i in range(2)] + \
              [header + [30 + i, 0] for i in range(3)]
    groups = {tuple(g.members): g.prefix_len for g in group_requests(prompts)}
    assert groups == {(0, 1, 2): 7, (3, 4): 7, (5, 6, 7): 2}
    assert one_level_groups(PrefixTree([])) == []


# ---------------------------------------------------------------- ordering and batching

def test_order_groups_is_decode_heavy_first():
    rng = random.Random(3)
    prompts = random_prompts(rng, 25)
    budgets = [rng.randint(1, 20) for _ in prompts]
    ordered = order_groups(group_requests(prompts), prompts, budgets)
    ratio = lambda m, p: budgets[m] / (len(prompts[m]) - p)
    for g in ordered:
        r = [ratio(m, g.prefix_len) for m in g.members]
        assert r == sorted(r, reverse=True)
    gr = [sum(budgets[m] for m in g.members) / (g.prefix_len + sum(len(prompts[m]) - g.prefix_len for m in g.members))
          for g in ordered]
    assert gr == sorted(gr, reverse=True)


@pytest.mark.parametrize("prefix_once", [False, True])
def test_memory_packing_respects_the_cap_and_groups(prefix_once):
    rng = random.Random(4)
    prompts = random_prompts(rng, 40, max_shared=10)
    budgets = [rng.randint(1, 12) for _ in prompts]
    groups = order_groups(group_requests(prompts), prompts, budgets)
    cap = max(kv_slots([i], prompts, budgets) for i in range(len(prompts))) * 3
    calls = pack_by_memory(groups, prompts, budgets, cap, prefix_once)
    check_schedule(calls, prompts)
    group_of = {m: gi for gi, g in enumerate(groups) for m in g.members}
    flat = [m for c in calls for m in c.members]
    assert flat == [m for g in groups for m in g.members]  # consecutive chunks, order kept
    for c in calls:
        assert kv_slots(c.members, prompts, budgets, c.prefix_len, prefix_once) <= cap
        assert len({group_of[m] for m in c.members}) == 1
        assert c == make_call(c.members, prompts)
    assert len(calls) < len(prompts)  # it does batch
    with pytest.raises(ValueError, match="more than max_kv_slots"): pack_by_memory(groups, prompts, budgets, 3)
    with pytest.raises(ValueError, match="max_kv_slots must be a positive int"): pack_by_memory(groups, prompts, budgets, 0)


def test_kv_slots_formula():
    prompts, budgets = [[1, 2, 3, 4], [1, 2, 5]], [3, 6]
    assert kv_slots([0, 1], prompts, budgets) == 2 * (4 + 6 - 1)
    assert kv_slots([0, 1], prompts, budgets, prefix_len=2, prefix_once=True) == 2 + 2 * (4 - 2 + 6 - 1)
    assert make_call([0, 1], prompts) == Call((0, 1), 2) and make_call([0], prompts) == Call((0,), 0)
    assert make_call([0, 1], prompts, share=False).prefix_len == 0
    assert make_call([0, 0], [[1, 2, 3]]).prefix_len == 2  # identical prompts share all but the last token


# ---------------------------------------------------------------- LRU simulation

def test_lru_with_unbounded_cache_matches_brute_force():
    rng = random.Random(5)
    bs = 2
    for _ in range(10):
        prompts = random_prompts(rng, 16, max_shared=9)
        budgets = [rng.randint(1, 5) for _ in prompts]
        calls = naive_schedule(len(prompts), 3)
        hits = simulate_lru_cache(prompts, budgets, calls, capacity_tokens=10 ** 6, block_size=bs)
        for ci, c in enumerate(calls):
            earlier = [prompts[m][:-1] for d in calls[:ci] for m in d.members]
            for m in c.members:
                key = prompts[m][:-1]
                best = max([h for h in range(0, len(key) // bs + 1)
                            if any(len(e) >= h * bs and e[:h * bs] == key[:h * bs] for e in earlier)] + [0])
                assert hits[m] == best * bs and hits[m] <= len(prompts[m]) - 1
        assert simulate_lru_cache(prompts, budgets, calls, capacity_tokens=0, block_size=bs) == [0] * len(prompts)


def test_lru_evicts_least_recently_used():
    A, B = [1, 2, 3, 4], [5, 6, 7, 8]
    prompts, budgets = [A + [0], B + [0], A + [0]], [1, 1, 1]
    calls = naive_schedule(3, 1)
    assert simulate_lru_cache(prompts, budgets, calls, capacity_tokens=10, block_size=2) == [0, 0, 4]
    assert simulate_lru_cache(prompts, budgets, calls, capacity_tokens=6, block_size=2) == [0, 0, 0]
    assert block_keys([1, 2, 3, 4, 5], 2) == [((), (1, 2)), (((), (1, 2)), (3, 4))]


def test_lru_realised_is_common_and_cached():
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 9, 9]]
    calls = [Call((0, 1, 2), 0)]
    assert lru_realised(calls, prompts, [4, 4, 2]) == [Call((0, 1, 2), 2)]
    assert lru_realised(calls, prompts, [4, 4, 4]) == [Call((0, 1, 2), 3)]
    assert lru_realised(calls, prompts, [0, 4, 4]) == [Call((0, 1, 2), 0)]


# ---------------------------------------------------------------- running schedules: lossless

def all_schedules(prompts, budgets, batch_size, cap):
    groups = group_requests(prompts)
    naive = naive_schedule(len(prompts), batch_size)
    hits = simulate_lru_cache(prompts, budgets, naive, cap, block_size=2)
    return {"naive": naive, "lru": lru_realised(naive, prompts, hits),
            "grouping": pack_by_count(groups, prompts, batch_size),
            "batchllm": batchllm_schedule(prompts, budgets, cap),
            "batchllm_once": batchllm_schedule(prompts, budgets, cap, prefix_once=True)}


def test_every_schedule_is_lossless(target):
    rng = random.Random(7)
    docs = [[rng.randrange(40) for _ in range(rng.randint(3, 12))] for _ in range(3)]
    prompts = [rng.choice(docs) + [rng.randrange(40) for _ in range(rng.randint(1, 5))] for _ in range(14)]
    prompts += [[5], [7, 1], list(docs[0]), list(docs[0])]  # a one-token prompt, a duplicate pair
    budgets = [rng.choice([1, 2, 7, 15]) for _ in prompts]
    ref = [reference_decode(target, p, n) for p, n in zip(prompts, budgets)]
    cap = 4 * max(len(p) + n - 1 for p, n in zip(prompts, budgets))
    for name, calls in all_schedules(prompts, budgets, 4, cap).items():
        res = run_schedule(target, prompts, budgets, calls)
        assert res.tokens == ref, name
        assert res.peak_kv_slots <= max(kv_slots(c.members, prompts, budgets) for c in calls), name
        assert res.computed_prompt_tokens == sum(c.prefix_len + sum(len(prompts[m]) - c.prefix_len for m in c.members)
                                                 for c in calls)
        assert res.new_tokens == sum(budgets)
    grouped = run_schedule(target, prompts, budgets, batchllm_schedule(prompts, budgets, cap))
    assert grouped.token_saving > 0.3 and grouped.peak_kv_slots <= cap


def test_schedules_are_lossless_with_eos(target):
    prompts = [[3, 1, 4, 1, 5, 9, i] for i in range(6)] + [[2, 7, 1, 8]]
    budgets = [20] * len(prompts)
    free = [reference_decode(target, p, 20) for p in prompts]
    eos = free[0][3]  # a token the model does emit: some rows stop early
    ref = [reference_decode(target, p, 20, eos_id=eos) for p in prompts]
    assert any(len(r) < 20 for r in ref)
    for name, calls in all_schedules(prompts, budgets, 3, 10 ** 4).items():
        assert run_schedule(target, prompts, budgets, calls, eos_id=eos).tokens == ref, name


# ---------------------------------------------------------------- bad input

def test_bad_inputs(target):
    with pytest.raises(ValueError, match="prompts is empty"): group_requests([])
    with pytest.raises(ValueError, match="are empty"): group_requests([[1], []])
    with pytest.raises(ValueError, match="budgets for"): batchllm_schedule([[1, 2]], [3, 4], 100)
    with pytest.raises(ValueError, match="positive ints"): batchllm_schedule([[1, 2]], [0], 100)
    with pytest.raises(ValueError, match="batch_size must be"): naive_schedule(4, 0)
    with pytest.raises(ValueError, match="batch_size must be"): pack_by_count([PrefixGroup(0, [0])], [[1]], 0)
    with pytest.raises(ValueError, match="block_size must be"): simulate_lru_cache([[1, 2]], [1], [Call((0,))], 10, 0)
    with pytest.raises(ValueError, match="capacity_tokens"): simulate_lru_cache([[1, 2]], [1], [Call((0,))], -1)
    with pytest.raises(ValueError, match="at least one member"): make_call([], [[1]])
    prompts, budgets = [[1, 2, 3], [1, 2, 4]], [2, 2]
    with pytest.raises(ValueError, match="exactly once"): run_schedule(target, prompts, budgets, [Call((0,))])
    with pytest.raises(ValueError, match="exactly once"): run_schedule(target, prompts, budgets, [Call((0, 1)), Call((1,))])
    with pytest.raises(ValueError, match="do not share"): run_schedule(target, prompts, budgets, [Call((0, 1), 3)])
