"""dtvnet: AdaIN's statistics, the OFE's normalised motion vectors, the generator's shapes, injection modes and
errors, the affine flow estimator against known flows, and one training step through core.train.fit."""
import math

import pytest
import torch

from paper_repro.core.train import OptimConfig, fit
from paper_repro.generation.dtvnet import (INJECTIONS, DTVNet, FlowEncoder, VideoGenerator, _warp_batch, adain,
                                           clip_batch, endpoint_error, estimate_affine_flow, normalize_motion,
                                           random_motion, reconstruction_loss, video_flows)
from paper_repro.vision.video import sky_clip, warp_by_flow


def test_adain_sets_each_channels_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, 7, generator=g, dtype=torch.float64) * 5 - 2
    gamma = torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.1
    beta = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = adain(x, gamma, beta, eps=0.0)
    assert torch.allclose(y.mean((2, 3)), beta, atol=1e-12)
    assert torch.allclose(y.std((2, 3), unbiased=False), gamma, atol=1e-12)
    # the content survives: per channel, y is an increasing affine map of x
    ref = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), unbiased=False, keepdim=True)
    assert torch.allclose((y - beta[..., None, None]) / gamma[..., None, None], ref, atol=1e-12)
    with pytest.raises(ValueError, match="gamma, beta"):
        adain(x, gamma[:, :3], beta)


def test_motion_vectors_are_normalised_and_random_ones_match():
    z = FlowEncoder(frames=4, motion_dim=6, width=8)(torch.randn(5, 3, 2, 32, 32))
    assert z.shape == (5, 6) and torch.allclose(z.norm(dim=-1), torch.full((5,), math.sqrt(6)), atol=1e-5)
    r = random_motion(7, 6, torch.Generator().manual_seed(1))
    assert torch.allclose(r.norm(dim=-1), torch.full((7,), math.sqrt(6)), atol=1e-5)
    assert torch.allclose(normalize_motion(3 * r), r, atol=1e-6)
    with pytest.raises(ValueError, match=r"flow must be \[B, 3, 2"):
        FlowEncoder(frames=4)(torch.randn(2, 7, 2, 32, 32))


@pytest.mark.parametrize("injection", INJECTIONS)
def test_generator_shapes_first_frame_and_motion_dependence(injection):
    torch.manual_seed(0)
    dvg = VideoGenerator(frames=5, motion_dim=4, width=8, injection=injection)
    torch.nn.init.normal_(dvg.out.weight, std=0.1)   # leave the zero start so motion can show
    img = torch.rand(2, 3, 32, 32)
    z1, z2 = random_motion(2, 4, torch.Generator().manual_seed(0)), random_motion(2, 4, torch.Generator().manual_seed(1))
    v1 = dvg(img, z1 if injection != "none" else None)
    assert v1.shape == (2, 5, 3, 32, 32) and torch.equal(v1[:, 0], img) and 0 <= v1.min() and v1.max() <= 1
    if injection != "none":
        assert not torch.allclose(v1, dvg(img, z2))                   # the motion vector changes the video


def test_no_motion_model_ignores_the_vector_and_bad_inputs_fail():
    torch.manual_seed(0)
    net = DTVNet(frames=4, motion_dim=4, width=8, injection="none")
    torch.nn.init.normal_(net.dvg.out.weight, std=0.1)
    img = torch.rand(2, 3, 32, 32)
    assert net.encode(torch.randn(2, 3, 2, 32, 32)) is None
    assert torch.equal(net.generate(img, random_motion(2, 4)), net.generate(img, random_motion(2, 4)))
    with pytest.raises(ValueError, match="injection='warp'; valid: adain, concat, none"):
        VideoGenerator(injection="warp")
    with pytest.raises(ValueError, match="needs motion"):
        VideoGenerator(frames=4, motion_dim=4, width=8)(img, None)
    with pytest.raises(ValueError, match="image must be"):
        VideoGenerator(frames=4, motion_dim=4, width=8)(torch.rand(2, 1, 32, 32), random_motion(2, 4))


def test_batched_warp_equals_the_substrate_warp():
    fr, fl = clip_batch([3, 4, 5], frames=3)
    ref = torch.stack([warp_by_flow(f, u) for f, u in zip(fr[:, 1], fl[:, 0])])
    assert torch.equal(_warp_batch(fr[:, 1], fl[:, 0]), ref)


def test_flow_estimator_recovers_known_affine_flows():
    fr, fl = clip_batch(range(200, 206), frames=4)
    est = video_flows(fr)
    assert est.shape == fl.shape
    epe = endpoint_error(est, fl)
    zero = endpoint_error(torch.zeros_like(fl), fl)
    assert epe.mean() < 0.25 and epe.median() < 0.1 and bool((epe < zero).all())
    # a pure translation, set by hand, is found to a small fraction of a pixel
    c = sky_clip(7, frames=2, velocity=(1.3, -0.7), omega=0.0, zoom=0.0)
    u = estimate_affine_flow(c.frames[:1], c.frames[1:])
    assert torch.allclose(u.mean((2, 3))[0], c.flow[0].mean((1, 2)), atol=0.05)
    with pytest.raises(ValueError, match="frames must be equal"):
        estimate_affine_flow(c.frames[:1], c.frames[:1, :, :16])


def test_endpoint_error_is_the_mean_vector_distance():
    a = torch.zeros(2, 3, 2, 4, 4)
    b = a.clone(); b[:, :, 0] = 3.0; b[:, :, 1] = 4.0
    assert torch.allclose(endpoint_error(a, b), torch.full((2,), 5.0))
    with pytest.raises(ValueError, match="differ"):
        endpoint_error(a, b[:, :2])


def test_training_reduces_the_reconstruction_loss():
    torch.manual_seed(0)
    net = DTVNet(frames=4, motion_dim=4, width=8)
    batch = clip_batch(range(8), frames=4)
    before = reconstruction_loss(net, batch).item()
    hist = fit(net, reconstruction_loss, lambda i: batch, 15, OptimConfig(lr=3e-3), progress=False)
    assert len(hist.loss) == 15 and reconstruction_loss(net.eval(), batch).item() < before
