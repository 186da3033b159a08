"""pdfnet: the scenes and their depth prior, the patch grid, boundary-driven patch selection, the cross-attention
stage's use of depth, the integrity-prior loss against a direct per-pixel reference, the model's switches and
errors, and one training step through core.train.fit."""
import numpy as np
import pytest
import torch

from paper_repro.core.train import OptimConfig, fit
from paper_repro.vision.pdfnet import (KINDS, PDFConfig, PDFNet, boundary_map, draw_structure, integrity_prior_loss,
                                       merge_patches, normalise_depth, pdfnet_loss, predict, scene_batch,
                                       select_patches, split_patches, structure_loss, thin_scene)


def test_scenes_are_deterministic_and_have_the_depth_prior():
    a, b = thin_scene(5), thin_scene(5)
    assert torch.equal(a.image, b.image) and torch.equal(a.pseudo_depth, b.pseudo_depth)
    assert not torch.equal(thin_scene(6).image, a.image)
    kinds, ratios = set(), []
    for s in range(30):
        sc = thin_scene(s)
        kinds.add(sc.kind)
        assert sc.image.shape == (3, 32, 32) and 0 <= sc.image.min() and sc.image.max() <= 1
        assert set(sc.mask.unique().tolist()) <= {0.0, 1.0} and sc.mask.sum() > 0
        fg, bg = sc.depth[sc.mask > 0], sc.depth[sc.mask == 0]
        assert fg.mean() > bg.mean() + 0.2                 # the structure is nearer (larger inverse depth)
        ratios.append(float(fg.var() / bg.var()))
    assert kinds == set(KINDS) and np.median(ratios) < 0.5  # the integrity prior: the object's depth varies less
    with pytest.raises(ValueError, match="multiple of 8"): thin_scene(0, size=30)
    with pytest.raises(ValueError, match="kind="): draw_structure("hair", np.random.default_rng(0), 32)


def test_patch_grid_roundtrip_and_layout():
    x = torch.randn(2, 3, 16, 24)
    p = split_patches(x, 4)
    assert p.shape == (32, 3, 4, 6) and torch.equal(merge_patches(p, 4), x)
    assert torch.equal(p[(2 * 4 + 3) * 2 + 1], x[1, :, 8:12, 18:24])   # row 2, column 3 of image 1
    with pytest.raises(ValueError, match="grid"): split_patches(torch.randn(1, 1, 10, 10), 4)


def test_patch_selection_doubles_exactly_the_boundary_patches():
    logits = torch.full((1, 1, 16, 16), -8.0)
    logits[..., 2:4, 2:4] = 8.0                            # an object inside patch (0, 0) of a 4×4 grid
    b = boundary_map(logits)
    assert b[..., 8:, 8:].max() < 1e-6 and b[..., :4, :4].max() > 0.1
    feats = torch.ones(1, 2, 16, 16)
    out = select_patches(feats, b, 4)
    doubled = split_patches(out, 4)[:, 0, 0, 0] == 2
    expect = split_patches((b > 0.1).float(), 4).amax((1, 2, 3)) > 0
    assert torch.equal(doubled, expect) and doubled.sum() >= 1 and not doubled.all()


def _ip_reference(p, d, m, eps=1e-6):
    "The integrity-prior loss pixel by pixel (float64 numpy), with the Sobel gradient on a replicate-padded map."
    B, _, H, W = p.shape
    var_sum, grad_sum = 0.0, 0.0
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float)
    for b in range(B):
        pb, db, mb = p[b, 0], d[b, 0], m[b, 0]
        mu = (db * mb).sum() / max(mb.sum(), eps)
        dp = np.pad(db, 1, mode="edge")
        for i in range(H):
            for j in range(W):
                q = mb[i, j] * pb[i, j] + (1 - mb[i, j]) * (1 - pb[i, j])
                nll = -np.log(q + eps)
                diff = (db[i, j] - mu) ** 2
                var_sum += nll * (diff * (1 - q) * pb[i, j] + (1 - diff) * (1 - q) * mb[i, j]) * q
                win = dp[i:i + 3, j:j + 3]
                grad_sum += nll * (abs((win * kx).sum()) + abs((win * kx.T).sum()))
    n = B * H * W
    return var_sum / n + grad_sum / n


