"""tiue: the closed-form DDIM chain against the substrate's sampler, the students' differentiable sampling paths against
`ddim_sample`, TiUE's batched decoder against separate calls, the implied noise, the KL term, distillation training,
the diversity statistic against brute force, the feature-similarity analysis, and bad inputs."""
import math

import pytest
import torch
import torch.nn as nn

from paper_repro.core.train import OptimConfig, fit
from paper_repro.generation.core import NoiseSchedule, ddim_sample
from paper_repro.generation.tiue import (KL_WEIGHT, METHODS, STUDENT_TIMESTEPS, chain_coefficients, distill_loss,
                                         feature_similarity, generate, implied_noise, kl_to_standard_normal,
                                         make_schedule, ms_per_image, student_forward, within_class_diversity)
from paper_repro.generation.unet import ResBlock, UNet, UNetConfig

TINY = UNetConfig(channels=(8, 16), attention=False, emb_dim=16)


def tiny_student(dtype=torch.float64, seed=0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(TINY).to(dtype)
    for m in net.modules():
        if isinstance(m, ResBlock): nn.init.normal_(m.conv2.weight, std=0.05)
    nn.init.normal_(net.out[-1].weight, std=0.05)
    return net


@pytest.mark.parametrize("param", ["eps", "v", "x0"])
@pytest.mark.parametrize("timesteps", [STUDENT_TIMESTEPS, (999,), (900, 500, 100, 50, 3)])
def test_chain_coefficients_equal_ddim(param, timesteps):
    sched = make_schedule()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    preds = torch.randn(len(timesteps), 2, 1, 4, 4, generator=g, dtype=torch.float64)
    S, E = chain_coefficients(sched, timesteps, param)
    assert torch.equal(E.triu(), torch.zeros_like(E))            # step k reads only earlier predictions
    # every intermediate state too: run the substrate's sampler over each prefix of the schedule's steps
    ref = ddim_sample(lambda x, t, c: preds[list(timesteps).index(int(t[0]))], sched, z, len(timesteps),
                      parameterization=param, timesteps=timesteps)
    torch.testing.assert_close(S[-1] * z + torch.einsum("k,k...->...", E[-1], preds), ref, rtol=1e-9, atol=1e-9)


def test_x0_chain_keeps_only_the_last_prediction_and_v_uses_all():
    sched = make_schedule()
    _, E0 = chain_coefficients(sched, STUDENT_TIMESTEPS, "x0")
    assert torch.equal(E0[-1], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    _, Ev = chain_coefficients(sched, STUDENT_TIMESTEPS, "v")
    assert (Ev[-1].abs() > 1e-3).all() and (Ev[-1].abs() < 1).all()


def test_chain_bad_inputs():
    sched = make_schedule()
    with pytest.raises(ValueError, match="decrease"): chain_coefficients(sched, (100, 500))
    with pytest.raises(ValueError, match="decrease"): chain_coefficients(sched, (1000, 5))
    with pytest.raises(ValueError, match="decrease"): chain_coefficients(sched, ())
    with pytest.raises(ValueError, match="parameterization"): chain_coefficients(sched, (10,), "score")


@pytest.mark.parametrize("method", ["one_step", "loop4"])
def test_student_paths_equal_ddim_sample(method):
    sched, net = make_schedule(), tiny_student()
    z, y = torch.randn(3, 1, 16, 16, dtype=torch.float64), torch.tensor([1, 4, 9])
    ts = STUDENT_TIMESTEPS[:1] if method == "one_step" else STUDENT_TIMESTEPS
    sample, preds, inputs = student_forward(net, z, y, method, sched)
    assert preds.shape == (len(ts), 3, 1, 16, 16) and torch.equal(inputs[0], z)
    ref = ddim_sample(net, sched, z, len(ts), cond=y, parameterization="v", timesteps=ts)
    torch.testing.assert_close(sample, ref, rtol=1e-9, atol=1e-9)


def test_tiue_one_pass_equals_separate_decoder_calls_and_ignores_x_k():
    sched, net = make_schedule(), tiny_student()
    z, y = torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.tensor([0, 7])
    sample, preds, inputs = student_forward(net, z, y, "tiue", sched)
    h, skips = net.encode(z, torch.full((2,), STUDENT_TIMESTEPS[0]), y)
    for k, t in enumerate(STUDENT_TIMESTEPS):
        torch.testing.assert_close(preds[k], net.decode(h, skips, torch.full((2,), t), y), rtol=1e-9, atol=1e-9)
    lookup = lambda x, t, c: preds[STUDENT_TIMESTEPS.index(int(t[0]))]
    torch.testing.assert_close(sample, ddim_sample(lookup, sched, z, 4, parameterization="v",
                                                   timesteps=STUDENT_TIMESTEPS), rtol=1e-9, atol=1e-9)
    # the loop differs: its later steps see x_k, TiUE's decoder sees only the encoder's features of z
    assert not torch.allclose(sample, student_forward(net, z, y, "loop4", sched)[0])
    assert torch.equal(student_forward(net, z, y, "tiue", sched)[0], student_forward(net, z, y, "tiue_no_kl", sched)[0])


def test_implied_noise_recovers_the_true_noise():
    sched = make_schedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(STUDENT_TIMESTEPS), 2, 1, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn_like(x0)
    a = sched.alphas_cumprod[list(STUDENT_TIMESTEPS)].view(-1, 1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(implied_noise(sched, STUDENT_TIMESTEPS, v, x_t), eps, rtol=1e-9, atol=1e-9)


def test_kl_to_standard_normal():
    assert kl_to_standard_normal(torch.tensor([-1.0, 1.0]).repeat(32).view(4, 1, 4, 4)).abs().item() < 1e-6
    g = torch.Generator().manual_seed(0)
    for sd, mu in ((0.5, 0.0), (2.0, 0.3)):
        x = mu + sd * torch.randn(2048, 1, 16, 16, generator=g, dtype=torch.float64)
        expect = 0.5 * (sd ** 2 + mu ** 2 - 1 - math.log(sd ** 2))
        assert abs(kl_to_standard_normal(x).item() - expect) < 0.02 * max(1, expect)


def test_distill_loss_terms_and_training_reduces_mse():
    sched = make_schedule()
    torch.manual_seed(0)
    z, y = torch.randn(16, 1, 16, 16), torch.arange(16) % 10
    x = torch.zeros(16, 1, 16, 16) - 1; x[:, :, 4:12, 6:10] = 1.0
    net = tiny_student(torch.float32)
    out_kl, out_no = distill_loss("tiue", sched)(net, (z, y, x)), distill_loss("tiue_no_kl", sched)(net, (z, y, x))
    torch.testing.assert_close(out_kl["loss"], out_kl["mse"] + KL_WEIGHT * out_kl["kl"])
    torch.testing.assert_close(out_no["loss"], out_no["mse"])
    for method in ("tiue", "loop4"):
        net = tiny_student(torch.float32)
        hist = fit(net, distill_loss(method, sched), lambda i: (z, y, x), 30, OptimConfig(lr=3e-3), progress=False)
        assert hist.parts["mse"][-1] < 0.5 * hist.parts["mse"][0], (method, hist.parts["mse"][0], hist.parts["mse"][-1])


def test_generate_shapes_range_and_bad_method():
    sched, net = make_schedule(), tiny_student(torch.float32)
    z, y = torch.randn(4, 1, 16, 16), torch.arange(4)
    for m in METHODS:
        img = generate(m, net, z, y, sched)
        assert img.shape == z.shape and img.min() >= 0 and img.max() <= 1
    with pytest.raises(ValueError, match="method"): generate("two_step", net, z, y, sched)
    with pytest.raises(ValueError, match="method"): student_forward(net, z, y, "lcm", sched)
    assert len(ms_per_image(lambda: generate("tiue", net, z, y, sched), 4, repeats=2)) == 2


def test_within_class_diversity_brute_force():
    g = torch.Generator().manual_seed(3)
    f, lab = torch.randn(15, 4, generator=g), torch.tensor([0, 1, 2, 0, 1] * 3)
    per = []
    for c in range(3):
        idx = [i for i in range(15) if lab[i] == c]
        per.append(sum((f[i] - f[j]).norm().item() for i in idx for j in idx if i != j) / (len(idx) * (len(idx) - 1)))
    assert abs(within_class_diversity(f, lab) - sum(per) / 3) < 1e-5
    with pytest.raises(ValueError, match="two or more"): within_class_diversity(f[:3], lab[:3])


def test_feature_similarity():
    net = tiny_student(torch.float32)
    out = feature_similarity(net, make_schedule(), torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 3]), steps=4)
    for key in ("encoder", "decoder"):
        m = out[key]
        assert m.shape == (4, 4)
        torch.testing.assert_close(torch.diagonal(m), torch.ones(4), rtol=0, atol=1e-5)
        torch.testing.assert_close(m, m.T)
    assert out["timesteps"][0] == 999 and out["encoder_per_sample"].shape == (3,)
    assert len(net.up[0]._forward_hooks) == 0           # hooks removed afterwards
