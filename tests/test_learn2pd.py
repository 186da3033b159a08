"Tests of paper_repro.dllm.learn2pd: extremely greedy traces, the filter rule, End-of-Text Prediction."
import math

import pytest
import torch

from paper_repro.core.lm import LMConfig, TransformerLM
from paper_repro.dllm.core import DecodeConfig, OracleLM, Rule, TopK, denoise_logits, diffusion_generate
from paper_repro.dllm.learn2pd import (BENCH_HEADLINE, ConfidenceFilter, ExtremelyGreedy, Learn2PD, Traces, bench_methods,
                                       choose_threshold, collect_traces, filter_counts, filter_stats, padding_passes,
                                       train_filter)
from paper_repro.dllm.tasks import EOS_ID, MASK_ID, VOCAB_SIZE

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TransformerLM(LMConfig(VOCAB_SIZE, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=128)).double().eval()


PROMPTS = [[20, 21, 22], [23, 24, 25], [26, 27, 28], [29, 30, 31]]  # equal lengths: no padding in the brute force


def _eos_targets(L=16):
    "Rows with answers of 3, 9, L (no EOS) and 0 tokens, EOS-padded."
    g = torch.Generator().manual_seed(3)
    t = torch.randint(20, VOCAB_SIZE, (4, L), generator=g)
    for r, n in enumerate((3, 9, L, 0)): t[r, n:] = EOS_ID
    return t


class _Spy(Rule):
    "Wraps a rule; records each step's view and selection."
    def __init__(self, inner): self.inner, self.steps = inner, []
    def start(self, b, c): self.inner.start(b, c); self.steps = []
    def select(self, view):
        sel = self.inner.select(view)
        self.steps.append((view, sel))
        return sel


# ---- extremely greedy traces ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [4, 8])
def test_trace_labels_match_brute_force(tiny, block):
    cfg = DecodeConfig(gen_length=8, block_length=block, steps=8)
    traces, ref, greedy = collect_traces(tiny, PROMPTS, cfg, keep_states=True)
    assert torch.equal(greedy.sequences, ref.sequences)  # the greedy decode ends exactly at the reference
    assert len(traces) > 0 and traces.features.shape[1] == block
    P = len(PROMPTS[0])
    for i in range(len(traces)):  # one row alone, one pass: recompute argmax and confidence of the block
        r, bs = int(traces.row[i]), int(traces.block_start[i])
        state = traces.states[i]
        assert bool((state[bs:bs + block] == MASK_ID).any())            # only rows still decoding are logged
        assert torch.equal(traces.masked[i], state[bs:bs + block] == MASK_ID)
        x = torch.tensor([PROMPTS[r] + state.tolist()])
        logits = denoise_logits(tiny, x)[0, P + bs:P + bs + block].clone()
        logits[:, MASK_ID] = -math.inf
        probs = torch.softmax(logits, -1)
        conf, arg = probs.max(-1)
        assert torch.equal(traces.labels[i], arg == ref.sequences[r, bs:bs + block])
        assert torch.allclose(traces.features[i], conf.float(), atol=1e-6)


def test_greedy_commits_exactly_the_matches(tiny):
    cfg = DecodeConfig(gen_length=8, block_length=8, steps=8)
    ref = diffusion_generate(tiny, PROMPTS, cfg).sequences
    spy = _Spy(ExtremelyGreedy(ref))
    diffusion_generate(tiny, PROMPTS, cfg, rule=spy)
    for view, sel in spy.steps:
        match = view.maskable & (view.x0 == ref)
        for r in range(len(PROMPTS)):
            if not view.maskable[r].any(): assert not sel.commit[r].any(); continue
            if match[r].any(): assert torch.equal(sel.commit[r], match[r])
            else:
                assert int(sel.commit[r].sum()) == 1 and bool((sel.commit[r] & view.maskable[r]).any())
    assert len(spy.steps) <= 8


def test_traces_on_oracle_are_one_step_and_all_correct():
    tgt = _eos_targets(8)
    oracle = OracleLM(tgt, [3] * 4)
    traces, ref, greedy = collect_traces(oracle, PROMPTS, DecodeConfig(gen_length=8, block_length=8, steps=8))
    assert torch.equal(ref.sequences, tgt) and greedy.nfe == 1 and len(traces) == 4
    assert bool(traces.labels[traces.masked].all())


# ---- the filter ----------------------------------------------------------------------------------------------------