def test_integrity_prior_loss_against_pixel_reference_and_its_direction():
    g = torch.Generator().manual_seed(0)
    p, d = torch.rand(2, 1, 6, 7, generator=g, dtype=torch.float64), torch.rand(2, 1, 6, 7, generator=g, dtype=torch.float64)
    m = (torch.rand(2, 1, 6, 7, generator=g) > 0.5).double()
    ours = integrity_prior_loss(p, d, m).item()
    assert ours == pytest.approx(_ip_reference(p.numpy(), d.numpy(), m.numpy()), rel=1e-9)
    # a false positive far from the object's depth costs more than one at the object's depth
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float64); mask[..., :2, :] = 1
    depth = torch.zeros_like(mask); depth[..., :2, :] = 1.0; depth[..., 2:, :2] = 1.0
    near, far = mask.clone() * 0.99 + 0.005, mask.clone() * 0.99 + 0.005
    near[..., 3, 0] = 0.9; far[..., 3, 3] = 0.9           # (3,0) has the object's depth, (3,3) does not
    flat = torch.zeros_like(depth)                          # remove the gradient term's influence: compare variances
    assert integrity_prior_loss(far, depth, mask) - integrity_prior_loss(far, flat, mask) > \
        integrity_prior_loss(near, depth, mask) - integrity_prior_loss(near, flat, mask) - 1e-3
    with pytest.raises(ValueError, match="one shape"): integrity_prior_loss(p, d[:, :, :5], m)


def test_structure_loss_prefers_the_right_answer():
    m = torch.zeros(2, 1, 16, 16); m[:, :, 4:12, 7:9] = 1
    assert structure_loss((m * 2 - 1) * 6, m) < structure_loss(torch.zeros_like(m), m) < structure_loss((1 - 2 * m) * 6, m)


def test_model_shapes_switches_and_the_depth_input():
    torch.manual_seed(0)
    b = scene_batch(range(3))
    depth = normalise_depth(b["depth"])
    net = PDFNet(PDFConfig())
    out = net(b["image"], depth)
    assert [tuple(t.shape) for t in out["logits"]] == [(3, 1, 32, 32), (3, 1, 32, 32), (3, 1, 16, 16), (3, 1, 16, 16)]
    assert out["depth"].shape == (3, 1, 32, 32)
    net.eval()
    assert "depth" not in net(b["image"], depth)
    y1 = net(b["image"], depth)["logits"][0]
    assert not torch.allclose(y1, net(b["image"], depth.flip(-1))["logits"][0])   # the depth is read
    blind = PDFNet(PDFConfig(use_depth=False, depth_decoder=False)).eval()
    assert torch.equal(blind(b["image"], depth)["logits"][0], blind(b["image"], torch.rand_like(depth))["logits"][0])
    assert not hasattr(blind, "dhead")
    with pytest.raises(ValueError, match="depth"): net(b["image"], depth[:, :, :16])


def test_one_fit_step_lowers_nothing_to_nan_and_predict_is_probabilities():
    torch.manual_seed(0)
    b = scene_batch(range(4))
    net = PDFNet()
    out = pdfnet_loss(net, b)
    assert set(out) == {"loss", "seg", "integrity", "depth"} and torch.isfinite(out["loss"])
    assert set(pdfnet_loss(PDFNet(PDFConfig(depth_decoder=False)), b, integrity=False)) == {"loss", "seg"}
    h = fit(net, pdfnet_loss, lambda i: b, 3, OptimConfig(lr=3e-3), progress=False)
    assert len(h.loss) == 3 and all(np.isfinite(h.loss)) and h.loss[-1] < h.loss[0]
    p = predict(net, b["image"], b["depth"], batch_size=3)
    assert p.shape == (4, 32, 32) and 0 <= p.min() and p.max() <= 1
