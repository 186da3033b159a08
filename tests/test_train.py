"""`paper_repro.core.train`: `fit` against hand-written loops (float64, bit for bit), schedules, accumulation,
callbacks, evaluation, errors, and `load_or_train`."""
import json
import math

import pytest
import torch
from torch import nn

from paper_repro.core.data import DataError
from paper_repro.core.train import (Callback, CancelFit, Constant, LambdaCallback, LinearDecay, OptimConfig,
                                    WarmupCosine, fit, fp16_state_dict, load_or_train, module_blob, module_loader,
                                    round_fp16, warmup_cosine)


def toy(seed=0, width=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1)).double()


def batch_at(i):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    return x, x.sum(1, keepdim=True).sin()


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_fit_equals_hand_written_loop_step_for_step():
    steps, ref = 25, toy()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)

    class Lockstep(Callback):  # advance the reference by one step and compare after every step of fit
        def after_step(self, learner):
            step = learner.step
            for g in opt.param_groups: g["lr"] = warmup_cosine(step, steps, 4, 1e-2)
            loss = mse(ref, batch_at(step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            opt.step()
            assert same(ref, learner.model), f"parameters differ after step {step}"
            assert learner.loss.item() == loss.item()

    model = toy()
    hist = fit(model, mse, batch_at, steps, OptimConfig(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
               WarmupCosine(4), callbacks=[Lockstep()], progress=False)
    assert same(ref, model) and len(hist.loss) == steps and len(hist.lr) == steps
    assert hist.lr[0] == warmup_cosine(0, steps, 4, 1e-2)
    assert not model.training  # fit leaves the model in eval mode


def test_groups_with_own_lr_and_per_group_clipping_equal_separate_optimisers():
    """Two models trained on the same batches, each with its own AdamW and clipping (the hidden-transfer/PPD pattern),
    equal one fit over a ModuleDict with one group per model and clip_per_group."""
    a_ref, b_ref = toy(1), toy(2, width=5)
    opts = [(torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0), m, lr)
            for m, lr in ((a_ref, 3e-3), (b_ref, 1e-2))]
    for step in range(12):
        batch = batch_at(step)
        for opt, m, lr in opts:
            for g in opt.param_groups: g["lr"] = warmup_cosine(step, 12, 0, lr)
            loss = mse(m, batch)
            opt.zero_grad(set_to_none=True); loss.backward()
            nn.utils.clip_grad_norm_(m.parameters(), 0.5); opt.step()

    both = nn.ModuleDict(dict(a=toy(1), b=toy(2, width=5)))
    def loss_fn(models, batch):
        la, lb = mse(models["a"], batch), mse(models["b"], batch)
        return dict(loss=la + lb, a=la, b=lb)
    hist = fit(both, loss_fn, batch_at, 12, OptimConfig(lr=1.0, betas=(0.9, 0.95), clip_norm=0.5, clip_per_group=True),
               WarmupCosine(), param_groups=[dict(params=both["a"].parameters(), lr=3e-3),
                                             dict(params=both["b"].parameters(), lr=1e-2)], progress=False)
    assert same(a_ref, both["a"]) and same(b_ref, both["b"])
    assert set(hist.parts) == {"a", "b"} and len(hist.rows()) == 12
    assert hist.rows()[3]["a"] == pytest.approx(hist.parts["a"][3])


def test_multiplicative_schedule_equals_lambda_lr_loop():
    ref = toy()
    opt = torch.optim.AdamW(ref.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 20, 5, floor=0.1, decay_after_warmup=True))
    for step in range(20):
        loss = mse(ref, batch_at(step))
        opt.zero_grad(); loss.backward(); nn.utils.clip_grad_norm_(ref.parameters(), 5.0); opt.step(); sched.step()
    model = toy()
    fit(model, mse, batch_at, 20, OptimConfig(lr=2e-3, weight_decay=0.01, clip_norm=5.0),
        WarmupCosine(5, 0.1, decay_after_warmup=True, multiplicative=True), progress=False)
    assert same(ref, model)


def test_accumulation_matches_one_big_batch():
    halves = lambda i: tuple(t[(i % 2) * 8:(i % 2 + 1) * 8] for t in batch_at(i // 2))
    a, b = toy(), toy()
    fit(a, mse, batch_at, 6, OptimConfig(lr=1e-2, clip_norm=None), progress=False)
    hist = fit(b, mse, halves, 6, OptimConfig(lr=1e-2, clip_norm=None), accumulate=2, progress=False)
    assert all(torch.allclose(p, q, atol=1e-12, rtol=0) for p, q in zip(a.parameters(), b.parameters()))
    assert len(hist.loss) == 6


def test_iterable_batches_and_running_out():
    batches = [batch_at(i) for i in range(5)]
    a, b = toy(), toy()
    fit(a, mse, batches, 5, progress=False)
    fit(b, mse, batch_at, 5, progress=False)
    assert same(a, b)
    with pytest.raises(ValueError, match="ran out at step 5"):
        fit(toy(), mse, iter(batches), 6, progress=False)


def test_seed_makes_fit_deterministic():
    def noisy(model, batch):  # uses the global RNG, as masking objectives do
        x, y = batch
        return ((model(x + 0.1 * torch.randn_like(x)) - y) ** 2).mean()
    a, b = toy(), toy()
    fit(a, noisy, batch_at, 5, seed=3, progress=False)
    fit(b, noisy, batch_at, 5, seed=3, progress=False)
    assert same(a, b)


def test_callbacks_order_events_and_cancel():
    seen = []
    class Stop(Callback):
        order = 1
        def after_step(self, learner):
            seen.append(("stop", learner.step))
            if learner.step == 2: raise CancelFit
    log = LambdaCallback(order=0, before_fit=lambda l: seen.append("before_fit"),
                         after_loss=lambda l: seen.append(("loss", l.step)),
                         after_step=lambda l: seen.append(("log", l.step)), after_fit=lambda l: seen.append("after_fit"))
    hist = fit(toy(), mse, batch_at, 10, callbacks=[Stop(), log], progress=False)
    assert len(hist.loss) == 3
    assert seen[:4] == ["before_fit", ("loss", 0), ("log", 0), ("stop", 0)]
    assert seen[-1] == "after_fit"
    with pytest.raises(ValueError, match="unknown callback events"):
        LambdaCallback(after_epoch=print)


def test_eval_hook_runs_in_eval_mode_without_grad():
    modes = []
    def eval_fn(model):
        modes.append((model.training, torch.is_grad_enabled()))
        return dict(val=mse(model, batch_at(999)))
    hist = fit(toy(), mse, batch_at, 10, eval_every=4, eval_fn=eval_fn, progress=False)
    assert [r["step"] for r in hist.evals] == [4, 8, 10]
    assert modes == [(False, False)] * 3 and isinstance(hist.evals[0]["val"], float)


def test_history_survives_an_exception():
    def boom(model, batch):
        if boom.calls == 3: raise RuntimeError("boom")
        boom.calls += 1
        return mse(model, batch)
    boom.calls = 0
    from paper_repro.core.train import Learner
    learner = Learner(toy(), boom, batch_at, 10)
    with pytest.raises(RuntimeError, match="boom"):
        learner.run(progress=False)
    assert len(learner.history.loss) == 3 and len(learner.history.lr) == 3


def test_bf16_autocast_runs_on_cpu():
    model = toy().float()
    f32 = lambda i: tuple(t.float() for t in batch_at(i))
    hist = fit(model, mse, f32, 3, precision="bf16", progress=False)
    assert all(math.isfinite(v) for v in hist.loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_schedules():
    assert [Constant()(s, 5, 2.0) for s in range(3)] == [2.0] * 3
    assert Constant(warmup=2)(0, 5, 2.0) == 1.0
    assert LinearDecay(floor=0.5)(4, 5, 1.0) == 0.5 and LinearDecay(warmup=2)(0, 10, 1.0) == 0.5
    assert WarmupCosine(floor=0.2)(100, 100, 1.0) == pytest.approx(0.2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be a positive int"), (dict(steps=True), "steps must be a positive int"),
    (dict(steps=3, accumulate=0), "accumulate"), (dict(steps=3, precision="fp8"), "unknown precision 'fp8'"),
    (dict(steps=3, schedule=0.1), "schedule must be callable"),
    (dict(steps=3, eval_every=2), "needs an eval_fn"),
    (dict(steps=3, param_groups=[]), "param_groups is empty"),
    (dict(steps=3, param_groups=[1, 2]), "param_groups must be"),
    (dict(steps=3, device="tpu"), "tpu"),
])
def test_fit_argument_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fit(toy(), mse, batch_at, **kwargs, progress=False)


def test_loss_fn_output_errors():
    with pytest.raises(ValueError, match="'loss' entry"):
        fit(toy(), lambda m, b: dict(total=mse(m, b)), batch_at, 1, progress=False)
    with pytest.raises(TypeError, match="scalar tensor or a mapping"):
        fit(toy(), lambda m, b: 1.0, batch_at, 1, progress=False)
    with pytest.raises(ValueError, match="lr must be a positive"):
        OptimConfig(lr=0)
    frozen = toy().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(frozen, mse, batch_at, 1, progress=False)


def test_fp16_helpers_agree():
    m = toy().float()
    state = fp16_state_dict(m)
    assert all(v.dtype == torch.float16 for v in state.values())
    round_fp16(m)
    m2 = toy(5).float()
    m2.load_state_dict(state)
    assert same(m, m2)


def test_load_or_train(tmp_path):
    (tmp_path / "data").mkdir()
    calls = []
    def train():
        calls.append(1)
        m = toy().float()
        fit(m, lambda m, b: mse(m, tuple(t.float() for t in b)), batch_at, 3, progress=False)
        return m
    kw = dict(source="toy", licence="CC0", rebuild="paper-repro run toy -p retrain True", root=tmp_path,
              load=module_loader(lambda extra: toy(width=extra["width"]).float()), dump=lambda m: module_blob(m, width=8))
    with pytest.raises(DataError, match="missing; rebuild them with: paper-repro run toy -p retrain True"):
        load_or_train("toy.pt", train, **kw)
    assert not calls  # a missing file never trains silently
    trained = load_or_train("toy.pt", train, retrain=True, **kw)
    loaded = load_or_train("toy.pt", train, **kw)
    assert calls == [1] and same(trained, loaded) and not loaded.training
    entry = json.loads((tmp_path / "data/MANIFEST.json").read_text())["toy.pt"]
    assert entry["rebuild"].startswith("paper-repro run toy") and len(entry["sha256"]) == 64
    (tmp_path / "data/toy.pt").write_bytes(b"corrupt")
    with pytest.raises(DataError, match="corrupted"):
        load_or_train("toy.pt", train, **kw)
    with pytest.raises(TypeError, match="retrain must be True or False"):
        load_or_train("toy.pt", train, retrain="abc", **kw)


def test_zoo_train_lm_equals_its_old_hand_written_loop():
    """The zoo's `train_lm` (now on `fit`) against the loop it replaced, on a tiny config (float32, 1 thread)."""
    import dataclasses
    import torch.nn.functional as F
    from paper_repro.core.lm import LMConfig, TransformerLM
    from paper_repro.core.repro import seed_everything
    from paper_repro.core.zoo import SEQ_LEN, ZooSpec, sample_batch, train_lm
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = LMConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=SEQ_LEN)
        spec = ZooSpec(name="tiny", file="tiny.pt", config=cfg, steps=4, batch_size=2, warmup=2)
        stream = torch.randint(0, 64, (4 * SEQ_LEN,), generator=torch.Generator().manual_seed(1))
        new = train_lm(spec, stream, seed=0, progress=False)
        seed_everything(0)
        old = TransformerLM(cfg)
        opt = torch.optim.AdamW(old.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
        gen = torch.Generator().manual_seed(0)
        old.train()
        for step in range(spec.steps):
            for g in opt.param_groups: g["lr"] = warmup_cosine(step, spec.steps, spec.warmup, spec.lr)
            x = sample_batch(stream, spec.batch_size, SEQ_LEN, gen)
            logits = old(x[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True); loss.backward()
            nn.utils.clip_grad_norm_(old.parameters(), 1.0); opt.step()
        assert same(old, new)
    finally:
        torch.set_num_threads(threads)


def test_round_fp16_leaves_non_persistent_buffers_and_matches_a_reload():
    m = toy().float()
    m.register_buffer("window", torch.linspace(0, 1, 7, dtype=torch.float64), persistent=False)
    m.register_buffer("stat", torch.full((3,), 1 / 3))
    state = fp16_state_dict(m)
    round_fp16(m)
    assert torch.equal(m.window, torch.linspace(0, 1, 7, dtype=torch.float64))
    assert torch.equal(m.stat, torch.full((3,), 1 / 3).half().float())
    m2 = toy(5).float()
    m2.register_buffer("window", torch.zeros(7, dtype=torch.float64), persistent=False)
    m2.register_buffer("stat", torch.zeros(3))
    m2.load_state_dict(state)
    assert same(m, m2) and torch.equal(m.stat, m2.stat)


def test_history_keeps_float64_losses_exact():
    model = toy()
    hist = fit(model, mse, batch_at, 2, progress=False)
    assert all(isinstance(v, float) for v in hist.loss)
    x, y = batch_at(0)
    assert hist.loss[0] == ((toy()(x) - y) ** 2).mean().item()  # the first step's loss, before any update


def test_alternating_step_matches_a_hand_written_bilevel_loop():
    "fit + AlternatingStep equals alternating AdamW steps written out by hand (float64, bit for bit)."
    from paper_repro.core.train import AlternatingStep
    torch.manual_seed(0)
    xs = [torch.randn(6, 3, dtype=torch.float64) for _ in range(8)]
    ys = [torch.randn(6, 3, dtype=torch.float64) for _ in range(8)]
    def make():
        torch.manual_seed(1)
        return nn.Linear(3, 1).double(), nn.Parameter(torch.zeros(1, dtype=torch.float64))
    inner = lambda m, a, x: (m(x) - a).pow(2).mean()
    outer = lambda m, a, y: (m(y) + a - 1).pow(2).mean()
    w_cfg, a_cfg = OptimConfig(lr=0.05, clip_norm=1.0), OptimConfig(lr=0.1, betas=(0.5, 0.999), clip_norm=None)

    w, a = make()
    alt = AlternatingStep([a], lambda m, y: dict(loss=outer(m, a, y), a=a.detach().clone()), lambda i: ys[i], a_cfg)
    fit(w, lambda m, x: inner(m, a.detach(), x), lambda i: xs[i], 5, w_cfg, callbacks=[alt], progress=False)

    w2, a2 = make()
    opt_w, opt_a = w_cfg.build([dict(params=list(w2.parameters()))]), a_cfg.build([dict(params=[a2])])
    losses = []
    for i in range(5):
        opt_w.zero_grad(set_to_none=True)
        inner(w2, a2.detach(), xs[i]).backward()
        nn.utils.clip_grad_norm_(list(w2.parameters()), 1.0)
        opt_w.step()
        opt_a.zero_grad(set_to_none=True); w2.zero_grad(set_to_none=True)
        loss = outer(w2, a2, ys[i]); loss.backward(); opt_a.step(); w2.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert torch.equal(w.weight, w2.weight) and torch.equal(a, a2)
    assert alt.history.loss == losses and alt.main_steps == list(range(5)) and len(alt.history.parts["a"]) == 5
    assert w.weight.grad is None  # the alternating batch left nothing on the main model


def test_ema_callback_averages_weights_after_each_step():
    import copy
    from paper_repro.core.train import EMACallback, OptimConfig, fit
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    ema = copy.deepcopy(net).requires_grad_(False)
    start = ema.weight.clone()
    x = torch.randn(16, 3)
    seen = []
    class Spy:
        order = 20  # after the EMA update
        def after_step(self, learner): seen.append(learner.model.weight.detach().clone())
    fit(net, lambda m, b: m(b).pow(2).mean(), lambda i: x, 3, OptimConfig(lr=0.1), callbacks=[EMACallback(ema, 0.5), Spy()],
        progress=False)
    expect = start
    for w in seen: expect = 0.5 * expect + 0.5 * w
    torch.testing.assert_close(ema.weight, expect)
    with pytest.raises(ValueError, match="decay must be in"): EMACallback(ema, 1.0)


def test_digits_pm1_range():
    from paper_repro.vision.data import digits_pm1, load_digits_images
    x, y = digits_pm1("val")
    x01, y01 = load_digits_images("val", 16)
    assert torch.equal(y, y01) and torch.allclose(x, x01 * 2 - 1) and x.min() >= -1 and x.max() <= 1
