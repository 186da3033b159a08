"""paper_repro.dllm.parallelbench: the ideal model's marginals, the closed forms, Monte-Carlo through the sampler."""
import itertools
import math
import random

import pytest
import torch

from paper_repro.dllm.core import DecodeConfig, diffusion_generate
from paper_repro.dllm.parallelbench import (GREEDY_TEMPERATURE, IdealLM, agrees, bench_methods, closed_form,
                                            ideal_config, one_step_replace_random, replace_random_greedy_accuracy,
                                            replace_random_sampled_accuracy, replace_random_threshold_accuracy,
                                            shuffle_threshold_accuracy, shuffle_topk_accuracy, token_dependency,
                                            token_dependency_from_marginals, topk_sizes, wilson_interval)
from paper_repro.dllm.tasks import EOS_ID, MASK_ID, TOKEN_ID, VOCAB_SIZE, make_example, sample_examples


# ---------------------------------------------------------------- brute-force references
def answers(ex):
    "Every right answer (token ids over the window) of the ideal distribution, by enumeration."
    L = len(ex.answer)
    pad = lambda s: [TOKEN_ID[c] for c in s] + [EOS_ID] * (L - len(s))
    x = ex.info.get("input")
    if ex.task == "replace_random": return [pad(x[:i] + ex.info["letter"] + x[i + 1:]) for i in range(len(x))]
    if ex.task == "shuffle": return [pad("".join(p)) for p in itertools.permutations(x)]
    return [list(ex.answer)]


def brute_marginals(ex, y):
    "Conditional marginals [L, V]: uniform over the answers agreeing with the known tokens of y."
    ok = [a for a in answers(ex) if all(t == MASK_ID or t == s for t, s in zip(y, a))]
    p = torch.zeros(len(y), VOCAB_SIZE, dtype=torch.float64)
    for a in ok:
        for j, s in enumerate(a): p[j, s] += 1 / len(ok)
    return p, len(ok)


def exact_accuracy(ex, sizes, mode):
    """Exact probability that the ideal decode (steps of `sizes` positions, left to right; `mode` 'sample' or 'greedy'
    with uniformly random ties) ends in one of the ideal answers, by enumerating every outcome of every step."""
    model = IdealLM([ex])
    good = {tuple(a) for a in answers(ex)}
    L = len(ex.answer)

    def rec(y, step):
        if step == len(sizes): return float(tuple(y) in good)
        pos = [j for j in range(L) if y[j] == MASK_ID][:sizes[step]]
        p = model.marginals(torch.tensor([y]))[0]
        choices = []
        for j in pos:
            row = p[j]
            if mode == "greedy":
                best = (row == row.max()).nonzero().flatten().tolist()
                choices.append([(t, 1 / len(best)) for t in best])
            else:
                choices.append([(t, float(row[t])) for t in row.nonzero().flatten().tolist()])
        total = 0.0
        for combo in itertools.product(*choices):
            y2 = list(y)
            w = 1.0
            for j, (t, q) in zip(pos, combo): y2[j] = t; w *= q
            total += w * rec(y2, step + 1)
        return total

    return rec([MASK_ID] * L, 0)


# ---------------------------------------------------------------- the ideal model
@pytest.mark.parametrize("task", ["copy", "replace_random", "shuffle"])
@pytest.mark.parametrize("n", [3, 5])
def test_marginals_match_enumeration(task, n):
    rng = random.Random(n)
    ex = make_example(task, rng, n=n, gen_length=n + 2)
    model = IdealLM([ex])
    for trial in range(12):
        # commit a random subset of positions with the tokens of a random right answer (a consistent state)
        a = rng.choice(answers(ex))
        y = [t if rng.random() < 0.4 else MASK_ID for t in a]
        ref, count = brute_marginals(ex, y)
        assert count >= 1
        got = model.marginals(torch.tensor([y]))[0]
        assert torch.allclose(got, ref, atol=1e-12), (task, y)


def test_batch_rows_are_independent():
    exs = [make_example(t, random.Random(i), n=5, gen_length=7)
           for i, t in enumerate(["copy", "shuffle", "replace_random", "reverse", "shuffle"])]
    y = torch.full((5, 7), MASK_ID)
    y[1, 0] = TOKEN_ID[exs[1].info["input"][2]]
    y[2, 3] = TOKEN_ID[exs[2].info["input"][3]]
    joint = IdealLM(exs).marginals(y)
    for b, e in enumerate(exs):
        assert torch.equal(joint[b], IdealLM([e]).marginals(y[b:b + 1])[0])


def test_unconditional_model_ignores_commits():
    ex = make_example("shuffle", random.Random(0), n=4, gen_length=4)
    model = IdealLM([ex], conditional=False)
    y = torch.full((1, 4), MASK_ID)
    before = model.marginals(y)
    y[0, 0] = TOKEN_ID[ex.info["input"][0]]
    assert torch.equal(model.marginals(y), before)
    assert not torch.equal(IdealLM([ex]).marginals(y), before)