def _synthetic_traces(n=400, Lb=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(n, Lb, generator=g)
    return Traces(conf, conf > 0.6, torch.rand(n, Lb, generator=g) < 0.7, torch.zeros(n, dtype=torch.long),
                  torch.zeros(n, dtype=torch.long))


def test_filter_learns_a_confidence_cut_and_threshold_meets_fp():
    tr, va = _synthetic_traces().split(0.8)
    filt = train_filter(tr, steps=400)
    assert sum(p.numel() for p in ConfidenceFilter(32, 32).parameters()) == 2112  # the paper's ~2K
    thr = choose_threshold(filt, va, max_fp=0.05)
    st = filter_stats(filt, va, thr)
    assert st["fp"] <= 0.05 and st["recall"] > 0.5
    # deterministic for a seed
    assert torch.equal(train_filter(tr, steps=50).net[0].weight, train_filter(tr, steps=50).net[0].weight)
    log = []
    train_filter(tr, steps=60, log=log)
    assert [s for s, _ in log] == [0, 50, 59] and log[-1][1] < log[0][1]


def test_filter_counts_add_up_to_the_fp_share_and_the_dev_choice_is_checked_out_of_sample():
    tr, dev = _synthetic_traces().split(0.8)
    test = _synthetic_traces(seed=1)                      # traces the threshold choice never saw
    filt = train_filter(tr, steps=400)
    thr = choose_threshold(filt, dev, max_fp=0.05)
    wrong, accepted = filter_counts(filt, test, thr)
    st = filter_stats(filt, test, thr)
    assert wrong.shape == accepted.shape == (len(test),) and bool((wrong <= accepted).all())
    assert int(accepted.sum()) > 0 and float(wrong.sum() / accepted.sum()) == pytest.approx(st["fp"])
    assert st["fp"] <= 0.1                                # the learnt cut carries over to fresh traces
    w_all, a_all = filter_counts(filt, test, 0.0)          # accept everything: FP = the share of wrong argmaxes
    assert float(w_all.sum() / a_all.sum()) == pytest.approx(float((~test.labels & test.masked).sum() / test.masked.sum()))


# ---- the rule: never fewer than top-k ------------------------------------------------------------------------------

@pytest.mark.parametrize("eotp", ["off", "commit"])
def test_filter_rule_is_a_superset_of_topk(tiny, eotp):
    torch.manual_seed(1)
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=8)
    filt = ConfidenceFilter(8, 16).double()
    with torch.no_grad(): filt.net[2].bias.fill_(0.3)  # a random filter that accepts some positions
    spy = _Spy(Learn2PD(cfg, filt, 0.5, eotp=eotp))
    res = diffusion_generate(tiny, PROMPTS, cfg, rule=spy)
    top = TopK(cfg)
    extra = 0
    for view, sel in spy.steps:
        base = top.select(view) & view.maskable
        assert bool((sel.commit | ~base).all())  # every top-k commit is kept
        extra += int((sel.commit & view.maskable & ~base).sum())
    assert extra > 0  # the filter did add commits
    ref = diffusion_generate(tiny, PROMPTS, cfg)
    assert bool((res.nfe_per_sample <= ref.nfe_per_sample).all()) and res.nfe <= ref.nfe
    assert not bool((res.sequences == MASK_ID).any())


def test_threshold_one_and_no_eotp_equals_baseline(tiny):
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=16)
    filt = ConfidenceFilter(8).double()
    a = diffusion_generate(tiny, PROMPTS, cfg)
    b = diffusion_generate(tiny, PROMPTS, cfg, rule=Learn2PD(cfg, filt, 1.0, eotp="off"))
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.nfe_per_sample, b.nfe_per_sample)
    assert torch.equal(a.commit_step, b.commit_step)


# ---- End-of-Text Prediction ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["commit", "argmax"])
def test_eotp_on_oracle_fills_eos_and_saves_passes(mode):
    L = 16
    tgt = _eos_targets(L)
    oracle = OracleLM(tgt, [3] * 4)
    cfg = DecodeConfig(gen_length=L, block_length=8, steps=L)  # top-1: oracle ties break left to right
    base = diffusion_generate(oracle, PROMPTS, cfg)
    res = diffusion_generate(oracle, PROMPTS, cfg, rule=Learn2PD(cfg, None, eotp=mode))
    assert torch.equal(base.sequences, tgt) and torch.equal(res.sequences, tgt)
    assert base.nfe_per_sample.tolist() == [L] * 4
    if mode == "commit":  # answer tokens one per pass, then the terminating EOS fills the rest in the same pass
        assert res.nfe_per_sample.tolist() == [4, 10, L, 1]
    else:  # the first EOS of the block is found at once (all confidences tie), so one pass per answer token + 1
        assert bool((res.nfe_per_sample <= torch.tensor([4, 10, L, 1])).all())
    # passes spent on padding: the baseline commits L - n padding positions one pass each; EoTP at most one
    assert padding_passes(base).tolist() == [13, 7, 0, 16]
    assert bool((padding_passes(res) <= 1).all())


