"""Losslessness and invariants of paper_repro.core.decoding (float64, CPU)."""
import random

import pytest
import torch

from paper_repro.core.decoding import (Draft, DraftModelDrafter, Sampler, generate, greedy_decode, reference_decode,
                                       verify_speculative, verify_tree)
from conftest import tiny_lm

PROMPTS = [[1], [5, 9], [3, 14, 15, 9, 2, 6], list(range(2, 30, 3)), [7] * 12]


class OracleDrafter:
    "Knows the reference continuation; optional corruption turns it into an always-wrong drafter."
    def __init__(self, continuation, prompt_len, k, wrong=False, vocab=40):
        self.cont, self.n0, self.k, self.wrong, self.vocab = continuation, prompt_len, k, wrong, vocab
    def propose(self, context, max_tokens):
        done = len(context) - self.n0
        toks = self.cont[done:done + min(self.k, max_tokens)]
        if self.wrong: toks = [(t + 1) % self.vocab for t in toks]
        return Draft.chain(toks, source="oracle")
    def observe(self, *a): pass


class RandomDrafter:
    "Random chains or trees (with duplicate siblings) of random depth, seeded."
    def __init__(self, vocab=40, seed=0, tree=False, reuse_context=True):
        self.rng, self.vocab, self.tree, self.reuse = random.Random(seed), vocab, tree, reuse_context
    def _tok(self, context):
        # half of the time guess a token seen in the context, so some drafts are accepted
        return self.rng.choice(context) if self.reuse and self.rng.random() < 0.5 else self.rng.randrange(self.vocab)
    def propose(self, context, max_tokens):
        depth = self.rng.randint(0, min(5, max_tokens))
        if not self.tree: return Draft.chain([self._tok(context) for _ in range(depth)], source="random")
        tokens, parents, depths = [], [], []
        for _ in range(self.rng.randint(0, 12)):
            p = self.rng.choice([-1] + [i for i, d in enumerate(depths) if d < depth])
            tokens.append(self._tok(context)); parents.append(p); depths.append(1 if p < 0 else depths[p] + 1)
            if self.rng.random() < 0.2 and tokens:  # duplicate sibling
                tokens.append(tokens[-1]); parents.append(p); depths.append(depths[-1])
        d = Draft(tokens, parents, source="random_tree")
        return d if d.depth <= max_tokens else Draft.empty()
    def observe(self, *a): pass


def check_invariants(res, max_new):
    assert res.new_tokens == sum(s.accepted + s.bonus for s in res.steps)
    assert res.target_calls == len(res.steps) + res.prefill_calls
    assert res.prefill_calls == (1 if res.prompt_len > 1 else 0)
    assert res.new_tokens <= max_new
    assert all(s.bonus == 1 for s in res.steps[:-1])
    assert all(0 <= s.accepted <= s.drafted for s in res.steps)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_plain_greedy_matches_reference_without_cache(target, prompt):
    ref = reference_decode(target, prompt, 25)
    res = greedy_decode(target, prompt, 25)
    assert res.tokens == ref and res.mean_accepted == 1.0
    check_invariants(res, 25)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_oracle_drafter_accepts_everything(target, prompt):
    ref = reference_decode(target, prompt, 30)
    res = generate(target, prompt, 30, OracleDrafter(ref, len(prompt), k=4))
    assert res.tokens == ref
    assert res.mean_accepted == 5.0  # 4 drafted + 1 bonus every step: 30 = 6 steps of 5
    check_invariants(res, 30)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_always_wrong_drafter_is_plain_decoding(target, prompt):
    ref = reference_decode(target, prompt, 20)
    res = generate(target, prompt, 20, OracleDrafter(ref, len(prompt), k=3, wrong=True))
    assert res.tokens == ref and res.mean_accepted == 1.0
    assert all(s.accepted == 0 for s in res.steps)  # rejection at position 0 every step
    check_invariants(res, 20)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tree", [False, True])
def test_random_drafts_are_lossless(target, seed, tree):
    prompt = PROMPTS[seed % len(PROMPTS)]
    ref = reference_decode(target, prompt, 40)
    res = generate(target, prompt, 40, RandomDrafter(seed=seed, tree=tree))
    assert res.tokens == ref
    check_invariants(res, 40)


def test_draft_model_speculative_decoding_is_lossless(target, draft_model):
    for prompt in PROMPTS:
        for gamma in (1, 3, 6):
            ref = reference_decode(target, prompt, 33)
            res = generate(target, prompt, 33, DraftModelDrafter(draft_model, gamma=gamma))
            assert res.tokens == ref, (prompt, gamma)
            assert res.draft_calls == sum(s.drafted for s in res.steps)  # one draft forward per drafted token
            check_invariants(res, 33)


def test_drafter_reused_across_prompts(target, draft_model):
    drafter = DraftModelDrafter(draft_model, gamma=4)
    for prompt in PROMPTS + PROMPTS[::-1]:
        assert generate(target, prompt, 15, drafter).tokens == reference_decode(target, prompt, 15)


