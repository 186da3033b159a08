"Tests of paper_repro.dllm.core: the LLaDA loss, the sampler's invariants, every rule and cache."
import math

import pytest
import torch
import torch.nn.functional as F

from paper_repro.core.lm import LMConfig, TransformerLM
from paper_repro.dllm.core import (CACHES, PROB_SCORES, RULES, SCORES, DecodeConfig, DllmSpec, OracleLM, Rule,
                                   Selection, StepView, Threshold, TopK, Factor, diffusion_generate, llada_batches,
                                   llada_loss, load_dllm, make_rule, prob_scores, register_rule, rule_factory,
                                   top_k_mask, topk_schedule, train_dllm)
from paper_repro.dllm.tasks import EOS_ID, MASK_ID, VOCAB_SIZE, sample_examples

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TransformerLM(LMConfig(VOCAB_SIZE, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=128)).double().eval()


@pytest.fixture(scope="module")
def trained():
    return load_dllm()


@pytest.fixture(scope="module")
def trained64():
    return load_dllm(dtype=torch.float64)


PROMPTS = [[20, 21, 22, 23], [24], [25, 26], [27, 28, 29]]


def _oracle(L=16):
    target = torch.randint(3, VOCAB_SIZE, (len(PROMPTS), L), generator=torch.Generator().manual_seed(1))
    return target, OracleLM(target, [len(p) for p in PROMPTS])


@pytest.mark.parametrize("rule", ["topk", "threshold", "factor", "entropy_threshold"])
@pytest.mark.parametrize("cache", CACHES)
def test_oracle_reproduced_with_expected_passes(rule, cache):
    target, oracle = _oracle()
    cfg = DecodeConfig(gen_length=16, block_length=4, steps=8, rule=rule, cache=cache)
    res = diffusion_generate(oracle, PROMPTS, cfg)
    assert torch.equal(res.sequences, target)
    assert res.nfe == oracle.calls == (8 if rule == "topk" else 4)  # top-k: `steps` passes; thresholds: one per block
    assert (res.nfe_per_sample == res.nfe).all() and res.tokens_per_step == pytest.approx(16 / res.nfe)


class Recorder(Rule):
    "Wraps a rule and records the window before every step."
    def __init__(self, inner): self.inner, self.seen = inner, []
    def start(self, b, c): self.inner.start(b, c)
    def select(self, view):
        self.seen.append(view.x.clone())
        return self.inner.select(view)


class RecordingModel(torch.nn.Module):
    def __init__(self, m): super().__init__(); self.m, self.inputs = m, []
    def new_cache(self, *a): return self.m.new_cache(*a)
    def forward(self, tokens, *a, **k):
        self.inputs.append(tokens.clone()); return self.m(tokens, *a, **k)


@pytest.mark.parametrize("rule", ["topk", "threshold", "factor", "entropy_threshold"])
def test_invariants_on_a_random_model(tiny, rule):
    cfg = DecodeConfig(gen_length=16, block_length=4, steps=8, rule=rule, threshold=0.05 if rule != "entropy_threshold" else 3.5)
    rec, model = Recorder(RULES[rule](cfg)), RecordingModel(tiny)
    res = diffusion_generate(model, PROMPTS, cfg, rule=rec)
    assert (res.sequences != MASK_ID).all()                                     # no mask left
    P = max(map(len, PROMPTS))
    assert all(torch.equal(t[:, :P], model.inputs[0][:, :P]) for t in model.inputs)  # the prompt never changes
    states = rec.seen + [res.sequences]
    for a, b in zip(states, states[1:]):                                        # committed tokens never change
        done = a != MASK_ID
        assert torch.equal(a[done], b[done]) and (b != MASK_ID).sum() > done.sum()
    cs = res.commit_step.view(len(PROMPTS), 4, 4)                               # blocks complete in order
    assert (cs[:, :-1].amax(-1) < cs[:, 1:].amin(-1)).all() and (res.commit_step >= 0).all()
    if rule == "topk":  # LLaDA's schedule: two tokens per step in each row
        assert (torch.stack([(res.commit_step == s).sum(1) for s in range(res.nfe)], 1) == 2).all()


