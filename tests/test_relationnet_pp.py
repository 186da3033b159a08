"""relationnet_pp: FCOS and keypoint targets, the BVR attention against a brute-force reference, the shared location
embedding against the direct one (exact on its grid, bilinear between), key sampling, the detector's shapes and
errors, the loss through one `core.train.fit` run, and the COCO-AP wrapper on perfect predictions."""
import math

import pytest
import torch

from paper_repro.core.train import OptimConfig, fit
from paper_repro.recognition.relationnet_pp import (VARIANTS, BVRAttention, BVRConfig, Detector, batches, build_detector,
                                                    canvas_set, centreness, coco_ap, decode_boxes, detect,
                                                    detection_loss, fcos_targets, grid_points, keypoint_targets,
                                                    prepare, relative_embedding, select_keys)


def test_fcos_targets_centre_sampling_smallest_box_and_background():
    pts = grid_points(16, 16, 4)
    boxes = torch.tensor([[0., 0., 40., 40.], [8., 8., 24., 24.]])
    cls, tgt = fcos_targets(boxes, torch.tensor([1, 2]), pts, 4, radius=1.0)
    at = lambda x, y: pts.tolist().index([x, y])
    assert cls[at(14., 14.)] == 2 and torch.equal(tgt[at(14., 14.)], boxes[1])   # inside both: the smaller wins
    assert cls[at(22., 22.)] == 1            # in the small box but 6 px > 1 stride from its centre
    assert cls[at(2., 2.)] == -1             # inside the big box, far from its centre
    assert cls[at(50., 50.)] == -1
    empty, _ = fcos_targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), pts, 4)
    assert (empty == -1).all()


def test_keypoint_targets_peaks_and_offsets():
    heat, off, peak = keypoint_targets(torch.tensor([[5., 9., 27., 31.]]), 16, 16, 4)
    # top-left (5, 9)/4 = (1.25, 2.25) cells: cell (1, 2), offset (-0.25, -0.25); bottom-right (6.75, 7.75)
    assert peak[0, 2, 1] and peak[1, 7, 6] and peak[2, 5, 4] and peak.sum() == 3
    assert torch.allclose(off[0, :, 2, 1], torch.tensor([-0.25, -0.25]))
    assert torch.allclose(off[1, :, 7, 6], torch.tensor([0.25, 0.25]))
    assert heat[peak].eq(1).all() and 0 < heat[0, 2, 2] < 1 and heat[0, 15, 15] < 1e-6
    h0, _, p0 = keypoint_targets(torch.zeros(0, 4), 16, 16, 4)
    assert h0.sum() == 0 and not p0.any()


def test_config_and_embedding_errors():
    with pytest.raises(ValueError, match="location='grid'; valid: shared, direct, none"):
        BVRConfig(location="grid")
    with pytest.raises(ValueError, match="k must be a positive int"):
        BVRConfig(k=0)
    with pytest.raises(ValueError, match="multiple of grid_step"):
        BVRConfig(max_range=63.0, grid_step=2.0)
    with pytest.raises(ValueError, match="multiple of 4"):
        relative_embedding(torch.zeros(3, 2), 6, 64.0)
    with pytest.raises(ValueError, match="does not split into heads"):
        BVRAttention(10, BVRConfig(heads=4))


def _pair(cfg_kw=None):
    torch.manual_seed(0)
    s = BVRAttention(16, BVRConfig(heads=2, location="shared", **(cfg_kw or {}))).double()
    d = BVRAttention(16, BVRConfig(heads=2, location="direct", **(cfg_kw or {}))).double()
    d.load_state_dict(s.state_dict())
    return s, d


def test_shared_embedding_is_exact_on_grid_and_bilinear_between():
    s, d = _pair()
    rel = torch.randint(-32, 33, (2, 6, 4, 2)).double() * 2
    assert torch.allclose(s.geometry(rel), d.geometry(rel), atol=1e-10)
    # halfway between grid points along x: the mean of the two neighbours' direct values
    mid = rel.clone(); mid[..., 0] = mid[..., 0].clamp(max=60) + 1
    lo, hi = mid.clone(), mid.clone(); lo[..., 0] -= 1; hi[..., 0] += 1
    assert torch.allclose(s.geometry(mid), (d.geometry(lo) + d.geometry(hi)) / 2, atol=1e-10)
    # beyond the range: clamped to the border
    far = torch.full((1, 1, 1, 2), 500.0, dtype=torch.float64)
    assert torch.allclose(s.geometry(far), d.geometry(torch.full_like(far, 64.0)), atol=1e-10)


def test_attention_matches_brute_force_reference():
    _, att = _pair()
    torch.nn.init.normal_(att.out.weight, std=0.3)
    g = torch.Generator().manual_seed(1)
    q, kf = torch.randn(2, 5, 16, generator=g, dtype=torch.float64), torch.randn(2, 3, 16, generator=g, dtype=torch.float64)
    qp, kp = torch.rand(5, 2, generator=g, dtype=torch.float64) * 64, torch.rand(2, 3, 2, generator=g, dtype=torch.float64) * 64
    out, w = att(q, qp, kf, kp, return_weights=True)
    ref = torch.empty_like(q)
    for b in range(2):
        for i in range(5):
            heads = []
            for h in range(2):
                sl = slice(8 * h, 8 * h + 8)
                qi = att.q(q[b, i])[sl]
                logit = torch.stack([qi @ att.k(kf[b, j])[sl] / math.sqrt(8) +
                                     att.geo(relative_embedding(kp[b, j] - qp[i], 32, 64.0))[h] for j in range(3)])
                wj = torch.softmax(logit, 0)
                assert torch.allclose(wj, w[b, h, i])
                heads.append(sum(wj[j] * att.v(kf[b, j])[sl] for j in range(3)))
            ref[b, i] = q[b, i] + att.out(torch.cat(heads))
    assert torch.allclose(out, ref, atol=1e-10)
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)))


