"""paper_repro.generation.core: schedules, parameterisations, DDIM/DDPM, guidance, flow matching, VQ tokenizers."""
import math

import pytest
import torch
import torch.nn.functional as F

from paper_repro.generation import core as gc

G = lambda s=0: torch.Generator().manual_seed(s)


@pytest.mark.parametrize("kind", gc.SCHEDULES)
def test_schedules_decrease_from_one_to_near_zero(kind):
    a = gc.NoiseSchedule.make(kind, 1000).alphas_cumprod
    assert a[0] > 0.99 and a[-1] < 0.01 and bool((a[1:] < a[:-1]).all())


def test_schedule_errors():
    with pytest.raises(ValueError, match="kind='quadratic'; valid: linear, cosine"): gc.NoiseSchedule.make("quadratic")
    s = gc.NoiseSchedule.make("linear", 10)
    with pytest.raises(ValueError, match=r"integers in \[0, 10\)"): s.coefficients(torch.tensor([10]), torch.zeros(1))
    with pytest.raises(ValueError, match="parameterization='score'"): s.target("score", 0, 0, 0)


@pytest.mark.parametrize("p", gc.PARAMETERIZATIONS)
def test_parameterizations_round_trip(p):
    s = gc.NoiseSchedule.make("cosine", 50)
    x0, eps = torch.randn(6, 2, 3, generator=G(1), dtype=torch.float64), torch.randn(6, 2, 3, generator=G(2), dtype=torch.float64)
    t = torch.tensor([0, 3, 10, 25, 40, 49])
    r0, re = s.to_x0_eps(p, s.target(p, x0, eps, t), s.add_noise(x0, t, eps), t)
    assert torch.allclose(r0, x0) and torch.allclose(re, eps)


def _oracle(s, star):
    "The exact ε-predictor when the data is the single point `star`."
    def f(x, t, cond):
        a, sd = s.coefficients(t, x)
        return (x - a * star) / sd
    return f


@pytest.mark.parametrize("steps", [1, 5, 50])
def test_ddim_eta0_is_deterministic_and_exact_on_a_point_mass(steps):
    s = gc.NoiseSchedule.make("linear", 50)
    star = torch.tensor([1.5, -0.5], dtype=torch.float64)
    z = torch.randn(7, 2, generator=G(3), dtype=torch.float64)
    out = gc.ddim_sample(_oracle(s, star), s, z, steps)
    assert torch.allclose(out, star.expand(7, 2), atol=1e-8)
    assert torch.equal(out, gc.ddim_sample(_oracle(s, star), s, z, steps))


def test_ddpm_sampler_matches_a_gaussian_target():
    "Data N(m, σ²): the optimal ε-predictor is linear; ancestral DDPM (η=1, all steps) must reproduce m and σ."
    s, m, sd = gc.NoiseSchedule.make("cosine", 200), 2.0, 0.5  # its last step is pure noise, as the sampler assumes
    def eps(x, t, cond):
        a, b = s.coefficients(t, x)
        var = a ** 2 * sd ** 2 + b ** 2
        return b * (x - a * m) / var
    out = gc.ddim_sample(eps, s, torch.randn(20000, 1, generator=G(4), dtype=torch.float64), 200, eta=1.0, gen=G(5))
    assert abs(out.mean().item() - m) < 0.02 and abs(out.std().item() - sd) < 0.02


def test_ddim_timesteps():
    assert gc.ddim_timesteps(1000, 1) == [999] and gc.ddim_timesteps(10, 10) == list(range(9, -1, -1))
    ts = gc.ddim_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0
    with pytest.raises(ValueError, match="steps must be an int in"): gc.ddim_timesteps(10, 11)


def test_guidance_combines_branches_in_one_call():
    calls = []
    def model(x, t, cond):
        calls.append(len(x))
        return x * 0 + cond[:, None].float()
    f = gc.guided(model, torch.tensor(0), 3.0)
    out = f(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.tensor([1, 2, 3, 4]))
    assert calls == [8] and torch.equal(out, 3.0 * torch.tensor([1., 2., 3., 4.])[:, None].expand(4, 2))
    assert gc.guided(model, torch.tensor(0), 1.0) is model
    dropped = gc.drop_condition(torch.arange(1, 1001), 0, 0.3, G(6))
    assert 0.25 < (dropped == 0).float().mean() < 0.35