def test_threshold_above_one_is_top1(trained):
    exs = sample_examples(["copy", "sort", "add", "latin"], 6, seed=3)
    prompts = [e.prompt for e in exs]
    top1 = diffusion_generate(trained, prompts, DecodeConfig(block_length=8, steps=32))
    never = Threshold(DecodeConfig(block_length=8, steps=32, rule="threshold"))
    never.threshold = 1.01  # (DecodeConfig refuses a confidence threshold above 1; a ready rule object may hold one)
    thr = diffusion_generate(trained, prompts, DecodeConfig(block_length=8, steps=32), rule=never)
    assert torch.equal(top1.sequences, thr.sequences) and torch.equal(top1.commit_step, thr.commit_step) and thr.nfe == 32


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_refreshed_every_step_equals_no_cache(tiny, cache):
    for rule in ("topk", "threshold"):
        base = DecodeConfig(gen_length=16, block_length=4, steps=16, rule=rule, threshold=0.05)
        ref = diffusion_generate(tiny, PROMPTS, base)
        got = diffusion_generate(tiny, PROMPTS, DecodeConfig(**{**base.__dict__, "cache": cache, "cache_refresh": 1}))
        assert torch.equal(ref.sequences, got.sequences) and torch.equal(ref.commit_step, got.commit_step)


def test_cached_pass_without_changes_matches_full_pass(tiny):
    "The cached block (+suffix) passes are exact when nothing changed since the cache was filled."
    x = torch.randint(3, VOCAB_SIZE, (2, 20), generator=torch.Generator().manual_seed(0))
    full = torch.ones(20, 20, dtype=torch.bool)
    with torch.no_grad():
        ref = tiny(x, attn_mask=full)
        c = tiny.new_cache(2, 20); tiny(x, cache=c, attn_mask=full); c.truncate(8)
        pre = tiny(x[:, 8:], torch.arange(8, 20), c, attn_mask=full[8:])
        c = tiny.new_cache(2, 20); tiny(x, cache=c, attn_mask=full)
        dual = tiny(x[:, 8:12], torch.arange(8, 12), c, attn_mask=full[8:12], cache_start=8)
    assert torch.allclose(pre, ref[:, 8:], atol=1e-10) and torch.allclose(dual, ref[:, 8:12], atol=1e-10)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_caches_close_to_no_cache_on_the_trained_model(trained, cache):
    exs = sample_examples(["copy", "replace_index", "sudoku", "add"], 12, seed=4)
    cfg = DecodeConfig(block_length=8, steps=32, rule="threshold", threshold=0.9)
    ref = diffusion_generate(trained, [e.prompt for e in exs], cfg)
    got = diffusion_generate(trained, [e.prompt for e in exs], DecodeConfig(**{**cfg.__dict__, "cache": cache}))
    agree = (ref.sequences == got.sequences).double().mean().item()
    acc = lambda r: sum(e.score(s) for e, s in zip(exs, r.sequences)) / len(exs)
    assert agree >= 0.9 and abs(acc(ref) - acc(got)) <= 0.15, (agree, acc(ref), acc(got))


@pytest.mark.parametrize("cfg", [DecodeConfig(block_length=8, steps=16), DecodeConfig(rule="threshold", threshold=0.5),
                                 DecodeConfig(rule="factor", block_length=8, steps=32, cache="dual"),
                                 DecodeConfig(block_length=8, steps=32, cache="prefix", score="margin")])
def test_batch_of_one_equals_batch_of_four(trained64, cfg):
    exs = sample_examples(["copy", "add", "sudoku", "latin"], 4, seed=2)
    batch = diffusion_generate(trained64, [e.prompt for e in exs], cfg)
    for i, e in enumerate(exs):
        one = diffusion_generate(trained64, [e.prompt], cfg)
        assert torch.equal(one.sequences[0], batch.sequences[i])
        assert one.nfe_per_sample[0] == batch.nfe_per_sample[i]


def test_fixed_seed_identical_and_temperature_uses_it(tiny):
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=8, temperature=1.0, score="random", seed=3)
    a, b = diffusion_generate(tiny, PROMPTS, cfg), diffusion_generate(tiny, PROMPTS, cfg)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.commit_step, b.commit_step)
    c = diffusion_generate(tiny, PROMPTS, DecodeConfig(**{**cfg.__dict__, "seed": 4}))
    assert not torch.equal(a.sequences, c.sequences)


