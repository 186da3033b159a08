"""generation.unet: shapes at 16² and 32², forward == decode ∘ encode, one encoding decoded at several timesteps in one
batch equals decoding each alone, conditioning reaches the output, it trains under diffusion_loss, bad inputs fail."""
import pytest
import torch
import torch.nn as nn

from paper_repro.core.train import OptimConfig, fit
from paper_repro.generation.core import NoiseSchedule, diffusion_loss
from paper_repro.generation.unet import ResBlock, UNet, UNetConfig

SMALL = dict(channels=(16, 32), emb_dim=32, heads=2)


def trained_like(net: UNet) -> UNet:
    "Give the zero-initialised layers weights (as training would), so every input can reach the output."
    torch.manual_seed(1)
    for m in net.modules():
        if isinstance(m, ResBlock): nn.init.normal_(m.conv2.weight, std=0.05)
    nn.init.normal_(net.out[-1].weight, std=0.1)
    return net


@pytest.mark.parametrize("side,channels", [(16, (16, 32)), (32, (16, 32, 32)), (16, (16,))])
def test_shapes(side, channels):
    net = UNet(UNetConfig(size=side, **{**SMALL, "channels": channels}))
    x = torch.randn(3, 1, side, side)
    t, y = torch.tensor([0, 10, 999]), torch.tensor([0, 5, 10])   # 10 = the null class
    assert net(x, t, y).shape == x.shape
    h, skips = net.encode(x, t, y)
    assert h.shape[-1] == side // 2 ** (len(channels) - 1) and len(skips) == len(net.down) + 1


def test_rgb_and_unconditional():
    net = UNet(UNetConfig(in_channels=3, out_channels=3, num_classes=0, **SMALL))
    x = torch.randn(2, 3, 16, 16)
    assert net(x, torch.tensor([1, 2])).shape == x.shape
    with pytest.raises(ValueError, match="unconditional"): net(x, torch.tensor([1, 2]), torch.tensor([0, 1]))


def test_forward_is_decode_of_encode():
    net = trained_like(UNet(UNetConfig(**SMALL)))
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([5, 50, 500, 900]), torch.tensor([1, 2, 3, 4])
    assert torch.equal(net(x, t, y), net.decode(*net.encode(x, t, y), t, y))


def test_batched_decode_over_timesteps_equals_separate_decodes():
    "TiUE's one pass: the skips repeated K times, K timestep embeddings, one decoder call."
    net = trained_like(UNet(UNetConfig(**SMALL))).eval()
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 8])
    h, skips = net.encode(x, torch.full((2,), 999), y)
    ts = [999, 700, 400, 100]
    K = len(ts)
    big = net.decode(h.repeat(K, 1, 1, 1), [s.repeat(K, 1, 1, 1) for s in skips],
                     torch.tensor(ts).repeat_interleave(2), y.repeat(K))
    for k, tk in enumerate(ts):
        alone = net.decode(h, skips, torch.full((2,), tk), y)
        torch.testing.assert_close(big[2 * k:2 * k + 2], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(big[:2], big[-2:])          # the timestep reaches the decoder's output


def test_conditioning_changes_output_and_zero_init():
    net = UNet(UNetConfig(**SMALL))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 10])
    assert torch.equal(net(x, t, torch.tensor([1, 2])), torch.zeros_like(x))   # zero-initialised output layer
    trained_like(net)
    a, b = net(x, t, torch.tensor([1, 1])), net(x, t, torch.tensor([2, 2]))
    assert (a - b).abs().max() > 1e-3
    assert (net(x, torch.tensor([10, 10]), torch.tensor([1, 1])) - net(x, torch.tensor([800, 800]),
            torch.tensor([1, 1]))).abs().max() > 1e-3


def test_trains_under_diffusion_loss():
    torch.manual_seed(0)
    sched = NoiseSchedule.make("cosine", T=100)
    net = UNet(UNetConfig(**SMALL, attention=False))
    data = torch.zeros(64, 1, 16, 16); data[:, :, 4:12, 6:10] = 1.0
    data = data * 2 - 1
    gen = torch.Generator().manual_seed(0)
    evalgen = lambda: torch.Generator().manual_seed(123)
    before = diffusion_loss(net, data, sched, torch.zeros(64, dtype=torch.long), gen=evalgen()).item()
    fit(net, lambda m, b: diffusion_loss(m, b[0], sched, b[1], gen=gen),
        lambda i: (data[:16], torch.zeros(16, dtype=torch.long)), 40, OptimConfig(lr=3e-3), progress=False)
    after = diffusion_loss(net, data, sched, torch.zeros(64, dtype=torch.long), gen=evalgen()).item()
    assert after < 0.7 * before, (before, after)


def test_bad_inputs():
    with pytest.raises(ValueError, match="channels"): UNetConfig(channels=(12, 32))
    with pytest.raises(ValueError, match="size"): UNetConfig(size=18, channels=(16, 32, 32))
    with pytest.raises(ValueError, match="heads"): UNetConfig(channels=(16, 24), groups=8, heads=5)
    net = UNet(UNetConfig(**SMALL))
    with pytest.raises(ValueError, match="x must be"): net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t must be"): net(torch.randn(2, 1, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="y must be"): net(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]),
                                                           torch.tensor([1]))
    h, skips = net.encode(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="skip maps"): net.decode(h, skips[:-1], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="batch size"): net.decode(h, skips, torch.tensor([1, 2, 3]))