def test_eotp_fill_starts_after_the_first_committed_eos_only():
    # the model would write a token after its first EOS; EoTP fills it with EOS (and spends no pass on it)
    L = 8
    tgt = torch.tensor([[30, 31, EOS_ID, 32, EOS_ID, EOS_ID, EOS_ID, EOS_ID]])
    oracle = OracleLM(tgt, [3])
    cfg = DecodeConfig(gen_length=L, block_length=L, steps=L)
    res = diffusion_generate(oracle, PROMPTS[:1], cfg, rule=Learn2PD(cfg, None, eotp="commit"))
    assert res.sequences.tolist() == [[30, 31, EOS_ID] + [EOS_ID] * 5]
    assert res.nfe_per_sample.tolist() == [3]


def test_eotp_per_row_independence_in_a_batch(tiny):
    L = 16
    tgt = _eos_targets(L)
    oracle = lambda rows: OracleLM(tgt[rows], [3] * len(rows))  # an oracle's targets are per batch row
    for model in (oracle, lambda rows: tiny):
        torch.manual_seed(2)
        cfg = DecodeConfig(gen_length=L, block_length=8, steps=16)
        filt = ConfidenceFilter(8, 16).double()
        together = diffusion_generate(model([0, 1, 2, 3]), PROMPTS, cfg, rule=Learn2PD(cfg, filt, 0.5))
        for r in range(4):
            alone = diffusion_generate(model([r]), PROMPTS[r:r + 1], cfg, rule=Learn2PD(cfg, filt, 0.5))
            assert torch.equal(alone.sequences[0], together.sequences[r])
            assert int(alone.nfe_per_sample[0]) == int(together.nfe_per_sample[r])


# ---- registry and bad inputs ---------------------------------------------------------------------------------------

def test_the_filter_is_passed_explicitly_never_bound_process_wide(tiny):
    import paper_repro.dllm.learn2pd as learn2pd
    with pytest.raises(ValueError, match="valid rules"):  # a trained rule is not a name: it is built with its filter
        DecodeConfig(gen_length=16, block_length=16, steps=16, rule="learn2pd")
    assert not any(hasattr(learn2pd, n) for n in ("bind_filter", "_BOUND", "_BENCH_CACHE"))
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=16)
    torch.manual_seed(1)
    filt_a, filt_b = ConfidenceFilter(8), ConfidenceFilter(8)
    with torch.no_grad(): filt_b.net[-1].bias.fill_(5.0)  # b accepts nearly everything, a nearly nothing
    alone = [diffusion_generate(tiny, PROMPTS, cfg, rule=Learn2PD(cfg, f, 0.5, eotp="off")) for f in (filt_a, filt_b)]
    assert alone[0].nfe != alone[1].nfe  # the two filters decode differently...
    for f, ref in zip((filt_b, filt_a), alone[::-1]):  # ...and each decode depends only on its own rule's filter
        got = diffusion_generate(tiny, PROMPTS, cfg, rule=Learn2PD(cfg, f, 0.5, eotp="off"))
        assert torch.equal(got.sequences, ref.sequences) and got.nfe == ref.nfe


def test_bench_methods_fit_a_filter_per_call_and_carry_it_in_their_rules(tiny):
    first, second = bench_methods(tiny), bench_methods(tiny)
    assert [e.name for e in first] == [e.name for e in second] and len(first) == 2
    assert all(e.paper_headline is BENCH_HEADLINE and e.paper_headline.value == 22.58 for e in first)
    rules = [e.method.make_rule() for e in first + second]
    assert all(isinstance(r, Learn2PD) for r in rules) and [r.eotp for r in rules[:2]] == ["off", "commit"]
    assert rules[0].filter is rules[1].filter and rules[0].filter is not rules[2].filter  # one fit per call, no cache
    for a, b in zip(rules[0].filter.parameters(), rules[2].filter.parameters()):
        assert torch.equal(a, b)  # the fit is deterministic


def test_bad_inputs():
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=16)
    with pytest.raises(ValueError, match="eotp='sometimes'"): Learn2PD(cfg, eotp="sometimes")
    with pytest.raises(ValueError, match="threshold=1.5"): Learn2PD(cfg, threshold=1.5)
    with pytest.raises(ValueError, match="filter reads blocks of 32"): Learn2PD(cfg, ConfidenceFilter(32))
    with pytest.raises(ValueError, match="hidden=0"): ConfidenceFilter(8, 0)
    with pytest.raises(ValueError, match="reads 8 confidences"): ConfidenceFilter(8)(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="reference must be"): ExtremelyGreedy(torch.zeros(4, dtype=torch.long))
    rule = ExtremelyGreedy(torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match batch 4"): rule.start(4, cfg)
    with pytest.raises(ValueError, match="nothing logged"): rule.traces()
    empty = Traces(torch.zeros(0, 8), torch.zeros(0, 8, dtype=torch.bool), torch.zeros(0, 8, dtype=torch.bool),
                   torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no masked positions"): train_filter(empty)
    with pytest.raises(ValueError, match="max_fp=1.5"): choose_threshold(ConfidenceFilter(8), _synthetic_traces(), 1.5)
    with pytest.raises(ValueError, match="fraction=1.0"): _synthetic_traces().split(1.0)
