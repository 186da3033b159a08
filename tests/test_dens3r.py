"""dens3r: 2-D RoPE (positions, interpolation, the relative-position property against an explicit rotation), the
pair renderer's geometry, the model's shapes, view symmetry and cross-view dependence, the inference modes, the loss
through core.train.fit, and bad-input errors."""
import math

import pytest
import torch

from paper_repro.core.lm import apply_rope
from paper_repro.core.train import OptimConfig, fit
from paper_repro.vision.dens3r import (INFERENCE_MODES, TASKS, Dens3R, Dens3RConfig, evaluate_pair, grid_positions,
                                       pair_loss, pair_scene, predict_pair, render_pairs, rope2d_cos_sin, view)
from paper_repro.vision.raycast import render

TINY = dict(dim=16, heads=2, enc_layers=1, dec_layers=1, d_ff=32, head_hidden=8)


def test_positions_interpolate_onto_the_training_grid():
    assert torch.equal(grid_positions(8, 8, (8, 8), "interpolate"), grid_positions(8, 8, (8, 8), "extrapolate"))
    big = grid_positions(16, 12, (8, 6), "interpolate")
    assert torch.allclose(big, grid_positions(16, 12) * 0.5)
    assert big.min() >= 0 and big[:, 0].max() < 8 and big[:, 1].max() < 6
    assert grid_positions(2, 3).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]   # (row, col), row-major
    with pytest.raises(ValueError, match="mode='nearest'; valid: extrapolate, interpolate"):
        grid_positions(4, 4, (4, 4), "nearest")
    with pytest.raises(ValueError, match="needs the training grid"):
        grid_positions(4, 4, None, "interpolate")


