"""paper_repro.vision.fd: FD-digits behaves as a distance on digits and its classifier is accurate."""
import pytest
import torch

from paper_repro.vision import fd
from paper_repro.vision.data import load_digits_images


@pytest.fixture(scope="module")
def clf():
    return fd.load_digits_classifier()


def test_classifier_is_accurate_on_held_out_digits(clf):
    x, y = load_digits_images("test", 16)
    assert fd.class_correctness(x, y, clf) > 0.95
    x32, _ = load_digits_images("test", 32)  # other sizes and RGB are scored the same way
    assert fd.class_correctness(x32.expand(-1, 3, -1, -1), y, clf) > 0.9


def test_fd_is_near_zero_for_real_vs_real_and_grows_with_noise(clf):
    xr, _ = load_digits_images("train", 16)
    xt, _ = load_digits_images("test", 16)
    g = torch.Generator().manual_seed(0)
    real = fd.fd_digits(xr, xt, clf)
    noise = fd.fd_digits(xr, torch.rand(300, 1, 16, 16, generator=g), clf)
    curve = [fd.fd_digits(xr, (xt + s * torch.randn(xt.shape, generator=g)).clamp(0, 1), clf) for s in (0.05, 0.15, 0.3)]
    assert 0 <= real < 0.1 * noise
    assert real < curve[0] < curve[1] < curve[2]


def test_fd_matches_a_direct_frechet_computation(clf):
    "The torchmetrics path equals the closed form ‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) on the classifier's features."
    import scipy.linalg
    a, _ = load_digits_images("val", 16)
    b, _ = load_digits_images("test", 16)
    with torch.no_grad(): fa, fb = clf.features(a).double().numpy(), clf.features(b).double().numpy()
    import numpy as np
    ma, mb = fa.mean(0), fb.mean(0)
    ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    direct = ((ma - mb) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert abs(fd.fd_digits(a, b, clf) - direct) < 1e-3 * max(1.0, direct)


def test_bad_inputs_are_named(clf):
    with pytest.raises(ValueError, match=r"fake must be \[N >= 2, C, H, W\]"): fd.fd_digits(torch.rand(4, 1, 16, 16), torch.rand(1, 1, 16, 16), clf)
    with pytest.raises(ValueError, match=r"images must be \[batch, 1 or 3, H, W\]"): clf.features(torch.rand(2, 2, 16, 16))
    with pytest.raises(ValueError, match="3 images for 2 labels"): fd.class_correctness(torch.rand(3, 1, 16, 16), torch.zeros(2), clf)