def test_zero_init_identity_and_no_geometry_ignores_positions():
    torch.manual_seed(0)
    att = BVRAttention(16, BVRConfig(heads=2, location="none"))
    q, kf = torch.randn(1, 4, 16), torch.randn(1, 3, 16)
    assert torch.equal(att(q, torch.zeros(4, 2), kf, torch.zeros(1, 3, 2)), q)
    torch.nn.init.normal_(att.out.weight)
    a = att(q, torch.zeros(4, 2), kf, torch.zeros(1, 3, 2))
    b = att(q, torch.rand(4, 2) * 64, kf, torch.rand(1, 3, 2) * 64)
    assert torch.allclose(a, b) and not torch.allclose(a, q)


def test_fewer_keys_at_inference():
    torch.manual_seed(0)
    m = Detector(width=16, bvr=BVRConfig(k=8)).eval()
    x = torch.rand(1, 3, 64, 64)
    assert m(x)["key_pos"].shape[2] == 8 and m(x, k=2)["key_pos"].shape[2] == 2
    assert torch.equal(m(x, k=2)["key_pos"], m(x)["key_pos"][:, :, :2])        # top-2 are the first two of the top-8


def test_select_keys_suppresses_neighbours_and_gathers_features():
    heat = torch.full((1, 3, 8, 8), -6.0)
    heat[0, 0, 2, 5], heat[0, 0, 2, 6], heat[0, 0, 6, 1] = 3.0, 2.0, 1.0
    off = torch.zeros(1, 3, 2, 8, 8); off[0, 0, :, 2, 5] = torch.tensor([0.25, -0.25])
    feats = torch.randn(1, 4, 8, 8)
    pos, kf, score = select_keys(heat, off, feats, 2, 4)
    assert pos[0, 0].tolist() == [[23.0, 9.0], [6.0, 26.0]]        # (5.5+0.25)·4, (2.5−0.25)·4; (6, 2) suppressed
    assert torch.equal(kf[0, 0, 0], feats[0, :, 2, 5]) and torch.equal(kf[0, 0, 1], feats[0, :, 6, 1])
    assert torch.allclose(score[0, 0], torch.sigmoid(torch.tensor([3.0, 1.0])))
    with pytest.raises(ValueError, match="k=65 exceeds"):
        select_keys(heat, off, feats, 65, 4)


def test_centreness_and_decoding():
    pts = torch.tensor([[20., 20.], [12., 20.]])
    boxes = torch.tensor([[10., 10., 30., 30.]]).expand(2, 4)
    assert torch.allclose(centreness(pts, boxes), torch.tensor([1.0, math.sqrt(2 / 18)]))
    ltrb = torch.tensor([[10., 10., 10., 10.], [2., 10., 18., 10.]])
    assert torch.allclose(decode_boxes(pts, ltrb), boxes)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_detector_shapes_and_errors(variant):
    torch.manual_seed(0)
    m = build_detector(variant, width=16)
    out = m(torch.rand(2, 3, 64, 64))
    assert out["cls"].shape == (2, 256, 10) and out["ltrb"].shape == (2, 256, 4) and (out["ltrb"] > 0).all()
    assert ("heat" in out) == (VARIANTS[variant] is not None)
    if "key_pos" in out: assert out["key_pos"].shape == (2, 3, VARIANTS[variant].k, 2)
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        m(torch.rand(2, 1, 64, 64))


def test_unknown_variant():
    with pytest.raises(ValueError, match="variant='detr'; valid: fcos, bvr"):
        build_detector("detr")


def test_training_step_and_perfect_predictions_score_full_ap():
    data = prepare(canvas_set(range(6)))
    assert data["cls_t"].shape == (6, 256) and (data["cls_t"] >= 0).any()
    b1, b2 = batches(data, 3, seed=4)(0), batches(data, 3, seed=4)(0)
    assert torch.equal(b1["images"], b2["images"])
    torch.manual_seed(0)
    m = Detector(width=16, bvr=BVRConfig(k=4))
    hist = fit(m, detection_loss, batches(data, 3, 0), 3, OptimConfig(lr=1e-3), progress=False)
    assert all(math.isfinite(v) for v in hist.loss) and {"cls", "box", "ctr", "heat", "offset"} <= set(hist.parts)
    assert m.cls_bvr.out.weight.abs().sum() > 0                      # gradients reach the zero-initialised BVR output
    dets = detect(m.eval(), data["images"][:2])
    assert len(dets) == 2 and all(set(d) == {"boxes", "scores", "labels"} for d in dets)
    perfect = [dict(boxes=b, scores=torch.ones(len(b)), labels=l) for b, l in zip(data["boxes"], data["labels"])]
    ap = coco_ap(perfect, data["boxes"], data["labels"])
    assert ap["AP"] == pytest.approx(100.0) and ap["AP50"] == pytest.approx(100.0)
