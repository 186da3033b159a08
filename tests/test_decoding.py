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
    from paper_repro.core.decoding import NoDrafter, _DraftVerifyStep
    path, bonus, out = _DraftVerifyStep(target, NoDrafter(), Sampler(), 256)._verify(cache, prompt[-1], draft)
    assert out.logits.shape == (1 + len(draft), 40) and out.hidden is None
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
    with pytest.raises(ValueError, match="gamma must be a positive int, got 0"): DraftModelDrafter(target, gamma=0)

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


# ---- the decode loop, hidden states, drafter-run passes ---------------------------------------------------------

from paper_repro.core.decoding import DecodeStep, StepOutput, decode_loop, returns_hidden, time_calls
from paper_repro.core.lm import LMOutput


class GreedyStep(DecodeStep):
    "Plain greedy decoding written as a step; records the loop's commit calls."
    def __init__(self, target):
        super().__init__(target)
        self.commits = []
    def step(self, context, cache, remaining):
        logits = self.target(torch.tensor([context[-1:]]), cache=cache)[0, -1]
        return StepOutput([int(logits.argmax())], accepted=0, source="greedy")
    def commit(self, context, accepted): self.commits.append((len(context), accepted))


def test_decode_loop_runs_a_custom_step_with_prefill_eos_and_stats(target):
    for prompt in PROMPTS:
        ref = reference_decode(target, prompt, 20)
        step = GreedyStep(target)
        res = decode_loop(target, prompt, 20, step)
        assert res.tokens == ref and res.prefill_calls == (len(prompt) > 1) and len(res.steps) == 20
        assert step.commits == [(len(prompt) + i + 1, 0) for i in range(20)]  # after the tokens are appended
        assert all(s.bonus == 1 and s.source == "greedy" and s.verify_s >= 0 for s in res.steps) and res.wall_s > 0
    eos = ref[4]
    res = decode_loop(target, prompt, 20, GreedyStep(target), eos_id=eos)
    assert res.tokens == ref[:ref.index(eos) + 1] and res.stopped_by_eos
    with pytest.raises(ValueError, match="prompt is empty"): decode_loop(target, [], 5, GreedyStep(target))


class FixedStep(DecodeStep):
    "Emits a fixed list each step (to test the loop's accounting, not a model)."
    def __init__(self, target, tokens, accepted, bonus_first=False):
        super().__init__(target)
        self.out = StepOutput(tokens, accepted, drafted=len(tokens), bonus_first=bonus_first)
    def step(self, context, cache, remaining): return self.out


def test_eos_cut_keeps_the_roles_of_the_tokens_before_it(target):
    # accepted draft tokens first, bonus last: a cut inside the accepted part leaves no bonus
    res = decode_loop(target, [1, 2], 10, FixedStep(target, [5, 6, 7, 8], accepted=3), eos_id=6)
    assert res.tokens == [5, 6] and (res.steps[0].accepted, res.steps[0].bonus) == (2, 0)
    # the bonus first (LUD): the first token stays the bonus
    res = decode_loop(target, [1, 2], 10, FixedStep(target, [5, 6, 7, 8], accepted=3, bonus_first=True), eos_id=6)
    assert res.tokens == [5, 6] and (res.steps[0].accepted, res.steps[0].bonus) == (1, 1)
    res = decode_loop(target, [1, 2], 8, FixedStep(target, [5, 6, 7, 8], accepted=3, bonus_first=True))
    assert res.tokens == [5, 6, 7, 8] * 2 and [(s.accepted, s.bonus) for s in res.steps] == [(3, 1)] * 2
    with pytest.raises(ValueError, match="emitted 4 tokens; 1 to 3 allowed"):
        decode_loop(target, [1, 2], 3, FixedStep(target, [5, 6, 7, 8], accepted=3))
    with pytest.raises(ValueError, match="emitted 0 tokens"): decode_loop(target, [1, 2], 3, FixedStep(target, [], 0))


class HiddenRecorder(RandomDrafter):
    "A tree drafter that asks for hidden states and records what it is handed."
    needs_hidden = True
    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen, self.prefill = [], None
    def observe_prefill(self, context, logits, hidden): self.prefill = (list(context), logits, hidden)
    def observe(self, context, draft, accepted, logits, hidden=None): self.seen.append((draft, logits, hidden))


def test_drafters_that_need_hidden_states_get_the_lm_heads_input(target):
    prompt = PROMPTS[3]
    rec = HiddenRecorder(seed=4, tree=True)
    res = generate(target, prompt, 15, rec)
    assert res.tokens == reference_decode(target, prompt, 15)
    ctx, logits, hidden = rec.prefill
    with torch.no_grad():
        assert ctx == prompt and torch.allclose(hidden, target.hidden_states(torch.tensor([prompt[:-1]]))[0], atol=1e-12)
        assert torch.allclose(target.lm_head(hidden), logits, atol=1e-12)
        for draft, logits, hidden in rec.seen:
            assert hidden.shape == (1 + len(draft), 32) and torch.allclose(target.lm_head(hidden), logits, atol=1e-12)
    plain = HiddenRecorder(seed=4, tree=True)
    plain.needs_hidden = False   # an observe_prefill without hidden states: called, with hidden=None
    generate(target, prompt, 15, plain)
    assert plain.prefill[2] is None and all(h is None for _, _, h in plain.seen)