def test_flow_sampler_converges_on_a_known_field():
    x0 = torch.randn(3, 2, generator=G(7), dtype=torch.float64)
    exact = x0 * math.exp(-1)
    for method, order in (("euler", 1), ("heun", 2)):
        e1 = (gc.flow_sample(lambda x, t, c: -x, x0, 20, method=method) - exact).abs().max()
        e2 = (gc.flow_sample(lambda x, t, c: -x, x0, 40, method=method) - exact).abs().max()
        assert 2 ** order * 0.8 < e1 / e2 < 2 ** order * 1.25  # the integrator's order
    with pytest.raises(ValueError, match="method='rk4'"): gc.flow_sample(lambda x, t, c: x, x0, 2, method="rk4")


def test_losses_are_zero_for_the_exact_predictor():
    s = gc.NoiseSchedule.make("cosine", 100)
    star = torch.tensor([0.3, 0.7], dtype=torch.float64)
    x0 = star.expand(16, 2).clone()
    assert gc.diffusion_loss(_oracle(s, star), x0, s, gen=G(8)).item() < 1e-18
    # flow matching towards a point mass: the optimal velocity is (x1 - x_t) / (1 - t)
    v = lambda x, t, c: (star - x) / (1 - t[:, None])
    assert gc.flow_matching_loss(v, x0, gen=G(9)).item() < 1e-18


def test_vq_straight_through_nearest_and_usage():
    vq = gc.VectorQuantizer(8, 3)
    z = torch.randn(50, 3, generator=G(10))
    vq.kmeans_init(z, gen=G(11))
    out = vq(z)
    d = torch.cdist(z, vq.codebook.weight)
    assert torch.equal(out.codes, d.argmin(1))
    assert 0 < out.usage <= 1 and 1 <= out.perplexity <= 8
    z.requires_grad_(True)
    vq(z).quantized.pow(2).sum().backward()
    assert torch.allclose(z.grad, 2 * vq(z.detach()).quantized)  # gradient of q taken as if q were z
    with pytest.raises(ValueError, match="features of width 4 for a codebook of width 3"): vq(torch.zeros(2, 4))


def test_vq_error_falls_as_the_codebook_grows():
    data = torch.randn(3000, 2, generator=G(12))
    errs = []
    for K in (2, 8, 32, 128):
        vq = gc.VectorQuantizer(K, 2)
        vq.kmeans_init(data, gen=G(13))
        errs.append(F.mse_loss(vq(data).quantized, data).item())
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_multiscale_prefixes_refine_and_decode_matches():
    ms = gc.MultiScaleVQ(64, 3, scales=(1, 2, 4, 8))
    f = torch.randn(4, 3, 8, 8, generator=G(14))
    ms.vq.kmeans_init(f.permute(0, 2, 3, 1).reshape(-1, 3), gen=G(15))
    q, codes, loss = ms(f)
    assert [tuple(c.shape) for c in codes] == [(4, 1, 1), (4, 2, 2), (4, 4, 4), (4, 8, 8)]
    assert torch.allclose(ms.decode_codes(codes), q, atol=1e-5) and loss.dim() == 0
    errs = [F.mse_loss(ms.decode_codes(codes[:k]), f).item() for k in range(1, 5)]
    assert errs[-1] < errs[0]
    with pytest.raises(ValueError, match=r"must be \[B, C, 8, 8\]"): ms(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="scales must increase"): gc.MultiScaleVQ(4, 2, scales=(2, 1))


def test_timestep_embedding_frequencies_and_errors():
    from paper_repro.generation.core import timestep_embedding
    e = timestep_embedding(torch.tensor([0.0, 1.0]), 6, max_period=8.0)
    freqs = 8.0 ** (-torch.arange(3) / 3)  # geometric from 1 down to 1/max_period
    assert torch.allclose(e[1], torch.cat([torch.cos(freqs), torch.sin(freqs)]))
    assert torch.allclose(timestep_embedding(torch.tensor([0.5]), 4, scale=2.0), timestep_embedding(torch.tensor([1.0]), 4))
    with pytest.raises(ValueError, match="even"):
        timestep_embedding(torch.tensor([1]), 5)


def test_time_class_embedder_null_class_and_unconditional():
    from paper_repro.generation.core import TimeClassEmbedder
    torch.manual_seed(0)
    emb = TimeClassEmbedder(8, num_classes=3)
    t = torch.tensor([4, 4, 4])
    out = emb(t, torch.tensor([0, 1, 3]))
    assert out.shape == (3, 8) and not torch.allclose(out[0], out[1])
    assert torch.allclose(emb(t), emb(t, torch.full((3,), 3)))
    uncond = TimeClassEmbedder(8)
    assert uncond(t).shape == (3, 8)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(t, torch.tensor([0, 1, 2]))