def test_loss_matches_brute_force(tiny):
    g = torch.Generator().manual_seed(0)
    prompts = [[20, 21, 22], [23]]
    answers = torch.randint(3, VOCAB_SIZE, (2, 5), generator=g)
    ids = torch.tensor([[20, 21, 22], [EOS_ID, EOS_ID, 23]])
    valid = torch.tensor([[True] * 3, [False, False, True]])
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    masked = torch.tensor([[1, 0, 1, 0, 0], [1, 1, 1, 0, 1]], dtype=torch.bool)
    got = llada_loss(tiny, ids, valid, answers, t=t, masked=masked, eps=1e-3)
    total = 0.0
    for b in range(2):  # each row alone, unpadded, one masked token at a time
        p = (1 - 1e-3) * t[b].item() + 1e-3
        x = torch.tensor(prompts[b] + [MASK_ID if m else a for a, m in zip(answers[b].tolist(), masked[b].tolist())])
        logits = tiny(x[None], attn_mask=torch.ones(len(x), len(x), dtype=torch.bool))[0, len(prompts[b]):]
        for j in range(5):
            if masked[b, j]:
                total += -torch.log_softmax(logits[j], -1)[answers[b, j]].item() / p
    assert got.item() == pytest.approx(total / (2 * 5), rel=1e-9)


def _view(conf):
    conf = torch.tensor([conf], dtype=torch.float64)
    n = conf.shape[1]
    v = StepView(torch.zeros(1, n, 4), torch.zeros(1, n, dtype=torch.long), conf.clone(), torch.ones(1, n, dtype=torch.bool),
                 torch.full((1, n), MASK_ID), 0, n, 0, 0, DecodeConfig(gen_length=n, block_length=n, steps=n))
    v.__dict__["confidence"] = conf  # cached_property: preset the confidences
    return v


def test_factor_commits_exactly_those_that_pass():
    # thresholds 1 - 1/(i+1): 0.5, 0.667, 0.75, 0.8 -> the first three pass; the official code would commit four
    got = Factor(DecodeConfig(rule="factor", factor=1.0)).select(_view([0.8, 0.99, 0.5, 0.9]))
    assert got.tolist() == [[True, True, False, True]]
    assert Factor(DecodeConfig(rule="factor", factor=0.01)).select(_view([0.8, 0.9])).tolist() == [[False, True]]
    thr = Threshold(DecodeConfig(rule="threshold", threshold=0.85)).select(_view([0.8, 0.99, 0.5, 0.9]))
    assert thr.tolist() == [[False, True, False, True]]


def test_topk_schedule_and_mask():
    assert topk_schedule(8, 3) == [3, 3, 2] and sum(topk_schedule(32, 5)) == 32
    s = torch.tensor([[0.1, 0.9, -math.inf, 0.5], [0.3, 0.2, 0.1, 0.0]], dtype=torch.float64)
    assert top_k_mask(s, torch.tensor([2, 1])).tolist() == [[False, True, False, True], [True, False, False, False]]
    assert top_k_mask(s, 4)[0].tolist() == [True, True, False, True]  # -inf is never chosen


def test_stop_at_eos_and_custom_rule_with_selection():
    L = 12
    target = torch.randint(3, VOCAB_SIZE, (2, L), generator=torch.Generator().manual_seed(5))
    target[0, 3] = EOS_ID
    target[1, 7] = EOS_ID
    oracle = OracleLM(target, [1, 1])
    res = diffusion_generate(oracle, [[20], [21]], DecodeConfig(gen_length=L, block_length=L, steps=L, score="l2r", stop_at_eos=True))
    assert res.nfe == 8 and res.nfe_per_sample.tolist() == [4, 8]
    assert (res.sequences[0, 3:] == EOS_ID).all() and torch.equal(res.sequences[1, :8], target[1, :8])

    class FirstAndZ(Rule):  # commits the leftmost masked position with token 30, and ends every row after position 5
        def select(self, view):
            first = top_k_mask(-torch.arange(view.maskable.shape[1], dtype=torch.float64).expand(view.maskable.shape)
                               .masked_fill(~view.maskable, -math.inf), 1)
            return Selection(first, torch.full_like(view.x0, 30), torch.full((view.x0.shape[0],), 5))
    register_rule("test_first_z", lambda cfg: FirstAndZ())
    try:
        res = diffusion_generate(oracle, [[20], [21]], DecodeConfig(gen_length=L, block_length=L, steps=L, rule="test_first_z"))
    finally:
        RULES.pop("test_first_z")
    assert res.nfe == 5 and (res.sequences[:, :5] == 30).all() and (res.sequences[:, 5:] == EOS_ID).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(gen_length=0), "gen_length=0: must be a positive integer"),
    (dict(gen_length=32, block_length=5), "block_length=5: must divide gen_length=32"),
    (dict(gen_length=32, block_length=8, steps=6), r"steps=6: must be a multiple of the number of blocks \(4\)"),
    (dict(steps=64), "steps=64: gives 64 steps per block"),
    (dict(score="best"), "valid scores: confidence, margin, entropy, random, l2r"),
    (dict(rule="magic"), "valid rules: topk, threshold, factor, entropy_threshold"),
    (dict(cache="disk"), "valid caches: none, prefix, dual"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(threshold=float("nan")), "threshold=nan"),
    (dict(factor=0.0), "factor=0.0"),
    (dict(cache_refresh=-1), "cache_refresh=-1"),
    (dict(eos_id=MASK_ID), "must differ from mask_id"),
])
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match): DecodeConfig(**kwargs)


