"""paper_repro.vision.render, .video, .backbones, .metrics."""
import math

import numpy as np
import pytest
import torch

from paper_repro.vision import backbones as vb
from paper_repro.vision import metrics as vm
from paper_repro.vision import render as vr
from paper_repro.vision import video as vv


def test_word_boxes_hold_all_the_ink_and_do_not_overlap():
    page = vr.layout_words("alpha beta gamma delta 42 7.5".split(), (48, 100), 11)
    ink = sum(page.image[0, int(b[1]):int(b[3]), int(b[0]):int(b[2])].sum() for b in page.boxes)
    assert abs(page.image.sum() - ink) < 1e-3
    for i in range(len(page.boxes)):
        for j in range(i + 1, len(page.boxes)):
            a, b = page.boxes[i], page.boxes[j]
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    assert torch.equal(vr.layout_words(["x", "y"], (20, 40), 10).image, vr.layout_words(["x", "y"], (20, 40), 10).image)
    with pytest.raises(ValueError, match="do not fit"): vr.layout_words(["w"] * 200, (16, 16), 12)
    with pytest.raises(ValueError, match="without surrounding spaces"): vr.render_words([" a"], [(0, 0)])


def test_formulas_render_and_bad_tex_is_named():
    a, b = vr.render_formula("a+b"), vr.render_formula("a+b+c+d")
    assert b.shape[-1] > a.shape[-1] and a.max() > 0.5  # anti-aliased ink: its peak depends on the FreeType build
    with pytest.raises(ValueError, match="mathtext cannot typeset"): vr.render_formula(r"\frac{a")


def test_shape_video_events_and_boxes():
    for seed in range(6):
        c = vv.shapes_video(seed, frames=10, size=24, n_objects=3, p_event=1.0)
        assert len(c.events) == 3
        for f, i, kind, text in c.events:
            before, after = c.visible[:f, i], c.visible[f:, i]
            if kind == "appear": assert not before.any() and "appears" in text
            if kind == "disappear": assert not after.any() and "disappears" in text
            if kind == "recolor": assert c.colors[i][f] != c.colors[i][f - 1] and "turns" in text
        vis = c.visible
        assert (c.boxes[~vis] == 0).all() and (c.boxes[vis][:, 2:] > c.boxes[vis][:, :2]).all()
        assert not (c.masks.sum(1) > 1).any()  # one owner per pixel


def test_shapes_stay_inside_the_canvas():
    c = vv.shapes_video(3, frames=40, size=24, n_objects=2, p_event=0.0, speed=(2.0, 3.0))
    assert (c.boxes[..., :2] >= 0).all() and (c.boxes[..., 2:] <= 24).all() and c.visible.all()


@pytest.mark.parametrize("motion", [dict(velocity=(1.0, 0.5), omega=0.0, zoom=0.0),
                                    dict(velocity=(0.0, 0.0), omega=0.05, zoom=0.0),
                                    dict(velocity=(0.3, -0.2), omega=-0.03, zoom=0.04)])
def test_sky_flow_is_exact(motion):
    c = vv.sky_clip(2, frames=4, size=32, **motion)
    for t in range(3):
        err = (vv.warp_by_flow(c.frames[t + 1], c.flow[t]) - c.frames[t])[:, 4:-4, 4:-4].abs().max()
        assert err < 0.03
    if motion["omega"] == 0 and motion["zoom"] == 0:
        assert torch.allclose(c.flow, -torch.tensor(motion["velocity"])[None, :, None, None].expand_as(c.flow), atol=1e-5)


def test_a_wrong_flow_does_not_pass_the_warp_check():
    c = vv.sky_clip(2, frames=2, size=32, velocity=(2.0, 0.0), omega=0.0, zoom=0.0)
    assert (vv.warp_by_flow(c.frames[1], torch.zeros_like(c.flow[0])) - c.frames[0])[:, 4:-4, 4:-4].abs().max() > 0.03


def test_backbones():
    m = vb.vit(16, 4, depth=1, dim=32, heads=2, in_chans=1)
    t = vb.patch_tokens(m, torch.rand(3, 1, 16, 16))
    assert t.shape == (3, 16, 32) and vb.tokens_to_map(t, 4).shape == (3, 32, 4, 4)
    with pytest.raises(ValueError, match="not a multiple of patch_size"): vb.vit(30, 4)
    with pytest.raises(ValueError, match="do not fold into a 3x3 grid"): vb.tokens_to_map(t, 3)
    with pytest.raises(ValueError, match="unknown timm model 'resnet9000'"): vb.convnet("resnet9000")


def test_depth_metrics_against_brute_force():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(2, 8, 8, generator=g) * 5 + 0.5
    t[0, 0, 0] = float("inf")
    p = t * (1 + 0.3 * (torch.rand(2, 8, 8, generator=g) - 0.5))
    ok = torch.isfinite(t)
    pairs = [(float(a), float(b)) for a, b in zip(p[ok], t[ok])]
    m = vm.depth_metrics(p, t)
    assert math.isclose(m["abs_rel"], np.mean([abs(a - b) / b for a, b in pairs]), rel_tol=1e-6)
    assert math.isclose(m["delta1"], np.mean([max(a / b, b / a) < 1.25 for a, b in pairs]))
    assert math.isclose(m["rmse"], math.sqrt(np.mean([(a - b) ** 2 for a, b in pairs])), rel_tol=1e-6)
    with pytest.raises(ValueError, match="no valid pixel"): vm.depth_metrics(p, torch.full_like(t, float("inf")))