def test_eos_inside_accepted_draft(target):
    prompt = PROMPTS[2]
    ref = reference_decode(target, prompt, 30)
    eos = ref[7]
    cut = ref[: ref.index(eos) + 1]
    res = generate(target, prompt, 30, OracleDrafter(ref, len(prompt), k=10), eos_id=eos)
    assert res.tokens == cut and res.stopped_by_eos
    assert res.tokens == reference_decode(target, prompt, 30, eos_id=eos)
    check_invariants(res, 30)


@pytest.mark.parametrize("max_new", [1, 2, 5, 11])
def test_max_new_tokens_boundary(target, max_new):
    prompt = PROMPTS[3]
    ref = reference_decode(target, prompt, 40)
    res = generate(target, prompt, max_new, OracleDrafter(ref, len(prompt), k=8))
    assert res.tokens == ref[:max_new]
    check_invariants(res, max_new)


def test_empty_drafts_and_one_token_prompt(target):
    res = generate(target, [4], 10, OracleDrafter([], 1, k=0))
    assert res.tokens == reference_decode(target, [4], 10) and res.prefill_calls == 0 and res.target_calls == 10


def test_duplicate_siblings_pick_one_path(target):
    prompt = PROMPTS[2]
    ref = reference_decode(target, prompt, 3)
    draft = Draft([ref[0], ref[0], ref[1], ref[1]], [-1, -1, 0, 1])
    cache = target.new_cache()
    target(torch.tensor([prompt[:-1]]), cache=cache)
    from paper_repro.core.decoding import _verify_step
    path, bonus, logits = _verify_step(target, cache, prompt[-1], draft, Sampler())
    assert logits.shape == (1 + len(draft), 40)
    assert [draft.tokens[i] for i in path] + [bonus] == ref[:3]
    assert path == [0, 2] and cache.length == len(prompt) + 2  # first sibling wins; cache keeps root + path


def test_verify_tree_unit():
    # root predicts 5; node0=5 (correct), node1=6 (wrong sibling), node2 child of node0 = 8, target after node0 is 8
    draft = Draft([5, 6, 8], [-1, -1, 0])
    path, bonus = verify_tree(draft, torch.tensor([5, 8, 1, 4]))  # rows: root, node0, node1, node2
    assert path == [0, 2] and bonus == 4
    path, bonus = verify_tree(draft, torch.tensor([7, 9, 1, 4]))
    assert path == [] and bonus == 7


@pytest.mark.parametrize("tree", [False, True])
def test_sampling_with_deterministic_drafts_equals_seeded_ar_sampling(target, tree):
    for seed in range(3):
        s = Sampler(temperature=0.8, top_k=20, seed=seed)
        prompt = PROMPTS[seed + 1]
        ref = reference_decode(target, prompt, 30, sampler=s)
        res = generate(target, prompt, 30, RandomDrafter(seed=seed, tree=tree), sampler=s)
        assert res.tokens == ref
        check_invariants(res, 30)


def _joint_first_two(run, n, vocab):
    counts = torch.zeros(vocab, vocab)
    for _ in range(n):
        a, b = run()
        counts[a, b] += 1
    return counts / n


def test_speculative_sampling_verifier_matches_target_distribution():
    """Toy target/draft given as tables over a vocabulary of 8; a deliberately bad draft. The joint distribution of the
    first two emitted tokens must match the target's exact joint p1(a) P2(b | a)."""
    V, N = 8, 20_000
    g = torch.Generator().manual_seed(0)
    p1 = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 1.5, -1)
    P2 = torch.softmax(torch.randn(V, V, generator=g, dtype=torch.float64) * 1.5, -1)
    q1 = torch.softmax(-p1.log(), -1)  # bad draft: anti-correlated with the target
    Q2 = torch.softmax(torch.randn(V, V, generator=g, dtype=torch.float64) * 2.0, -1)
    uniform = torch.full((V,), 1.0 / V, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)

    def one_run(verifier):
        out = []
        while len(out) < 2:
            if not out:  # draft two tokens from q, verify against p
                x1 = int(torch.multinomial(q1, 1, generator=gen)); x2 = int(torch.multinomial(Q2[x1], 1, generator=gen))
                p = torch.stack([p1, P2[x1], uniform]); q = torch.stack([q1, Q2[x1]]); toks = [x1, x2]
            else:  # one token drafted after the first
                a = out[0]
                x = int(torch.multinomial(Q2[a], 1, generator=gen))
                p = torch.stack([P2[a], uniform]); q = Q2[a][None]; toks = [x]
            k, nxt = verifier(p, q, toks, gen)
            out += toks[:k] + [nxt]
        return out[0], out[1]

    exact = p1[:, None] * P2
    emp = _joint_first_two(lambda: one_run(verify_speculative), N, V)
    tv = 0.5 * (emp - exact).abs().sum().item()
    # sampling noise of the TV distance over 64 cells at N=20k is about 0.02; a biased verifier is far above 0.05
    assert tv < 0.05, tv

    def accept_all(p, q, toks, gen):  # negative control: a verifier that ignores p
        return len(toks), int(torch.multinomial(p[len(toks)], 1, generator=gen))
    emp_bad = _joint_first_two(lambda: one_run(accept_all), 5_000, V)
    assert 0.5 * (emp_bad - exact).abs().sum().item() > 0.2