# ---------------------------------------------------------------- token dependency
@pytest.mark.parametrize("task", ["copy", "replace_index", "replace_random", "shuffle"])
@pytest.mark.parametrize("n", [2, 4, 6])
def test_token_dependency_closed_form_vs_enumeration(task, n):
    ex = make_example(task, random.Random(n), n=n, gen_length=n)
    ans = answers(ex)
    p, count = brute_marginals(ex, [MASK_ID] * n)
    assert token_dependency(task, n) == pytest.approx(token_dependency_from_marginals(p, count), abs=1e-9)
    m = IdealLM([ex]).marginals(torch.full((1, n), MASK_ID))[0]
    assert token_dependency(task, n) == pytest.approx(token_dependency_from_marginals(m, len(ans)), abs=1e-9)


def test_token_dependency_limits():
    assert token_dependency("replace_random", 100_000) == pytest.approx(math.log2(math.e), abs=1e-4)
    assert token_dependency("shuffle", 50) > token_dependency("shuffle", 10) > token_dependency("replace_random", 10)


# ---------------------------------------------------------------- closed forms vs exact enumeration of the process
@pytest.mark.parametrize("n,sizes", [(3, [1, 1, 1]), (3, [3]), (4, [2, 2]), (4, [3, 1]), (4, [1, 3]), (5, [2, 2, 1]),
                                     (4, [4]), (2, [2])])
def test_closed_forms_equal_exact_enumeration(n, sizes):
    sh = make_example("shuffle", random.Random(1), n=n, gen_length=n)
    rr = make_example("replace_random", random.Random(2), n=n, gen_length=n)
    for mode in ("sample", "greedy"):
        assert exact_accuracy(sh, sizes, mode) == pytest.approx(shuffle_topk_accuracy(n, sizes), abs=1e-12)
    assert exact_accuracy(rr, sizes, "sample") == pytest.approx(replace_random_sampled_accuracy(n, sizes), abs=1e-12)
    assert exact_accuracy(rr, sizes, "greedy") == pytest.approx(replace_random_greedy_accuracy(n, sizes), abs=1e-12)


def test_paper_values():
    for n in (2, 5, 9):
        assert closed_form("shuffle", n, k=1) == 1.0
        assert closed_form("shuffle", n, k=n) == pytest.approx(math.factorial(n) / n ** n)
        assert closed_form("copy", n, k=n) == 1.0
    assert closed_form("shuffle", 6, k=2) == pytest.approx((6 * 5 / 36) * (4 * 3 / 16) * (2 / 4))
    for n in (4, 8, 12):
        assert closed_form("replace_random", n, k=1) == 1.0
        assert closed_form("replace_random", n, k=2) == 0.5
        assert closed_form("replace_random", n, k=n) == 0.0
        assert one_step_replace_random(n) == pytest.approx(((n - 1) / n) ** (n - 1))
    assert one_step_replace_random(100_000) == pytest.approx(1 / math.e, abs=1e-5)
    assert closed_form("replace_random", 8, k=8, temperature=1, score="confidence") is None
    assert closed_form("shuffle", 4, k=1, scorer=True) == pytest.approx(1 - 1 / 24)


def test_threshold_closed_forms():
    for n in (4, 10):
        assert shuffle_threshold_accuracy(n, 0.51) == 1.0
        assert shuffle_threshold_accuracy(n, 0.5) == 0.5
        assert shuffle_threshold_accuracy(n, 0.3) == pytest.approx(6 / 27)
        assert shuffle_threshold_accuracy(n, 1e-3) == pytest.approx(math.factorial(n) / n ** n)
        assert replace_random_threshold_accuracy(n, (n - 1) / n + 0.01) == 1.0
        assert replace_random_threshold_accuracy(n, (n - 1) / n - 0.01) == 0.0


# ---------------------------------------------------------------- Monte-Carlo through the shared sampler
def simulate(task, n, samples, seed, conditional=True, **setting):
    exs = sample_examples(task, samples, seed=seed, n=n, gen_length=n)
    res = diffusion_generate(IdealLM(exs, conditional=conditional), [e.prompt for e in exs], ideal_config(n, seed=seed, **setting))
    return sum(e.score(r) for e, r in zip(exs, res.sequences)), res


@pytest.mark.parametrize("task,setting", [
    ("shuffle", dict(k=2, temperature=1, score="random")),
    ("shuffle", dict(k=3, temperature=0, score="confidence")),
    ("replace_random", dict(k=2, temperature=0, score="confidence")),
    ("replace_random", dict(k=2, temperature=1, score="random")),
    ("replace_random", dict(k=6, temperature=1, score="random")),
    ("replace_random", dict(k=6, temperature=0, score="confidence")),
    ("copy", dict(k=6, temperature=1, score="random")),
    ("shuffle", dict(rule="threshold", gamma=0.3, temperature=0)),
    ("replace_random", dict(rule="threshold", gamma=0.9, temperature=0)),
])
def test_monte_carlo_agrees_with_closed_form(task, setting):
    n, samples = 6, 1500
    right, res = simulate(task, n, samples, seed=11, **setting)
    closed = closed_form(task, n, scorer=True, **setting)
    assert agrees(closed, right, samples), (right / samples, closed)
    if setting.get("rule", "topk") == "topk":
        assert res.nfe == len(topk_sizes(n, setting["k"]))


