"""m3net: the BEV world and its two sensors (LiDAR heights exact where sampled, the camera smear constant along rays
and blind behind the first object), CenterNet targets decoded back to the boxes, the task specs, MAFI/TCS/decoder
shapes and switches, the scan decoder's use of sambay's scan, and one fit step through the multitask harness."""
import pytest
import torch

from paper_repro.core.train import OptimConfig, fit
from paper_repro.vision.m3net import (BEV_TASKS, CAMERA_CHANNELS, MAFI, TCS, VARIANTS, M3Net, M3NetConfig, bev_scenes,
                                      bev_world, camera_view, centernet_focal, decode_boxes, det_targets, lidar_view,
                                      ray_index, task_specs, train_model, variant_config)
from paper_repro.vision.multitask import batches_from, evaluate_tasks, multitask_loss_fn

SMALL = dict(dim=8, head_hidden=4, layers=1, heads=2, query_grid=4)


def test_world_is_deterministic_and_consistent():
    a, b = bev_world(11), bev_world(11)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(bev_world(12)["map"], a["map"]) or not torch.equal(bev_world(12)["boxes"], a["boxes"])
    for s in range(20):
        w = bev_world(s)
        assert w["occupancy"].sum(0).equal(w["height"])
        for (x0, y0, x1, y1), k in zip(w["boxes"].long().tolist(), w["labels"].tolist()):
            foot = w["objects"][y0:y1, x0:x1]
            assert (foot == k + 1).all()                       # the box covers exactly its object's cells
            on_road = (w["map"][y0:y1, x0:x1] == 1).all().item()
            assert on_road if k < 2 else not (w["map"][y0:y1, x0:x1] == 1).any()
        assert (w["objects"] > 0).sum() == sum((b[2] - b[0]) * (b[3] - b[1]) for b in w["boxes"].tolist())
    with pytest.raises(ValueError, match="size=8"):
        bev_world(0, size=8)


def test_lidar_heights_equal_the_world_where_sampled():
    for s in range(10):
        w = bev_world(s)
        lid = lidar_view(w, 0.3, s)
        hit = lid[0] > 0
        assert torch.equal(lid[1][hit] * 4, w["height"][hit]) and (lid[1][~hit] == 0).all()
        assert 0.2 < hit.float().mean() < 0.4
    with pytest.raises(ValueError, match="rate"):
        lidar_view(w, 0.0, 0)


def test_camera_smear_keeps_the_first_class_along_each_ray():
    bins, r = ray_index(32, 48)
    for s in range(10):
        w = bev_world(s)
        cam = camera_view(w, 48)
        assert cam.shape == (len(CAMERA_CHANNELS), 32, 32)
        for b in range(48):
            ray = bins == b
            occ = ray & (w["objects"] > 0)
            if occ.any():   # brute force: the nearest object cell of the ray gives its class to the whole ray
                i = torch.nonzero(occ)[r[occ].argmin()]
                k = int(w["objects"][i[0], i[1]])
                assert (cam[2 + k][ray] == 1).all() and cam[3:][:, ray].sum(0).eq(1).all()
                far = ray & (r > r[occ].min() + 1e-6)
                assert (cam[0][far] == 0).all()             # nothing is visible behind the first object
            else:
                assert (cam[3:][:, ray] == 0).all() and (cam[0][ray] == 1).all()
        vis = cam[0] > 0
        assert torch.equal(cam[1] > 0, vis & (w["map"] == 1))