def test_normal_metrics_against_known_angles():
    t = torch.zeros(3, 1, 4); t[2] = 1
    angles = torch.tensor([0.0, 10.0, 20.0, 45.0])
    p = torch.stack([torch.sin(torch.deg2rad(angles)), torch.zeros(4), torch.cos(torch.deg2rad(angles))])[:, None] * 3
    m = vm.normal_metrics(p, t)
    assert math.isclose(m["mean_deg"], 18.75, abs_tol=1e-4) and m["within_11.25"] == 0.5 and m["within_30"] == 0.75


def test_miou_against_brute_force():
    g = torch.Generator().manual_seed(1)
    pred, tgt = torch.randint(0, 4, (2, 6, 6), generator=g), torch.randint(0, 3, (2, 6, 6), generator=g)
    pred[1][pred[1] == 2] = 0  # class 2 absent from image 1's prediction: per-image averaging would differ
    ious = []
    for c in range(4):  # dataset-level: intersections and unions summed over both images
        inter, union = ((pred == c) & (tgt == c)).sum().item(), ((pred == c) | (tgt == c)).sum().item()
        if union: ious.append(inter / union)
    assert math.isclose(vm.miou(pred, tgt, 4), float(np.mean(ious)), rel_tol=1e-5)
    assert vm.miou(tgt, tgt, 4) == 1.0  # perfect prediction, class 3 absent everywhere


def test_psnr_ssim_conventions():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert vm.psnr(x, x) > 80 and math.isclose(vm.ssim(x, x), 1.0, rel_tol=1e-5)
    noisy = (x + 0.1).clamp(0, 1)
    assert 15 < vm.psnr(noisy, x) < 25


def _s_measure_reference(p: np.ndarray, g: np.ndarray, alpha: float = 0.5) -> float:
    "Fan et al. 2017 structure measure, written loop by loop in numpy (the reference for vision.metrics)."
    y = g.mean()
    if y == 0: return 1 - p.mean()
    if y == 1: return p.mean()
    def obj(vals):
        x = vals.mean(); s = vals.std(ddof=1) if len(vals) > 1 else 0.0
        return 2 * x / (x * x + 1 + s + 1e-12)
    fg, bg = [], []
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            (fg if g[i, j] else bg).append(p[i, j] if g[i, j] else 1 - p[i, j])
    s_o = y * obj(np.array(fg)) + (1 - y) * obj(np.array(bg))
    ys, xs = np.nonzero(g)
    cy, cx = int(np.round(ys.mean())) + 1, int(np.round(xs.mean())) + 1
    H, W = g.shape
    s_r = 0.0
    for r0, r1, c0, c1 in ((0, cy, 0, cx), (0, cy, cx, W), (cy, H, 0, cx), (cy, H, cx, W)):
        pb, gb = p[r0:r1, c0:c1].ravel(), g[r0:r1, c0:c1].ravel().astype(float)
        n = pb.size
        if n == 0: continue
        mx, my = pb.mean(), gb.mean()
        d = max(n - 1, 1)
        sx = sum((v - mx) ** 2 for v in pb) / d; sy = sum((v - my) ** 2 for v in gb) / d
        sxy = sum((a - mx) * (b - my) for a, b in zip(pb, gb)) / d
        a, b = 4 * mx * my * sxy, (mx ** 2 + my ** 2) * (sx + sy)
        q = a / (b + 1e-12) if a != 0 else (1.0 if b == 0 else 0.0)
        s_r += n / (H * W) * q
    return max(0.0, alpha * s_o + (1 - alpha) * s_r)


def test_structure_measure_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(12):
        H, W = rng.integers(3, 9, 2)
        g = rng.random((H, W)) > rng.uniform(0.2, 0.8)
        p = np.clip(g * rng.uniform(0.3, 1.0) + rng.normal(0, 0.3, (H, W)), 0, 1)
        ours = vm.structure_measure(torch.tensor(p)[None], torch.tensor(g, dtype=torch.float64)[None]).item()
        assert ours == pytest.approx(_s_measure_reference(p, g), abs=1e-9)
    g = np.zeros((5, 5), bool); p = rng.random((5, 5))
    assert vm.structure_measure(torch.tensor(p)[None], torch.tensor(g)[None].double()).item() == pytest.approx(1 - p.mean())
    m = torch.zeros(1, 6, 6); m[0, 2:4, 1:5] = 1
    assert vm.structure_measure(m, m).item() == pytest.approx(1.0, abs=1e-6)
    assert vm.structure_measure(1 - m, m).item() < 0.1
    with pytest.raises(ValueError, match=r"\[0, 1\]"): vm.structure_measure(m * 2, m)
    with pytest.raises(ValueError, match="alpha"): vm.structure_measure(m, m, alpha=2)


def test_max_f_beta_and_mae_against_brute_force():
    rng = np.random.default_rng(1)
    p = rng.random((4, 6, 6)); g = rng.random((4, 6, 6)) > 0.6
    g[:, 0, 0] = True
    best = 0.0
    for t in np.linspace(0, 1, 256):
        fs = []
        for pi, gi in zip(p, g):
            b = pi >= t
            tp = (b & gi).sum(); prec = tp / b.sum() if b.sum() else 0.0; rec = tp / gi.sum()
            fs.append(1.3 * prec * rec / (0.3 * prec + rec) if prec + rec > 0 else 0.0)
        best = max(best, float(np.mean(fs)))
    pt, gt = torch.tensor(p), torch.tensor(g, dtype=torch.float64)
    assert vm.max_f_beta(pt, gt) == pytest.approx(best, abs=1e-6)
    assert vm.f_beta_curve(pt, gt).shape == (4, 256)
    assert torch.allclose(vm.mae(pt, gt), torch.tensor(np.abs(p - g).mean((1, 2))))
    with pytest.raises(ValueError, match="foreground"): vm.max_f_beta(pt, gt * 0)
