"""paper_repro.dllm.ccd: CCD and CCD-DS as sampler rules (averaged marginal, per-run state, adaptive budget)."""
import math

import pytest
import torch

from paper_repro.core.lm import LMConfig, TransformerLM
from paper_repro.dllm.ccd import BENCH_HEADLINE, CCD, CCDDS, bench_methods, marginal_scores
from paper_repro.dllm.core import DecodeConfig, OracleLM, TopK, diffusion_generate, make_rule
from paper_repro.dllm.tasks import VOCAB_SIZE

PROMPTS = [[20, 21, 22], [23], [24, 25], [26, 27, 28, 29]]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TransformerLM(LMConfig(VOCAB_SIZE, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=128)).double().eval()


def oracle(L=16, B=4, seed=0, scale=30.0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(3, VOCAB_SIZE, (B, L), generator=g)
    return target, OracleLM(target, [len(p) for p in PROMPTS[:B]], scale=scale)


@pytest.mark.parametrize("rule", ["ccd", "ccd_ds"])
@pytest.mark.parametrize("block,steps", [(16, 16), (8, 16), (16, 4), (4, 8)])
def test_oracle_reproduced(rule, block, steps):
    target, model = oracle()
    cfg = DecodeConfig(gen_length=16, block_length=block, steps=steps, rule=rule, score="entropy")
    res = diffusion_generate(model, PROMPTS, cfg)
    assert torch.equal(res.sequences, target)
    assert res.nfe <= steps  # CCD follows the schedule; CCD-DS commits at least the scheduled k per step


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_ccd_ds_saves_steps_on_stable_predictions(depth):
    target, model = oracle(L=32)
    cfg = DecodeConfig(gen_length=32, steps=32, score="confidence")
    res = diffusion_generate(model, PROMPTS, cfg, rule=CCDDS(cfg, depth=depth))
    assert torch.equal(res.sequences, target)
    assert res.nfe < 32
    # warm-up: the first 5 steps (and the first depth-1 ones, whose history is not full) commit one token each
    first = max(5, depth - 1)
    counts = torch.stack([(res.commit_step == s).sum(-1) for s in range(first)], 1)
    assert (counts == 1).all()
    # and CCD-DS without ever verifying (warm-up longer than the block) is CCD
    slow = diffusion_generate(model, PROMPTS, cfg, rule=CCDDS(cfg, depth=depth, warmup=40))
    plain = diffusion_generate(model, PROMPTS, cfg, rule=CCD(cfg, depth=depth))
    assert slow.nfe == 32 and torch.equal(slow.commit_step, plain.commit_step)


class Recorder(CCD):
    "CCD that also keeps every step's distributions and the averaged marginal it used."
    def start(self, batch_size, config):
        super().start(batch_size, config)
        self.seen, self.pbars, self.blocks = [], [], []
    def observe(self, view):
        pbar = super().observe(view)
        self.seen.append(view.probs.clone()); self.pbars.append(pbar.clone()); self.blocks.append(view.block_start)
        return pbar


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_averaged_marginal_is_brute_force_mean(tiny, depth):
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=16, score="confidence")
    rule = Recorder(cfg, depth=depth)
    diffusion_generate(tiny, PROMPTS, cfg, rule=rule)
    assert len(rule.pbars) == 16
    for t, pbar in enumerate(rule.pbars):
        same_block = [s for s in range(t + 1) if rule.blocks[s] == rule.blocks[t]]
        window = same_block[-depth:]
        ref = sum(rule.seen[s] for s in window) / len(window)
        torch.testing.assert_close(pbar, ref, rtol=0, atol=1e-14)
        assert torch.allclose(pbar.sum(-1), torch.ones(()).double())


@pytest.mark.parametrize("score", ["confidence", "margin", "entropy"])
@pytest.mark.parametrize("steps", [16, 8, 4])
def test_depth_one_is_the_plain_ranking(tiny, score, steps):
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=steps, score=score)
    a = diffusion_generate(tiny, PROMPTS, cfg, rule=CCD(cfg, depth=1))
    b = diffusion_generate(tiny, PROMPTS, cfg, rule=TopK(cfg))
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.commit_step, b.commit_step)


def test_depth_changes_the_decoding(tiny):
    cfg = DecodeConfig(gen_length=16, block_length=16, steps=16, score="entropy")
    outs = [diffusion_generate(tiny, PROMPTS, cfg, rule=CCD(cfg, depth=d)).commit_step for d in (1, 3)]
    assert not torch.equal(outs[0], outs[1])  # otherwise the tests above could not tell history from no history