def test_detection_targets_decode_back_to_the_boxes():
    d = bev_scenes(6, 0)
    logits = torch.cat([torch.logit(d["heatmap"].clamp(1e-4, 1 - 1e-4)), d["reg"]], 1)
    dets = decode_boxes(logits)
    for i, det in enumerate(dets):
        keep = d["labels"][i] >= 0
        gt = {(tuple(b), int(l)) for b, l in zip(d["boxes"][i][keep].tolist(), d["labels"][i][keep].tolist())}
        top = {(tuple(round(x, 4) for x in b), int(l)) for b, l, s in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist()) if s > 0.99}
        assert {(tuple(float(x) for x in b), l) for b, l in top} == gt
    assert BEV_TASKS["det"].metric(logits, d) == 1.0
    assert BEV_TASKS["occ"].metric(torch.logit(d["occupancy"].clamp(1e-4, 1 - 1e-4)), d) == 1.0
    # the focal loss is smallest at the target and positive elsewhere
    t = d["heatmap"]
    assert centernet_focal(torch.logit(t.clamp(1e-4, 1 - 1e-4)), t) < centernet_focal(torch.zeros_like(t), t)
    with pytest.raises(ValueError, match="unknown BEV tasks"):
        task_specs(("det", "depth"))


def test_model_shapes_and_switches():
    d = bev_scenes(3, 5)
    for name in VARIANTS:
        net = M3Net(variant_config(name, **SMALL))
        out = net(d)
        expect = {"det": (3, 7, 32, 32), "map": (3, 3, 32, 32), "occ": (3, 4, 32, 32)}
        assert {t: tuple(v.shape) for t, v in out.items()} == {t: expect[t] for t in net.cfg.tasks}
    full, naive = M3Net(M3NetConfig(**SMALL)), M3Net(variant_config("naive", **SMALL))
    assert all(l.tcs is not None for l in full.layers) and all(l.tcs is None for l in naive.layers)
    assert hasattr(naive, "learned") and not hasattr(full, "learned")
    scan = M3Net(variant_config("m3net_scan", **SMALL))
    assert type(scan.layers[0].mixer).__module__ == "paper_repro.lm.sambay"
    with pytest.raises(ValueError, match="decoder='rnn'"):
        M3NetConfig(decoder="rnn")
    with pytest.raises(ValueError, match="unknown variant"):
        variant_config("m4net")


def test_mafi_and_tcs_forms():
    torch.manual_seed(0)
    fl, fc = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    on, off = MAFI(8, True), MAFI(8, False)
    off.fuse.load_state_dict(on.fuse.state_dict())
    base = off(fl, fc)
    a_l = on.att_l(on.conv_l(fl).mean((2, 3), keepdim=True)).sigmoid()
    a_c = on.att_c(on.conv_c(fc).mean((2, 3), keepdim=True)).sigmoid()
    assert torch.allclose(on(fl, fc), base * (a_l + a_c))
    g = TCS(8, ("det", "map", "occ"))(torch.randn(2, 5, 8))
    assert set(g) == {"det", "map", "occ"} and all(v.shape == (2, 5, 8) and (v > 0).all() and (v < 1).all() for v in g.values())


def test_queries_are_initialised_from_bev_only_with_query_init():
    d = bev_scenes(2, 0)
    for qi in (True, False):
        net = M3Net(M3NetConfig(query_init=qi, **SMALL))
        bev = torch.randn(2, 8, 16, 16)
        qs = net.init_queries(bev)
        assert qs["occ"].shape == (2, 4 * 16, 8) and qs["det"].shape == (2, 16, 8)
        qs2 = net.init_queries(bev + 1.0)
        assert torch.equal(qs["det"], qs2["det"]) != qi   # learned queries ignore the BEV features


def test_fit_step_and_evaluation_through_the_harness():
    d = bev_scenes(8, 0)
    net = train_model(M3NetConfig(**SMALL), d, steps=3, batch_size=4, lr=1e-3, seed=0, progress=False)
    res = evaluate_tasks(lambda b: net(b), d, task_specs(), batch_size=4)
    assert set(res) == {"det", "map", "occ"} and all(0 <= v <= 1 or v == -1 for v in res.values())
    net2 = train_model(M3NetConfig(**SMALL), d, steps=3, batch_size=4, lr=1e-3, seed=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