def test_hidden_states_are_refused_for_a_model_without_them(target):
    class LogitsOnly(torch.nn.Module):   # a CausalLM whose forward has no return_hidden
        def __init__(self, m): super().__init__(); self.m = m
        vocab_size = 40
        def new_cache(self, batch_size=1, capacity=256): return self.m.new_cache(batch_size, capacity)
        def forward(self, tokens, positions=None, cache=None, attn_mask=None): return self.m(tokens, positions, cache, attn_mask)
    wrapped = LogitsOnly(target)
    assert returns_hidden(target) and not returns_hidden(wrapped)
    with pytest.raises(ValueError, match="HiddenRecorder reads the target's hidden states, but LogitsOnly.forward has no"):
        generate(wrapped, [1, 2], 5, HiddenRecorder())
    assert generate(wrapped, [1, 2], 5, RandomDrafter()).tokens == reference_decode(target, [1, 2], 5)


def test_a_drafter_can_run_the_target_pass(target):
    "run_target serves the prefill and every verification; its logits are what the verifier uses."
    calls = []

    class Runner(RandomDrafter):
        def run_target(self, model, tokens, positions, cache, attn_mask):
            calls.append(tokens.shape[1])
            return LMOutput(model(tokens, positions=positions, cache=cache, attn_mask=attn_mask))
    prompt = PROMPTS[2]
    res = generate(target, prompt, 20, Runner(seed=1, tree=True))
    assert res.tokens == reference_decode(target, prompt, 20)
    assert calls[0] == len(prompt) - 1 and len(calls) == 1 + len(res.steps)

    class Liar(RandomDrafter):   # the verifier uses run_target's logits: a pass that returns others changes the output
        def run_target(self, model, tokens, positions, cache, attn_mask):
            return LMOutput(model(tokens, positions=positions, cache=cache, attn_mask=attn_mask).roll(1, -1))
    assert generate(target, prompt, 10, Liar()).tokens != reference_decode(target, prompt, 10)


def test_accepted_node_agrees_with_the_verifier():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randrange(1, 12)
        parents = [rng.randrange(-1, i) for i in range(n)]
        tokens = [rng.randrange(4) for _ in range(n)]          # duplicates and siblings with equal tokens
        draft = Draft(tokens, parents)
        path, _ = verify_tree(draft, torch.tensor([rng.randrange(4) for _ in range(n + 1)]))
        assert draft.accepted_node([tokens[i] for i in path]) == (path[-1] if path else -1)
    assert Draft([1, 2], [-1, 0]).accepted_node([2]) is None


def test_time_calls_interleaves_resets_and_syncs(monkeypatch):
    import paper_repro.core.decoding as dec
    log = []
    monkeypatch.setattr(dec, "sync_device", lambda device: log.append("sync"))
    times = time_calls({"a": lambda: log.append("a"), "b": lambda: log.append("b")}, "cpu", repeats=2, warmup=1,
                       reset=lambda: log.append("reset"))
    assert set(times) == {"a", "b"} and all(len(v) == 2 and min(v) >= 0 for v in times.values())
    assert log == ["sync", "a", "sync", "reset", "sync", "b", "sync", "reset"] * 3   # warm-up round + 2 timed rounds
    cpu = time_calls({"x": lambda: sum(range(20000))}, "cpu", repeats=3, clock="cpu")["x"]
    assert len(cpu) == 3 and min(cpu) >= 0
    with pytest.raises(ValueError, match="clock must be one of"): time_calls({"x": lambda: 0}, "cpu", clock="gpu")
    with pytest.raises(ValueError, match="clock='cpu' needs a CPU model"): time_calls({"x": lambda: 0}, "cuda", clock="cpu")
    with pytest.raises(ValueError, match="repeats must be a positive int"): time_calls({"x": lambda: 0}, "cpu", repeats=0)
    with pytest.raises(ValueError, match="warmup must be an int >= 0"): time_calls({"x": lambda: 0}, "cpu", warmup=-1)
    with pytest.raises(ValueError, match="calls is empty"): time_calls({}, "cpu")


def test_generate_accepts_tensor_and_tokenizer_prompts_and_rejects_bad_ones():
    import torch
    from paper_repro.core.decoding import check_prompt
    assert check_prompt(torch.tensor([1, 2, 3]), 10, 4) == [1, 2, 3]
    assert check_prompt(torch.tensor([[1, 2, 3]]), 10, 4) == [1, 2, 3]
    assert check_prompt({"input_ids": [[5, 6, 0]], "attention_mask": [[1, 1, 0]]}, 10, 4) == [5, 6]
    with pytest.raises(TypeError, match="integer token ids"):
        check_prompt(torch.tensor([1.5, 2.0]), 10, 4)
    with pytest.raises(ValueError, match="one sequence, got 2 rows"):
        check_prompt(torch.tensor([[1, 2], [3, 4]]), 10, 4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got True"):
        check_prompt([1, 2], 10, True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        check_prompt([1, 12], 10, 4)