def test_bad_prompts_raise(tiny):
    with pytest.raises(ValueError, match="prompts tensor must be"): diffusion_generate(tiny, torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="prompts is empty"): diffusion_generate(tiny, [])


# ---- the three distribution scores live in one place ---------------------------------------------------------------

def test_prob_scores_formulas_and_bad_kind():
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]], dtype=torch.float64)
    tokens = torch.tensor([[1, 2]])
    assert prob_scores(probs, tokens, "confidence").tolist() == [[0.3, 0.8]]
    assert prob_scores(probs, tokens, "margin")[0].tolist() == pytest.approx([0.2, 0.7])
    h = [-sum(p * math.log(p) for p in row) for row in probs[0].tolist()]
    assert prob_scores(probs, tokens, "entropy")[0].tolist() == pytest.approx([-x for x in h])  # negative: higher first
    assert set(PROB_SCORES) < set(SCORES)
    with pytest.raises(ValueError, match="valid: confidence, margin, entropy"): prob_scores(probs, tokens, "random")


@pytest.mark.parametrize("score", ["confidence", "margin", "entropy"])
def test_the_ranking_score_and_the_view_properties_agree_bitwise(tiny, score):
    seen = []
    class Spy(TopK):
        def select(self, view):
            prop = {"confidence": view.confidence, "margin": view.margin, "entropy": -view.entropy}[score]
            seen.append(torch.equal(view.score, prop.masked_fill(~view.maskable, -math.inf)))
            return super().select(view)
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=8, score=score, temperature=0.7)
    diffusion_generate(tiny, PROMPTS, cfg, rule=Spy(cfg))
    assert seen and all(seen)


# ---- rules by name: the registry ------------------------------------------------------------------------------------

def test_paper_rules_by_name_need_no_prior_import():
    import subprocess, sys
    code = ("import sys\n"
            "from paper_repro.dllm.core import DecodeConfig, make_rule\n"
            "cfg = DecodeConfig(rule='ccd_ds', score='entropy')\n"
            "assert 'paper_repro.dllm.ccd' not in sys.modules\n"
            "rule = make_rule(cfg)\n"
            "from paper_repro.dllm.ccd import CCDDS\n"
            "assert type(rule) is CCDDS and make_rule(DecodeConfig(rule='ccd')).depth == 2\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_register_rule_by_path_and_bad_registrations():
    register_rule("test_topk_by_path", "paper_repro.dllm.core:TopK")
    try:
        assert rule_factory("test_topk_by_path") is TopK
        assert isinstance(make_rule(DecodeConfig(rule="test_topk_by_path")), TopK)
    finally:
        RULES.pop("test_topk_by_path")
    with pytest.raises(ValueError, match="must read 'package.module:attribute'"): register_rule("x", "paper_repro.dllm.core")
    with pytest.raises(TypeError, match="must be callable"): register_rule("x", 3)
    with pytest.raises(ValueError, match="non-empty string"): register_rule("", TopK)
    with pytest.raises(ValueError, match="unknown rule 'nope'"): rule_factory("nope")
    assert "x" not in RULES


# ---- training runs on core.train.fit ---------------------------------------------------------------------------------

SMALL = DllmSpec(config=LMConfig(VOCAB_SIZE, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=64), steps=3,
                 batch_size=4, warmup=1)


def test_llada_batches_are_seeded_and_shaped():
    a, b = llada_batches(SMALL, seed=2), llada_batches(SMALL, seed=2)
    first, again = a(0), b(0)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    prompts, valid, answers, t, masked = first
    assert answers.shape == masked.shape == (4, SMALL.gen_length) and t.shape == (4,) and valid.shape == prompts.shape
    assert torch.allclose(torch.sort(t).values.diff(), torch.full((3,), 0.25))  # stratified: evenly spaced mod 1
    assert not all(torch.equal(x, y) for x, y in zip(a(1), first))  # the next call draws the next batch


def test_train_dllm_is_deterministic_and_logs_every_50_steps():
    logs = [[], []]
    a, b = (train_dllm(SMALL, seed=1, progress=False, log=log) for log in logs)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert logs[0] == logs[1] and [s for s, _ in logs[0]] == [0] and math.isfinite(logs[0][0][1])
    assert not a.training