def test_speculative_decoding_end_to_end_runs_and_keeps_invariants(target, draft_model):
    s = Sampler(temperature=1.0, seed=0)
    res = generate(target, PROMPTS[2], 40, DraftModelDrafter(draft_model, gamma=4, sampler=s), sampler=s)
    check_invariants(res, 40)
    assert all(0 <= t < 40 for t in res.tokens)


def test_bad_inputs(target):
    with pytest.raises(ValueError, match="prompt is empty"): generate(target, [], 5)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got 0"): generate(target, [1], 0)
    with pytest.raises(ValueError, match="outside the vocabulary"): generate(target, [1, 400], 3)
    with pytest.raises(ValueError, match="temperature must be >= 0"): Sampler(temperature=-1)
    with pytest.raises(ValueError, match="gamma must be >= 1"): DraftModelDrafter(target, gamma=0)

    class Greedy:
        def propose(self, context, max_tokens): return Draft.chain([1] * (max_tokens + 1))
        def observe(self, *a): pass
    with pytest.raises(ValueError, match="at most"): generate(target, [1, 2], 3, Greedy())


def test_observe_receives_the_verify_pass_logits(target):
    """Row 0 is the target's prediction after the committed context; row i+1 the prediction after draft node i."""
    seen = []

    class Recorder(RandomDrafter):
        def observe(self, context, draft, accepted, logits): seen.append((list(context), draft, accepted, logits))
    prompt = PROMPTS[3]
    generate(target, prompt, 12, Recorder(seed=3, tree=True))
    with torch.no_grad():
        for context, draft, accepted, logits in seen[:5]:
            before = context[: len(context) - accepted - 1]  # context when the draft was proposed
            assert logits.shape == (1 + len(draft), 40)
            assert torch.allclose(logits[0], target(torch.tensor([before]))[0, -1], atol=1e-9)
            for i in range(len(draft)):
                chain = before + [draft.tokens[j] for j in draft.path_to(i)]
                assert torch.allclose(logits[i + 1], target(torch.tensor([chain]))[0, -1], atol=1e-9)


# ---- batched greedy decoding -------------------------------------------------------------------------------------

from paper_repro.core.decoding import batch_greedy_decode


@pytest.mark.parametrize("seed", range(4))
def test_batched_ragged_prompts_equal_one_by_one(target, seed):
    rng = random.Random(seed)
    prompts = [[rng.randrange(40) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, 6))]
    budgets = [rng.randint(1, 15) for _ in prompts]
    res = batch_greedy_decode(target, prompts, budgets)
    assert res.tokens == [reference_decode(target, p, n) for p, n in zip(prompts, budgets)]
    assert res.forward_calls == max(budgets)  # prefill gives the first token; one call per further step


@pytest.mark.parametrize("prefix_len", [1, 4])
def test_shared_prefix_is_prefilled_once(target, prefix_len):
    prefix = [5, 6, 7, 8][:prefix_len]
    prompts = [prefix + s for s in ([1], [2, 3, 4], [9, 9, 9, 9, 9, 1])]
    shared = batch_greedy_decode(target, prompts, 9, prefix_len=prefix_len)
    plain = batch_greedy_decode(target, prompts, 9)
    assert shared.tokens == plain.tokens == [reference_decode(target, p, 9) for p in prompts]
    assert shared.prefill_tokens == prefix_len + 3 * 6 and plain.prefill_tokens == 3 * (prefix_len + 6)


def test_batched_eos_and_bad_inputs(target):
    prompts = [[1, 2, 3], [4, 5]]
    refs = [reference_decode(target, p, 20) for p in prompts]
    eos = refs[0][3]
    res = batch_greedy_decode(target, prompts, 20, eos_id=eos)
    assert res.tokens == [reference_decode(target, p, 20, eos_id=eos) for p in prompts]
    with pytest.raises(ValueError, match="prompts is empty"): batch_greedy_decode(target, [], 3)
    with pytest.raises(ValueError, match="same 2 tokens"): batch_greedy_decode(target, [[1, 2, 3], [1, 3, 3]], 3, prefix_len=2)
    with pytest.raises(ValueError, match="at least one token after"): batch_greedy_decode(target, [[1, 2], [1, 2, 3]], 3, prefix_len=2)
    with pytest.raises(ValueError, match="got 1 max_new_tokens for 2"): batch_greedy_decode(target, prompts, [3])
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"): batch_greedy_decode(target, prompts, [3, 0])