def test_negative_control_is_rejected():
    for task in ("shuffle", "replace_random"):
        right, _ = simulate(task, 6, 1000, seed=3, conditional=False, k=1, temperature=1, score="random")
        assert not agrees(closed_form(task, 6, k=1, temperature=1, score="random", scorer=True), right, 1000)


def test_greedy_ties_are_broken_at_random_and_seeded():
    # replace random, k=2, n=2: the two positions tie; both outcomes of each must occur, and a seed fixes the run
    r1, a = simulate("replace_random", 2, 400, seed=5, k=2, temperature=0)
    r2, b = simulate("replace_random", 2, 400, seed=5, k=2, temperature=0)
    assert r1 == r2 and torch.equal(a.sequences, b.sequences)
    assert 0.35 < r1 / 400 < 0.65
    assert len({tuple(s.tolist()) for s in a.sequences[:50]}) > 1


def test_window_with_eos_tail_decodes_right_answers():
    exs = sample_examples(["copy", "replace_random", "shuffle", "sort"], 40, seed=2, n=7, gen_length=12)
    res = diffusion_generate(IdealLM(exs), [e.prompt for e in exs], DecodeConfig(gen_length=12, block_length=12, steps=12,
                                                                        temperature=GREEDY_TEMPERATURE))
    assert all(e.score(r) or (e.task == "shuffle" and r[:7].tolist() == [TOKEN_ID[c] for c in e.info["input"]])
               for e, r in zip(exs, res.sequences))


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100, z=1.96)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.19, abs=0.01)
    assert wilson_interval(0, 100)[0] == 0.0 and wilson_interval(100, 100)[1] == 1.0
    assert agrees(1.0, 100, 100) and not agrees(1.0, 99, 100) and agrees(0.0, 0, 5)


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs():
    ex = make_example("latin", random.Random(0))
    with pytest.raises(ValueError, match="no exact marginals"): IdealLM([ex])
    with pytest.raises(ValueError, match="at least one"): IdealLM([])
    with pytest.raises(ValueError, match="different generation windows"):
        IdealLM([make_example("copy", random.Random(0), n=4, gen_length=4),
                 make_example("copy", random.Random(0), n=4, gen_length=5)])
    with pytest.raises(ValueError, match="k=0"): topk_sizes(4, 0)
    with pytest.raises(ValueError, match="k=5"): topk_sizes(4, 5)
    with pytest.raises(ValueError, match="unknown task"): closed_form("latin", 4, k=1)
    with pytest.raises(ValueError, match="temperature"): closed_form("shuffle", 4, k=1, temperature=0.5)
    with pytest.raises(ValueError, match="rule"): closed_form("shuffle", 4, rule="factor")
    with pytest.raises(ValueError, match="schedule"): shuffle_topk_accuracy(4, [2, 1])
    with pytest.raises(ValueError, match="n=0"): token_dependency("shuffle", 0)
    with pytest.raises(ValueError, match="no closed form"): token_dependency("sort", 4)
    with pytest.raises(ValueError, match="gamma"): shuffle_threshold_accuracy(4, 0)
    with pytest.raises(ValueError, match="trials"): wilson_interval(3, 2)
    ex = make_example("copy", random.Random(0), n=4, gen_length=4)
    with pytest.raises(ValueError, match="cache"):
        diffusion_generate(IdealLM([ex]), [ex.prompt], DecodeConfig(gen_length=4, block_length=4, steps=4, cache="prefix"))
    assert bench_methods(None) == []


def test_threshold_oracle_picks_the_fastest_correct_threshold_per_example():
    from paper_repro.dllm.parallelbench import threshold_oracle
    g = torch.Generator().manual_seed(0)
    correct = torch.rand(4, 50, generator=g) < 0.5
    nfe = torch.randint(1, 33, (4, 50), generator=g)
    o = threshold_oracle(correct, nfe, 32)
    passes = []
    for j in range(50):  # brute force, one example at a time
        ok = [i for i in range(4) if correct[i, j]]
        passes.append(min(int(nfe[i, j]) for i in ok) if ok else int(nfe[0, j]))
    assert math.isclose(o["tokens_per_step"], 32 / (sum(passes) / 50))
    assert math.isclose(o["accuracy"], float(correct.any(0).double().mean()))
    # never worse than any fixed threshold in accuracy
    assert o["accuracy"] >= float(correct.double().mean(1).max())
    with pytest.raises(ValueError, match="same non-empty"): threshold_oracle(correct[:, :0], nfe[:, :0], 32)
