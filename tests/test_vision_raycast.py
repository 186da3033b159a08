"""paper_repro.vision.raycast: camera model and every rendered label against closed forms."""
import math

import pytest
import torch

from paper_repro.vision import raycast as rc


def _down(size=24, h=2.0):
    return rc.Camera.look_at((0, 0, h), (0, 0, 0), up=(0, 1, 0), fov_deg=50, size=size)


def test_plane_depth_points_and_normals():
    cam = _down(h=3.0)
    r = rc.render([rc.Plane(1, (0.5, 0.5, 0.5))], cam)
    assert torch.allclose(r.depth, torch.full_like(r.depth, 3.0))
    assert r.pointmap[2].abs().max() < 1e-6 and (r.semantic == 1).all() and (r.instance == 0).all()
    assert torch.allclose(r.normals[2], torch.full((24, 24), -1.0)) and not r.edges.any()


def test_tilted_view_of_a_plane_has_depth_growing_towards_the_horizon():
    cam = rc.Camera.look_at((0, -3, 1), (0, 0, 0), fov_deg=40, size=32)
    r = rc.render([rc.Plane(1, (0.5, 0.5, 0.5))], cam)
    col = r.depth[:, 16]
    finite = torch.isfinite(col)
    assert bool((col[finite][1:] < col[finite][:-1]).all())  # rows lower in the image are nearer


def test_pointmap_projects_back_to_its_pixel():
    objs, cam = rc.random_scene(3, size=32)
    r = rc.render(objs, cam)
    hit = r.instance >= 0
    v, u = torch.nonzero(hit, as_tuple=True)
    uv = cam.project(r.pointmap[:, hit].T.double())
    assert torch.allclose(uv, torch.stack([u, v], 1).double() + 0.5, atol=1e-3)
    # depth is the camera-frame z of the pointmap
    z = (r.pointmap[:, hit].T.double() @ cam.R.T + cam.t)[:, 2]
    assert torch.allclose(z.float(), r.depth[hit], atol=1e-4)


def test_sphere_normals_are_radial():
    ball = rc.Sphere(2, (1, 0, 0), center=(0.2, -0.1, 0.6), radius=0.5)
    cam = rc.Camera.look_at((2.5, -2, 1.8), (0, 0, 0.4), size=48)
    r = rc.render([rc.Plane(1, (0.5, 0.5, 0.5)), ball], cam)
    on = r.instance == 1
    assert on.sum() > 50
    p = r.pointmap[:, on].double()
    radial = (p - torch.tensor(ball.center, dtype=torch.float64)[:, None]) / ball.radius
    n_world = cam.R.T @ r.normals[:, on].double()  # normals are stored in the camera frame
    assert torch.allclose(n_world, radial, atol=1e-4)
    assert r.edges[on].any()  # the silhouette is an edge


def test_box_top_seen_from_above():
    box = rc.Box(3, (0, 1, 0), center=(0, 0, 0.5), half=(0.6, 0.6, 0.5), yaw=0.3)
    r = rc.render([rc.Plane(1, (0.5, 0.5, 0.5)), box], _down(32, 3.0))
    top = r.instance == 1
    assert top.any() and torch.allclose(r.depth[top], torch.full_like(r.depth[top], 2.0), atol=1e-5)
    assert torch.allclose(r.normals[:, top], torch.tensor([0.0, 0, -1])[:, None].expand(3, int(top.sum())), atol=1e-5)
    # the yawed footprint: every top point lies inside the rotated square
    p = r.pointmap[:2, top].double()
    c, s = math.cos(0.3), math.sin(0.3)
    local = torch.tensor([[c, s], [-s, c]], dtype=torch.float64) @ p
    assert (local.abs() <= 0.6 + 1e-4).all()


def test_box_side_normals_are_axis_aligned_in_the_box_frame():
    box = rc.Box(3, (0, 1, 0), center=(0, 0, 0.4), half=(0.4, 0.3, 0.4), yaw=0.0)
    cam = rc.Camera.look_at((3, -2.5, 1.5), (0, 0, 0.4), size=48)
    r = rc.render([box], cam)
    on = r.instance == 0
    n = cam.R.T @ r.normals[:, on].double()
    assert torch.allclose(n.abs().max(0).values, torch.ones(int(on.sum()), dtype=torch.float64), atol=1e-5)
    seen = {tuple(v) for v in n.round().int().T.tolist()}
    assert seen <= {(1, 0, 0), (0, -1, 0), (0, 0, 1)}  # only the faces turned towards the camera


def test_scene_is_deterministic_and_arguments_checked():
    a, b = rc.random_scene(7), rc.random_scene(7)
    assert torch.equal(rc.render(*a).rgb, rc.render(*b).rgb)
    with pytest.raises(ValueError, match="eye and target coincide"): rc.Camera.look_at((0, 0, 1), (0, 0, 1))
    with pytest.raises(ValueError, match="parallel to the viewing direction"): rc.Camera.look_at((0, 0, 2), (0, 0, 0))
    with pytest.raises(TypeError, match="valid: Plane, Sphere, Box"): rc.render([object()], _down())