def _explicit_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    "Reference: rotate pair (i, i + d/2) by row·f_i for i < d/4 and by col·f_(i−d/4) otherwise, one 2x2 rotation each."
    d = x.shape[-1]
    q = d // 4
    out = x.clone()
    for t in range(x.shape[-2]):
        for i in range(d // 2):
            f = theta ** (-(i % q) / q)
            a = float(pos[t, 0] if i < q else pos[t, 1]) * f
            u, v = x[..., t, i], x[..., t, i + d // 2]
            out[..., t, i], out[..., t, i + d // 2] = u * math.cos(a) - v * math.sin(a), u * math.sin(a) + v * math.cos(a)
    return out


def test_rope2d_matches_explicit_rotations_and_is_relative():
    g = torch.Generator().manual_seed(0)
    pos = grid_positions(3, 4, (2, 2), "interpolate")
    x = torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64)
    c, s = rope2d_cos_sin(pos[None], 8, 100.0, torch.float64)
    assert torch.allclose(apply_rope(x, c, s), _explicit_rope(x, pos, 100.0), atol=1e-12)
    q, k = torch.randn(2, 1, 2, 16, 16, generator=g, dtype=torch.float64)
    def logits(p):
        c, s = rope2d_cos_sin(p[None], 16, 100.0, torch.float64)
        return apply_rope(q, c, s) @ apply_rope(k, c, s).transpose(-1, -2)
    base = grid_positions(4, 4)
    assert torch.allclose(logits(base), logits(base + torch.tensor([1.5, -7.0], dtype=torch.float64)), atol=1e-10)
    assert not torch.allclose(logits(base), logits(base * 2))      # scaling positions changes the offsets
    with pytest.raises(ValueError, match="multiple of 4"):
        rope2d_cos_sin(base, 6)
    with pytest.raises(ValueError, match=r"\[\.\.\., T, 2\]"):
        rope2d_cos_sin(torch.zeros(4, 3), 8)


def test_pairs_put_both_pointmaps_in_view_1s_frame():
    objs, cam1, cam2 = pair_scene(5, size=16)
    d = render_pairs(1, seed=5, size=16)
    assert torch.equal(d["depth"][0], torch.where(d["valid"][0], render(objs, cam1).depth, torch.zeros(16, 16)))
    v1, v2 = d["valid"][0], d["valid2"][0]
    assert (d["pointmap"][0, 2][v1] - d["depth"][0][v1]).abs().max() < 1e-3
    # view 2's points, taken back to the world from view 1's frame and into camera 2, have z = view 2's depth
    p = d["pointmap2"][0].double().permute(1, 2, 0)[v2]
    world = (p - cam1.t) @ cam1.R
    z2 = (world @ cam2.R.T + cam2.t)[:, 2]
    assert (z2 - d["depth2"][0][v2].double()).abs().max() < 1e-3
    assert not torch.allclose(cam1.center, cam2.center) and d["depth"].max() <= 8.0
    assert torch.equal(view(view(d, 2), 2)["rgb2"], d["rgb2"]) and torch.equal(view(d, 2)["depth"], d["depth2"])
    with pytest.raises(ValueError, match="which=3; valid: 1, 2"):
        view(d, 3)
    with pytest.raises(ValueError, match="n=0"):
        render_pairs(0)


def test_model_shapes_heads_and_errors():
    torch.manual_seed(0)
    m = Dens3R(Dens3RConfig(**TINY))
    assert set(m.heads) == {"pointmap", "pointmap_other", "depth", "normals"}
    assert set(Dens3R(Dens3RConfig(**TINY, tasks=("normals",))).heads) == {"normals"}
    b = {"rgb": torch.rand(2, 3, 32, 32), "rgb2": torch.rand(2, 3, 32, 32)}
    p1, p2 = m(b)
    assert {t: tuple(x.shape) for t, x in p1.items()} == {"pointmap": (2, 3, 32, 32), "depth": (2, 1, 32, 32),
                                                         "normals": (2, 3, 32, 32)}
    b64 = {"rgb": torch.rand(1, 3, 64, 48), "rgb2": torch.rand(1, 3, 64, 48)}
    assert m(b64, "interpolate")[1]["pointmap"].shape == (1, 3, 64, 48)
    with pytest.raises(ValueError, match="rgb and rgb2 must be equal"):
        m({"rgb": torch.rand(1, 3, 32, 32), "rgb2": torch.rand(1, 3, 30, 30)})
    with pytest.raises(ValueError, match="tasks=\\('edges',\\); valid"):
        Dens3RConfig(tasks=("edges",))
    with pytest.raises(ValueError, match="multiple of 4"):
        Dens3RConfig(dim=24, heads=4)


def test_views_are_symmetric_and_see_each_other():
    torch.manual_seed(1)
    m = Dens3R(Dens3RConfig(**TINY)).eval()
    a, c = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        p_ac, p_ca = m({"rgb": a, "rgb2": c}), m({"rgb": c, "rgb2": a})
        # one shared decoder and normal/depth heads: view 1 of (a, c) is view 2 of (c, a)
        assert torch.allclose(p_ac[0]["normals"], p_ca[1]["normals"], atol=1e-6)
        assert torch.allclose(p_ac[0]["depth"], p_ca[1]["depth"], atol=1e-6)
        # but the pointmap heads differ (own frame vs the other view's frame)
        assert not torch.allclose(p_ac[0]["pointmap"], p_ca[1]["pointmap"])
        # cross-attention: changing view 2 changes view 1's prediction
        assert not torch.allclose(p_ac[0]["normals"], m({"rgb": a, "rgb2": torch.rand(2, 3, 32, 32)})[0]["normals"])


def test_inference_modes_agree_at_the_training_size_and_differ_above():
    torch.manual_seed(2)
    m = Dens3R(Dens3RConfig(**TINY)).eval()
    b = {"rgb": torch.rand(1, 3, 32, 32), "rgb2": torch.rand(1, 3, 32, 32)}
    b64 = {"rgb": torch.rand(1, 3, 64, 64), "rgb2": torch.rand(1, 3, 64, 64)}
    with torch.no_grad():
        out = {mm: predict_pair(m, b, mm)[0]["normals"] for mm in INFERENCE_MODES}
        assert torch.allclose(out["extrapolate"], out["interpolate"]) and torch.allclose(out["resize"], out["extrapolate"], atol=1e-6)
        big = {mm: predict_pair(m, b64, mm)[0]["normals"] for mm in INFERENCE_MODES}
        assert all(x.shape == (1, 3, 64, 64) for x in big.values())
        assert not torch.allclose(big["extrapolate"], big["interpolate"])
    with pytest.raises(ValueError, match="mode='bicubic'; valid: extrapolate, interpolate, resize"):
        predict_pair(m, b, "bicubic")


def test_loss_trains_through_fit_and_evaluation_reports_both_views():
    torch.manual_seed(3)
    data = render_pairs(8, seed=0, size=16)
    m = Dens3R(Dens3RConfig(**TINY, train_size=16))
    parts = pair_loss(m, data)
    assert set(parts) == {"loss", "loss_pointmap", "loss_depth", "loss_normals"} and torch.isfinite(parts["loss"])
    batches = lambda i: data
    before = float(pair_loss(m, data)["loss"].detach())
    fit(m, pair_loss, batches, 15, OptimConfig(lr=3e-3), progress=False)
    assert float(pair_loss(m, data)["loss"].detach()) < before
    r = evaluate_pair(m, data, "interpolate", batch_size=4)
    assert set(r) == {f"{t}_v{v}" for t in TASKS for v in (1, 2)} and 0 <= r["normals_v1"] <= 180
    solo = Dens3R(Dens3RConfig(**TINY, train_size=16, tasks=("depth",)))
    assert set(pair_loss(solo, data)) == {"loss", "loss_depth"} and set(evaluate_pair(solo, data)) == {"depth_v1", "depth_v2"}


def test_committed_models_load_with_their_configs():
    from paper_repro.vision.dens3r import VARIANTS, load_variants
    ms = load_variants(Dens3RConfig(), seed=0)
    assert set(ms) == set(VARIANTS) and all(m.cfg.tasks == VARIANTS[v] for v, m in ms.items())
    d = render_pairs(2, seed=2_000_000, size=32)
    with torch.no_grad():
        p1, p2 = ms["joint"](d)
    assert p1["normals"].shape == (2, 3, 32, 32) and torch.isfinite(p2["pointmap"]).all()
    assert len(ms["joint"].losses) == 500 and ms["joint"].losses[-1] < ms["joint"].losses[0]