@pytest.mark.parametrize("make", [lambda c: CCD(c, depth=3), lambda c: CCDDS(c, depth=2, expand=2.0, warmup=1)])
def test_state_resets_per_run(tiny, make):
    cfg = DecodeConfig(gen_length=16, block_length=16, steps=16, score="entropy")
    rule = make(cfg)
    diffusion_generate(tiny, PROMPTS[:1], cfg, rule=rule)           # leave a batch-of-one history behind
    reused = diffusion_generate(tiny, PROMPTS, cfg, rule=rule)      # different batch size: stale state would break or leak
    fresh = diffusion_generate(tiny, PROMPTS, cfg, rule=make(cfg))
    assert torch.equal(reused.sequences, fresh.sequences) and torch.equal(reused.commit_step, fresh.commit_step)
    rule.start(4, cfg)
    assert rule.history == [] and getattr(rule, "buffer", None) is None


@pytest.mark.parametrize("rule", ["ccd", "ccd_ds"])
def test_rows_are_independent(tiny, rule):
    # per-row state: each row of a batch decodes as it would alone (CCD-DS's buffer size differs per row)
    cfg = DecodeConfig(gen_length=32, steps=32, rule=rule, score="entropy")
    batch = diffusion_generate(tiny, PROMPTS, cfg)
    for i, p in enumerate(PROMPTS):
        one = diffusion_generate(tiny, [p], cfg)
        assert torch.equal(one.sequences[0], batch.sequences[i])
        assert torch.equal(one.commit_step[0], batch.commit_step[i])


def test_marginal_scores_formulas():
    p = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]], dtype=torch.float64)
    tok, conf = marginal_scores(p, "confidence")
    assert tok.tolist() == [[0, 2]] and torch.allclose(conf, torch.tensor([[0.5, 0.8]], dtype=torch.float64))
    _, marg = marginal_scores(p, "margin")
    assert torch.allclose(marg, torch.tensor([[0.2, 0.7]], dtype=torch.float64))
    _, negh = marginal_scores(p, "entropy")
    h = -(p * p.log()).sum(-1)
    assert torch.allclose(negh, -h)


@pytest.mark.parametrize("kwargs,match", [
    (dict(depth=0), "depth"), (dict(depth=-1), "depth"), (dict(depth=1.5), "depth"), (dict(depth=True), "depth")])
def test_bad_depth_raises(kwargs, match):
    with pytest.raises(ValueError, match=match): CCD(DecodeConfig(), **kwargs)
    with pytest.raises(ValueError, match=match): CCDDS(DecodeConfig(), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(depth=1), "depth"), (dict(expand=-1.0), "expand"), (dict(expand=math.nan), "expand"),
    (dict(expand=math.inf), "expand"), (dict(warmup=-1), "warmup"), (dict(warmup=2.0), "warmup"),
    (dict(late_fraction=1.0), "late_fraction"), (dict(late_fraction=-0.1), "late_fraction")])
def test_bad_ds_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match): CCDDS(DecodeConfig(), **kwargs)


@pytest.mark.parametrize("score", ["random", "l2r"])
def test_scores_without_a_marginal_raise(score):
    with pytest.raises(ValueError, match="confidence, margin, entropy"): make_rule(DecodeConfig(rule="ccd", score=score))
    with pytest.raises(ValueError, match="score"): CCDDS(DecodeConfig(score=score))
    with pytest.raises(ValueError, match="marginal"): marginal_scores(torch.ones(1, 1, 2) / 2, score)


def test_registered_and_bench_hook():
    assert isinstance(make_rule(DecodeConfig(rule="ccd")), CCD)
    rule = make_rule(DecodeConfig(rule="ccd_ds"))
    assert isinstance(rule, CCDDS) and (rule.depth, rule.expand, rule.warmup) == (2, 4.0, 5)
    entries = bench_methods(None)
    assert all(" @" in e.name for e in entries)
    assert [e.paper_headline is BENCH_HEADLINE for e in entries] == [e.name.startswith("CCD-DS") for e in entries]
    for e in entries:
        make = e.method.make_rule
        assert isinstance(e.method.config, DecodeConfig) and (make is None or isinstance(make(), CCD))
    assert BENCH_HEADLINE.value == 3.48 and BENCH_HEADLINE.checked
