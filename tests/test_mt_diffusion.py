"""mt_diffusion: the label encoder and the aggregation into one diffusion space, one backbone pass for both heads, the
multi-task loss and its gradients, joint sampling through the substrate's DDIM, classification, bad inputs."""
import pytest
import torch

from paper_repro.core.train import OptimConfig, fit
from paper_repro.generation.core import ddim_sample
from paper_repro.generation.mt_diffusion import (MTDiffusion, classify, load_model, make_schedule, multitask_loss,
                                                 sample_images, sample_joint, train_model)
from paper_repro.generation.unet import UNet, UNetConfig

TINY = UNetConfig(channels=(8, 16), attention=False, emb_dim=16, num_classes=0)


def tiny(seed=0, **kw) -> MTDiffusion:
    torch.manual_seed(seed)
    return MTDiffusion(TINY, **kw)


def test_label_codes_rms_smooth_and_distinct():
    m = tiny(gamma=0.7)
    c = m.encode_label(torch.arange(10))
    assert c.shape == (10, 1, 16, 16)
    torch.testing.assert_close(c.pow(2).mean((1, 2, 3)).sqrt(), torch.full((10,), 0.7))
    assert torch.equal(m.encode_label(torch.tensor([3, 3]))[0], m.encode_label(torch.tensor([3, 3]))[1])
    assert (c[0] - c[1]).abs().max() > 0.1
    # low-frequency: neighbouring pixels differ far less than the code's amplitude
    assert (c[..., 1:] - c[..., :-1]).abs().mean() < 0.5 * c.abs().mean()


def test_aggregate_keep_mask():
    m = tiny()
    x, y = torch.rand(3, 1, 16, 16), torch.tensor([1, 2, 3])
    z = m.aggregate(x, y, torch.tensor([True, False, True]))
    assert torch.equal(z[1], x[1])
    torch.testing.assert_close(z[[0, 2]], x[[0, 2]] + m.encode_label(y[[0, 2]]))


def test_one_backbone_pass_gives_both_heads():
    m = tiny()
    z, t = torch.randn(4, 1, 16, 16), torch.tensor([0, 5, 500, 999])
    eps, logits = m.heads(z, t)
    assert eps.shape == z.shape and logits.shape == (4, 10)
    assert torch.equal(m(z, t), eps)
    h, skips = m.backbone.encode(z, t)
    torch.testing.assert_close(logits, m.label_head(h.mean((2, 3))))


def test_multitask_loss_parts_and_gradients():
    m, sched = tiny(), make_schedule()
    x, y = torch.rand(8, 1, 16, 16) * 2 - 1, torch.arange(8)
    out = multitask_loss(m, x, y, sched, gen=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["loss"], out["image"] + 0.1 * out["label"])
    out["loss"].backward()
    assert m.label_codes.grad.abs().sum() > 0 and m.label_head.weight.grad.abs().sum() > 0
    m.zero_grad()
    multitask_loss(m, x, y, sched, p_drop=1.0, gen=torch.Generator().manual_seed(0))["loss"].backward()
    assert m.label_codes.grad is None or m.label_codes.grad.abs().sum() == 0     # every label dropped: no code


def test_training_lowers_both_terms():
    m, sched = tiny(), make_schedule()
    x = torch.zeros(20, 1, 16, 16) - 1
    y = torch.arange(20) % 2
    x[y == 1, :, 3:13, 7:9] = 1.0                     # two "digits": blank and a bar
    gen = torch.Generator().manual_seed(0)
    hist = fit(m, lambda mm, b: multitask_loss(mm, x, y, sched, gen=gen), lambda i: None, 60, OptimConfig(lr=3e-3),
               progress=False)
    first, last = (sum(hist.parts["label"][s]) / 10 for s in (slice(0, 10), slice(-10, None)))
    assert last < 0.7 * first, (first, last)


def test_sample_joint_is_substrate_ddim_then_heads():
    m = tiny()
    noise = torch.randn(5, 1, 16, 16)
    imgs, labels = sample_joint(m, noise, steps=4)
    z0 = ddim_sample(m, make_schedule(), noise, 4, clip_x0=1 + 3 * m.gamma)
    imgs2, labels2 = m.decode(z0)
    assert torch.equal(labels, labels2) and torch.allclose(imgs, imgs2)
    assert imgs.min() >= -1 and imgs.max() <= 1 and labels.dtype == torch.long and labels.max() < 10
    torch.testing.assert_close(imgs, (z0 - m.encode_label(labels)).clamp(-1, 1))
    assert classify(m, torch.rand(3, 1, 16, 16)).shape == (3,)
    assert sample_images(UNet(TINY), noise, steps=3).shape == noise.shape


def test_bad_inputs():
    with pytest.raises(ValueError, match="unconditional"): MTDiffusion(UNetConfig(channels=(8, 16), num_classes=10))
    with pytest.raises(ValueError, match="gamma"): MTDiffusion(TINY, gamma=0)
    with pytest.raises(ValueError, match="code_size"): MTDiffusion(TINY, code_size=0)
    with pytest.raises(ValueError, match="labels"): tiny().encode_label(torch.tensor([10]))
    with pytest.raises(ValueError, match="kind"): train_model("text_only", steps=1)
    with pytest.raises(ValueError, match="kind"): load_model("both")
